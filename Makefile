# Two commands do everything on a fresh machine (README): `make run` and `make test`.
# Each creates .venv, installs the pinned dependencies and the project, then runs.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU torch for CI and laptops. On a CUDA machine: make run TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
DIST ?= dist

.PHONY: run test test-fast lint install ship clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/loopfm run $(if $(CONFIG),--config $(CONFIG)) --out $(or $(OUT),runs/default)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# the pure tests only (no Ray, subprocess or server): the loop for changing code, in about a minute
test-fast: $(STAMP)
	LOOPFM_TEST_FAST=1 $(PY) -m pytest -m "not ray" -p no:cacheprovider $(PYTEST_ARGS)

# This checkout's package as an install lays it out, for a job to ship (README, 'On a Ray cluster'):
# ray job submit --runtime-env-json '{"py_modules": ["dist/loopfm"]}' ... runs this code, not the nodes' install
ship: $(STAMP)
	rm -rf $(DIST)/loopfm $(DIST)/loopfm-*
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(DIST) .
	$(PY) -m zipfile -e $(DIST)/loopfm-*.whl $(DIST)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
