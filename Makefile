# Two commands on a fresh clone: `make run` (the pipeline) and `make test` (linters, then the suite).
# Each sets up .venv on first use: `run` installs what the pipeline needs, `test` adds the
# server and the test tools on top. GPU hosts:
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" run
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIPELINE_STAMP := $(VENV)/.installed-pipeline
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint setup

setup: $(TEST_STAMP)

$(PIPELINE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[train]"
	touch $@

$(TEST_STAMP): $(PIPELINE_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev]"
	touch $@

run: $(PIPELINE_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest
