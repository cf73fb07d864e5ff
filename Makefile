# whereabouts-py developer entry points.
#   make demo       venv + package, then ADD x3, DEL, ADD on the file datastore in a temp dir
#   make test       venv with test extras, lint, then the whole suite (e2e included)
#   make test-fast  unit + property tests only (no network namespaces, no multi-process)
#   make bench      benchmarks, appended to bench/RESULTS.md

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo lint test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bin/whereabouts-demo

lint: venv
	$(BIN)/ruff check ipam tests bench bin
	$(BIN)/mypy --strict ipam

test: lint
	$(BIN)/pytest -q

test-fast: venv
	$(BIN)/pytest -q -m "not e2e and not slow"

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
