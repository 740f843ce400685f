"""Helpers of the hardening tests: hold a model's batcher to queue work deterministically, inject an
onnxruntime failure into the batches holding a marked session, and check that nothing leaked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.support.servers import ServerThread


class WorkerGate:
    """Holds one model version's batcher thread between two batches, as a long onnxruntime run
    would: requests submitted meanwhile wait in its queue (`backlog`) until `release()`."""

    def __init__(self, server: ServerThread, model: str) -> None:
        self.server = server
        self.batcher = server.registry.latest(model).batcher
        self._held = threading.Event()
        self._released = threading.Event()
        server.on_loop(self.batcher.submit, self._hold)
        if not self._held.wait(10.0):
            raise TimeoutError(f"the batcher of {model} did not pick up the gate")

    def _hold(self) -> None:
        self._held.set()
        self._released.wait(60.0)

    def backlog(self) -> int:
        return int(self.batcher.backlog)

    def wait_for_backlog(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` requests are queued behind the gate."""
        if not wait_until(lambda: self.backlog() >= count, timeout):
            raise TimeoutError(f"{self.backlog()} requests queued, expected {count}")

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> WorkerGate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class FailingBatches:
    """Replaces an engine's `step`: raises (as onnxruntime would) for every batch that holds one of
    the `marked` slots, runs the others. Counts the batches it failed and the ones it ran."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.step: Callable[..., np.ndarray] = engine.step
        self.marked: set[int] = set()
        self.failed = 0
        self.ran = 0
        engine.step = self

    def __call__(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.marked.intersection(slots.tolist()):
            self.failed += 1
            raise RuntimeError("injected onnxruntime failure: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        self.ran += 1
        return self.step(slots, tokens, lengths)

    def remove(self) -> None:
        del self.engine.step  # back to the class's step


class SlowBatches:
    """Replaces an engine's `step` with one that takes `delay_s` longer, as a larger model would."""

    def __init__(self, engine: Any, delay_s: float) -> None:
        self.engine = engine
        self.step: Callable[..., np.ndarray] = engine.step
        self.delay_s = delay_s
        engine.step = self

    def __call__(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)  # the worker thread waits, as it would inside onnxruntime
        return self.step(slots, tokens, lengths)

    def remove(self) -> None:
        del self.engine.step


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@dataclass(frozen=True)
class Footprint:
    """What a server holds for its sessions: compared before and after a fault to find leaks."""

    sessions: int  # open sessions
    slots_in_use: dict[str, int]  # state pool slots in use, per model
    active: dict[str, int]  # the registry's session count, per model
    backlog: dict[str, int]  # requests waiting in each batcher
    tasks: int  # asyncio tasks on the server's event loop (handlers, background closes)


def footprint(server: ServerThread) -> Footprint:
    def read() -> Footprint:
        models = list(server.registry)
        return Footprint(
            sessions=len(server.runtime.sessions),
            slots_in_use={m.name: m.engine.pool.allocator.in_use for m in models},
            active={m.name: m.active_sessions for m in models},
            backlog={m.name: m.batcher.backlog for m in models},
            tasks=len(asyncio.all_tasks(server.loop)),
        )

    result: Footprint = server.on_loop(read)
    return result


def settles_to(server: ServerThread, baseline: Footprint, timeout: float = 10.0) -> Footprint:
    """Wait until the server's footprint is back to `baseline`; returns the last one seen."""
    last = footprint(server)
    deadline = time.monotonic() + timeout
    while last != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        last = footprint(server)
    return last


def session_slot(server: ServerThread, session_id: str) -> int:
    slot: int = server.on_loop(lambda: server.runtime.sessions.get(session_id).slot)
    return slot


def session_busy(server: ServerThread, session_id: str) -> bool:
    """True while a request holds the session (a Generate until the batcher has let go of it)."""
    busy: bool = server.on_loop(lambda: server.runtime.sessions.get(session_id).busy)
    return busy


def report(config: Any, line: str) -> None:
    """Print a figure on the terminal even while output is captured (for the Reliability table)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def percentiles_ms(samples_s: list[float]) -> str:
    """ "p50 X ms, p99 Y ms, max Z ms" of latencies in seconds."""
    if not samples_s:
        return "no samples"
    p50, p99 = np.percentile(np.asarray(samples_s) * 1e3, [50, 99])
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(samples_s) * 1e3:.2f} ms (n={len(samples_s)})"
