# Two commands on a fresh clone: `make run` (the pipeline) and `make test` (the suite).
# Each creates .venv on first use. GPU hosts: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" run
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev]"
	touch $@

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline serving tests benchmarks
	$(BIN)/ruff format --check pipeline serving tests benchmarks
