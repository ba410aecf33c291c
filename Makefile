# `make demo` and `make test` do everything on a fresh machine: create .venv, install, run.
# Keep your own environment (a CUDA build of torch, say) with `make test VENV=/path/to/env`:
# torch is installed only when the environment does not have it.
#
# The real-model zoo (tests/zoo) runs in an environment of its own, .venv-zoo: torchvision only imports beside the
# torch build it was made for, and a broken torchvision breaks `import lightning`, so it never enters .venv.
# `make test` runs the zoo's fast subset there, `make zoo` every model, `make coverage` also writes docs/coverage.md.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning_relu-installed

ZOO_VENV ?= .venv-zoo
ZOO_PACKAGES ?= torch==2.14.1 torchvision==0.29.1 timm transformers
ZOO_PY := $(ZOO_VENV)/bin/python
ZOO_STAMP := $(ZOO_VENV)/.lightning_relu-installed
ZOO_REPORT ?= build/zoo-results.json

.PHONY: demo test lint typecheck bench plasticity plasticity-quick install docs zoo zoo-fast coverage clean

demo: $(STAMP)
	$(PY) -m lightning_relu demo

test: $(STAMP) $(ZOO_STAMP)
	$(PY) -m ruff check lightning_relu tests examples benchmarks docs
	$(PY) -m mypy lightning_relu
	$(PY) -m pytest
	$(ZOO_PY) -m pytest tests/zoo --zoo=fast

zoo-fast: $(ZOO_STAMP)
	$(ZOO_PY) -m pytest tests/zoo --zoo=fast

zoo: $(ZOO_STAMP)
	$(ZOO_PY) -m pytest tests/zoo --zoo=all

# the coverage table shows failing checks as failing: the run's exit status does not stop the table
coverage: $(ZOO_STAMP)
	-$(ZOO_PY) -m pytest tests/zoo --zoo=all -q --zoo-report $(ZOO_REPORT)
	$(ZOO_PY) tests/zoo/coverage.py $(ZOO_REPORT) docs/coverage.md

lint: $(STAMP)
	$(PY) -m ruff check lightning_relu tests examples benchmarks docs

# the package's types, strict (pyproject.toml [tool.mypy]); also a step of `make test`
typecheck: $(STAMP)
	$(PY) -c "import mypy" 2>/dev/null || $(PY) -m pip install -e ".[dev]"
	$(PY) -m mypy lightning_relu

# the documentation site, built strictly (a broken link, a missing page or a bad docstring fails) into build/site
docs: $(STAMP)
	$(PY) -c "import mkdocstrings, material" 2>/dev/null || $(PY) -m pip install -e ".[docs]"
	$(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/run.py

# the plasticity benchmark (docs/plasticity.md): the full run rewrites the docs' tables and plots and
# benchmarks/plasticity/results.json; the quick run (about 2 minutes) writes build/plasticity-quick only
plasticity: $(STAMP)
	$(PY) -m pip install -e ".[plots]"
	$(PY) -m benchmarks.plasticity --docs --out build/plasticity

plasticity-quick: $(STAMP)
	$(PY) -m benchmarks.plasticity --quick --no-plots --out build/plasticity-quick
	$(PY) -m benchmarks.plasticity.check build/plasticity-quick/results.json

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

# torch, torchvision, timm and transformers are installed only when the environment cannot import them; the
# constraints keep the package's install from moving torch or torchvision
$(ZOO_STAMP): pyproject.toml tests/zoo/constraints.txt
	test -x $(ZOO_PY) || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PY) -c "import torch, torchvision, timm, transformers" 2>/dev/null || $(ZOO_PY) -m pip install $(ZOO_PACKAGES)
	$(ZOO_PY) -m pip install -c tests/zoo/constraints.txt -e ".[dev,zoo]"
	touch $(ZOO_STAMP)

clean:
	rm -rf $(VENV) $(ZOO_VENV) build dist *.egg-info .pytest_cache .ruff_cache
