# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install
# the package with the pinned versions in constraints.txt (CPU torch, no CUDA download).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install test test-fast lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: install
	$(PY) -m ruff check moe tests experiments benchmarks

# the whole suite, slow tests and notebooks (executed by nbmake) included; CI runs this
test: lint
	$(PY) -m pytest -q --nbmake tests notebooks

# the quick loop while developing
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
