"""A real rnnserve server on an ephemeral port, on its own event loop in a background thread, so
tests talk to it over real gRPC channels from their own loop (`run`) or from subprocesses."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from serving.core.observers import ServerObserver

T = TypeVar("T")


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
        from serving.core.registry import load_repository
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
        from serving.frontend.server import create_server

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


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on a fresh event loop in the test thread."""
    return asyncio.run(coroutine)
