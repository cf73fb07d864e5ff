# whereabouts-py developer entry points.
#   make demo       venv + package, then ADD x3, DEL, ADD on the file datastore in a temp dir
#   make test       venv with test extras, lint, then the whole suite (e2e included)
#   make test-fast  unit + property tests only (no network namespaces, no multi-process)
#   make test-ipvlan the ipvlan e2e cases (need a kernel with CONFIG_IPVLAN)
#   make test-apiserver only the real kube-apiserver tier (needs KUBEBUILDER_ASSETS)
#   make bench      benchmarks, appended to bench/RESULTS.md
#   make bench-startup  one CNI exec's cost split (bare start, agent, direct, bursts) on the real API server
#   make bench-slices   node-slice bursts and a 20k-lease range vs an empty one on the real API server
#   make bench-controller  ipam-controller at 10k pods / 20k leases: release latency, memory, reconcile pass

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv bytecode demo lint test test-ipvlan test-apiserver test-fast bench bench-startup bench-slices bench-controller clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bin/whereabouts-demo

lint: venv
	$(BIN)/ruff check ipam tests bench bin deploy
	$(BIN)/mypy --strict ipam

# The ipvlan e2e cases need CONFIG_IPVLAN, which the CI machines' kernel lacks: make test-ipvlan runs them.
# Every CNI call is a fresh interpreter: precompile ipam/ so none recompiles it (PYTHONDONTWRITEBYTECODE may be set).
bytecode: venv
	$(BIN)/python -m compileall -q ipam

test: lint bytecode
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

bench-controller: bytecode
	$(BIN)/python -m bench.controller

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
