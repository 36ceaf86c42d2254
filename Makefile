# One command each: `make quickstart` and `make test` set up .venv (idempotently) and run. The quickstart installs
# the package alone; the tests add the dev extras (pytest, soma-models, triton, wandb, torchao).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA GPU, torch comes first, pinned to TORCH_SPEC, from PyTorch's CPU wheel index (TORCH_CPU_INDEX)
# rather than PyPI's CUDA build (gigabytes of CUDA libraries). Where pip has an index or wheel folder of its own
# (index-url, extra-index-url, find-links or no-index in pip.conf or PIP_* variables, as `pip config list` shows),
# pip is left to it: on our CPU machines it finds the CPU build on disk. `make setup TORCH_CPU_INDEX=` never adds
# the CPU index.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup setup-dev quickstart test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q 'torch>=2.9'; \
	elif [ -z '$(TORCH_CPU_INDEX)' ] || $(BIN)/pip config list 2>/dev/null | grep -qE '(index-url|find-links|no-index)='; then \
		$(BIN)/pip install -q '$(TORCH_SPEC)'; \
	else \
		echo "no NVIDIA GPU: torch's CPU build from $(TORCH_CPU_INDEX)"; \
		$(BIN)/pip install -q --index-url '$(TORCH_CPU_INDEX)' '$(TORCH_SPEC)'; \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/.torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

quickstart: setup
	$(BIN)/soma-lightning fit --config specs/quickstart.yaml

test: setup-dev
	$(BIN)/python -m pytest -q
