"""Shared fixtures: tiny exported models, a real server on an ephemeral port, an offline oracle.

The helpers behind them live in tests/support (models.py: the tiny models and the oracle;
servers.py: the in-process server); test modules import those, never this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from tests.support.models import TINY_MODELS, Oracle, export_tiny_model
from tests.support.servers import ServerThread

pytest_plugins = ["tests.support.skip_summary"]  # the closing `skipped: ...` line

# Servers that tests start as `rnnserve serve` subprocesses open no HTTP door unless a test asks:
# several run at once, and the default port 8000 may be taken on the machine.
os.environ.setdefault("RNNSERVE_HTTP_PORT", "0")


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with tiny-lstm (2 layers) and tiny-gru (1 layer), version 1 each. Read-only."""
    root = tmp_path_factory.mktemp("repository")
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    for name, (arch, num_layers) in TINY_MODELS.items():
        export_tiny_model(root, checkpoints, name, arch, num_layers)
    return root


@pytest.fixture(scope="session")
def oracles(model_repository: Path) -> dict[str, Oracle]:
    return {name: Oracle(model_repository / name / "1") for name in TINY_MODELS}


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[ServerThread]:
    """A server with default settings, shared by a test module (tests must not rely on its state)."""
    running = ServerThread(model_repository)
    yield running
    running.stop()


@pytest.fixture
def make_server(model_repository: Path) -> Iterator[Any]:
    """Factory for servers with custom settings, stopped after the test."""
    started: list[ServerThread] = []

    def make(repository: Path | None = None, **overrides: Any) -> ServerThread:
        running = ServerThread(repository or model_repository, **overrides)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, saying why, where onnxruntime has no CUDA provider."""
    if cuda_available():
        return
    skip = pytest.mark.skipif(True, reason="needs a CUDA device and onnxruntime-gpu")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
