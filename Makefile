# `make demo` and `make test` do everything on a fresh machine: create .venv, install, run.
# Keep your own environment (a CUDA build of torch, say) with `make test VENV=/path/to/env`:
# torch is installed only when the environment does not have it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning_relu-installed

.PHONY: demo test lint bench install clean

demo: $(STAMP)
	$(PY) -m lightning_relu demo

test: $(STAMP)
	$(PY) -m ruff check lightning_relu tests examples benchmarks docs
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check lightning_relu tests examples benchmarks docs

bench: $(STAMP)
	$(PY) benchmarks/run.py

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
