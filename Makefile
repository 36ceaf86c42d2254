# One command each: `make quickstart` and `make test` set up .venv (idempotently) and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA GPU, torch comes first and pinned to TORCH_SPEC: on our CPU machines pip finds that
# version's CPU build on disk. Elsewhere, point pip at a CPU index, e.g.
#   make test PIP_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_EXTRA_INDEX_URL=https://pypi.org/simple
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q 'torch>=2.9'; \
	else \
		$(BIN)/pip install -q '$(TORCH_SPEC)'; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/soma-lightning fit --config specs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q
