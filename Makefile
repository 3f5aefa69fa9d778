# Set up and run in one command: `make demo`, `make test` (lint, then the test suite), `make lint`.
# Each creates the virtual environment $(VENV) when it is missing, installs torch into it, then
# this package, editable with its test extra (again only when pyproject.toml changes).
# TORCH is what pip installs as torch when $(VENV) is created (to switch builds later, remove
# $(VENV)); the default is PyTorch's build for the platform (CUDA on Linux). For the CPU build:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch

BIN := $(VENV)/bin
TORCH_INSTALLED := $(VENV)/.torch-installed
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint
.DELETE_ON_ERROR:

demo: $(INSTALLED)
	$(BIN)/sharpscope demo

test: lint
	$(BIN)/python -m pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(TORCH_INSTALLED): | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	@echo '$(TORCH)' > $@

$(INSTALLED): pyproject.toml | $(TORCH_INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@
