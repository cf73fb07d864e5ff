# whereabouts-py developer entry points.
#   make demo       venv + package, then ADD x3, DEL, ADD on the file datastore in a temp dir
#   make test       system packages (apt, as root), venv with test extras, lint, then the whole suite (e2e included)
#   make test-fast  unit + property tests only (no network namespaces, no multi-process)
#   make test-ipvlan the ipvlan e2e cases (need a kernel with CONFIG_IPVLAN)
#   make test-apiserver only the real kube-apiserver tier (needs KUBEBUILDER_ASSETS)
#   make bench      benchmarks, appended to bench/RESULTS.md; data and PNG charts in docs/figures
#   make charts     redraw docs/figures/*.png from the data saved there (needs the bench extra: matplotlib)
#   make bench-startup  one CNI exec's cost split (bare start, agent, direct, bursts) on the real API server
#   make bench-slices   node-slice bursts and a 20k-lease range vs an empty one on the real API server
#   make bench-image    the image's size and its installed wrapper's start-up, on the real API server
#   make image      the OCI image from Debian's packages and pinned wheels (root, mmdebstrap): dist/
#   make image-check  build the image twice, uncached, and fail unless both digests agree
#   make bench-controller  ipam-controller at 10k pods / 20k leases: release latency, memory, reconcile pass
#   make bench-poolwrite  the API server's CPU per IPPool PUT, previous per-lease CRD schema vs today's opaque one

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv bytecode demo lint test test-deps test-ipvlan test-apiserver test-fast bench bench-startup bench-slices bench-controller bench-poolwrite bench-image charts image image-check clean

venv: $(STAMP)

# Quiet on purpose: a newcomer's first `make demo` shows the demo, not pip's and setuptools' chatter
# (errors still print).
$(STAMP): pyproject.toml
	@echo "make: setting up $(VENV) (first run only, about a minute)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --quiet --upgrade pip
	@$(BIN)/pip install --quiet --quiet -e '.[test]'
	@touch $(STAMP)

demo: venv
	@PATH="$(CURDIR)/$(BIN):$$PATH" bin/whereabouts-demo

lint: venv
	$(BIN)/ruff check ipam tests bench bin deploy
	$(BIN)/ruff format --check ipam tests bench bin deploy
	$(BIN)/mypy --strict ipam

# The ipvlan e2e cases need CONFIG_IPVLAN, which the CI machines' kernel lacks: make test-ipvlan runs them.
# Every CNI call is a fresh interpreter: precompile ipam/ so none recompiles it (PYTHONDONTWRITEBYTECODE may be set).
bytecode: venv
	$(BIN)/python -m compileall -q ipam

# System packages first (bin/test-deps: apt on Debian/Ubuntu as root, a clear error elsewhere).
test-deps:
	@bin/test-deps

test: test-deps lint bytecode
	@test -n "$$KUBEBUILDER_ASSETS" || echo "make test: KUBEBUILDER_ASSETS is unset, so the real kube-apiserver tier will not run: unpack kube-apiserver and etcd into a directory (../shared/k8s/unpack DIR, or envtest's setup-envtest) and export KUBEBUILDER_ASSETS=DIR" >&2
	$(BIN)/pytest -q -m "not ipvlan"

test-ipvlan: bytecode
	$(BIN)/pytest -q -m ipvlan

# The real-API tier alone; KUBEBUILDER_ASSETS names a directory with kube-apiserver and etcd
# (../shared/k8s/unpack DIR makes one). make test runs these too whenever the variable is set.
test-apiserver: bytecode
	@test -n "$$KUBEBUILDER_ASSETS" || { echo "make test-apiserver: KUBEBUILDER_ASSETS is unset (../shared/k8s/unpack DIR, then export KUBEBUILDER_ASSETS=DIR)" >&2; exit 1; }
	$(BIN)/pytest -q -m "apiserver and not ipvlan"

test-fast: bytecode
	$(BIN)/pytest -q -m "not e2e and not slow"

bench: bytecode
	$(BIN)/python -m bench

bench-startup: bytecode
	$(BIN)/python -m bench.startup

bench-slices: bytecode
	$(BIN)/python -m bench.slices

charts: venv
	$(BIN)/python -m bench.charts

bench-image: bytecode
	$(BIN)/python -m bench.image

# The image: deploy/image/build.py (docs/operating.md, Install). Cached by its inputs under ~/.cache/whereabouts-py/image,
# shared with tests/test_image.py, which make test runs.
image: venv
	$(BIN)/python deploy/image/build.py --out dist

image-check: venv
	$(BIN)/python deploy/image/build.py --out dist --check

bench-controller: bytecode
	$(BIN)/python -m bench.controller

bench-poolwrite: bytecode
	$(BIN)/python -m bench.poolwrite

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
