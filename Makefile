# Set-up and everyday commands. Everything installs into ./.venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVER_STAMP := $(VENV)/.installed-server
PYTEST_ARGS ?=

.PHONY: serve test check format proto bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

## The development install: the package, its tests' and checks' tools.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(SERVER_STAMP)

## What a server needs, and nothing else (no test or lint tools).
$(SERVER_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(SERVER_STAMP)

## Run a server on 127.0.0.1:50051 with its embedded defaults.
serve: $(SERVER_STAMP)
	$(BIN)/bnserver serve

## Run the whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Format check, lint and type check (generated code excluded).
check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Regenerate proto/bnservice/v1 from its .proto files.
proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info

## Benchmarks: ratios against peers measured in the same run (installs torch for the peer).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run
