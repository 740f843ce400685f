"""Shared fixtures: tiny exported models, a real server on an ephemeral port, an offline oracle.

The model repository is made by the real pipeline: a random-initialised RNNLanguageModel is saved
with save_checkpoint and published with export_checkpoint (which verifies it against PyTorch).
The server runs on its own event loop in a background thread, so tests talk to it over real gRPC
channels from their own loop (asyncio.run) or from subprocesses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pytest

from export import signature as sig
from serving.observers import ServerObserver

T = TypeVar("T")

# Servers that tests start as `rnnserve serve` subprocesses open no HTTP door unless a test asks:
# several run at once, and the default port 8000 may be taken on the machine.
os.environ.setdefault("RNNSERVE_HTTP_PORT", "0")

# Every character the tiny models know: prompts in tests use only these.
ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"
TINY_MODELS = {  # name -> (arch, num_layers)
    "tiny-lstm": ("lstm", 2),
    "tiny-gru": ("gru", 1),
}


def export_tiny_model(
    repository: Path,
    checkpoints: Path,
    name: str,
    arch: str,
    num_layers: int,
    seed: int = 0,
    version: int | None = None,
) -> Path:
    """Train nothing: save a seeded random model as a checkpoint and export it. Returns the version dir."""
    import torch

    from export.exporter import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.model import RNNLanguageModel
    from serving.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(sorted(set(ALPHABET)))
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch, vocab_size=tokenizer.vocab_size, embedding_size=8, hidden_size=16, num_layers=num_layers
    )
    checkpoint = save_checkpoint(
        checkpoints / f"{name}-{seed}",
        RNNLanguageModel(config),
        tokenizer.to_dict(),
        step=0,
        metrics={"val_loss": None},
    )
    return export_checkpoint(checkpoint, repository, name, version=version).path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with tiny-lstm (2 layers) and tiny-gru (1 layer), version 1 each. Read-only."""
    root = tmp_path_factory.mktemp("repository")
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    for name, (arch, num_layers) in TINY_MODELS.items():
        export_tiny_model(root, checkpoints, name, arch, num_layers)
    return root


class Oracle:
    """The exported ONNX model run offline on a whole token history, batch 1, zero state."""

    def __init__(self, version_dir: Path) -> None:
        self.session = ort.InferenceSession(
            str(version_dir / sig.MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_inputs = [n for n in (sig.H0, sig.C0) if n in inputs]
        self.state_shape = [int(d) for d in inputs[sig.H0].shape[1:]]

    def last_logits(self, history: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) after the last token of `history`."""
        tokens = np.array([list(history)], dtype=np.int64)
        feeds = {sig.TOKENS: tokens, sig.LENGTHS: np.array([len(history)], np.int32)}
        feeds.update({name: np.zeros([1, *self.state_shape], np.float32) for name in self.state_inputs})
        return self.session.run([sig.LAST_LOGITS], feeds)[0][0]

    def logprobs(self, history: Sequence[int]) -> np.ndarray:
        logits = self.last_logits(history).astype(np.float64)
        return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


@pytest.fixture(scope="session")
def oracles(model_repository: Path) -> dict[str, Oracle]:
    return {name: Oracle(model_repository / name / "1") for name in TINY_MODELS}


class RecordingObserver(ServerObserver):
    """Records batches, failed batches and session endings (hooks run on several threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[str, int, int]] = []  # (model, rows, tokens)
        self.failed: list[tuple[str, int]] = []  # (model, rows)
        self.ended: list[tuple[str, str]] = []  # (model, reason)

    def batch_completed(
        self,
        model: str,
        version: int,
        rows: int,
        tokens: int,
        padded_tokens: int,
        queue_waits_s: Sequence[float],
        compute_s: float,
    ) -> None:
        with self.lock:
            self.batches.append((model, rows, tokens))

    def batch_failed(self, model: str, version: int, rows: int) -> None:
        with self.lock:
            self.failed.append((model, rows))

    def session_ended(self, model: str, version: int, reason: str) -> None:
        with self.lock:
            self.ended.append((model, reason))

    def rows(self, model: str | None = None) -> int:
        """Rows run so far (all models, or one)."""
        with self.lock:
            return sum(r for m, r, _ in self.batches if model is None or m == model)

    def largest_batch(self) -> int:
        with self.lock:
            return max((r for _, r, _ in self.batches), default=0)


class ServerThread:
    """A real rnnserve server on 127.0.0.1:<free port>, on an event loop in a background thread."""

    def __init__(self, repository: Path, state_on_device: bool | None = None, **overrides: Any) -> None:
        from serving.registry import load_repository
        from serving.settings import ServerSettings

        self.settings = dataclasses.replace(ServerSettings(repository=repository, port=0), **overrides)
        self.observer = RecordingObserver()
        self.registry = load_repository(self.settings, self.observer, state_on_device=state_on_device)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.server, self.port = self.call(self._start())
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> tuple[Any, int]:
        from serving.server import create_server

        server, port = await create_server(self.settings, self.registry, observer=self.observer)
        await server.start()
        return server, port

    @property
    def runtime(self) -> Any:
        return self.server.runtime

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_loop(self, function: Any, *args: Any) -> Any:
        """Run a plain function on the server's loop thread (runtime state is loop-owned)."""
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except Exception as error:  # handed back to the test thread
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(10.0)

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


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


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on a fresh event loop in the test thread."""
    return asyncio.run(coroutine)


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
