"""The engine core process of `rnnserve serve --frontends N`: the models, every session, and the
state stores, answering the front ends' calls over the IPC channel (serving.engine.messages).

`EngineCore` reads every front end's messages from one ZeroMQ ROUTER socket, runs each call on
the in-process InferenceApi (serving.core.local.LocalEngine, so every rule of Runtime holds as in
one process), and answers in batches: every answer ready in one event-loop iteration goes back to
its front end in one message. The batchers run on their own threads as in one process; the
event loop here does only this bookkeeping, none of the protocol work.

Signals (sent by the supervisor, serving.frontend.supervisor): SIGUSR1 drains (new sessions are
refused with UNAVAILABLE; open ones go on) while the front ends finish their calls; SIGTERM then
freezes the sessions, saves the snapshot (--state-snapshot) and Redis (--redis-url), and exits.
SIGHUP looks for new model versions now (hot reload).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from serving.core.errors import ServingError
from serving.core.interface import GenerationStream
from serving.core.local import LocalEngine
from serving.core.registry import ModelRegistry
from serving.core.runtime import Runtime
from serving.engine import messages
from serving.engine.messages import CHUNK, ERROR, RESULT, GenerationStart
from serving.ops.reload import RepositoryWatcher
from serving.settings import ServerSettings
from serving.state.recovery import recovery_for
from serving.state.snapshot import SessionSnapshots

log = logging.getLogger("rnnserve.engine")

QUIET_WAIT_S = 5.0  # at shutdown: most time for steps in flight to finish


class EngineCore:
    """Serves an InferenceApi to the front ends connected to `address` (see the module docstring)."""

    def __init__(self, api: LocalEngine, address: str) -> None:
        self.api = api
        self.address = address
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._sender: zmq.Socket[bytes] | None = None  # the same socket, sending without a future
        self._reader: asyncio.Task[None] | None = None
        self._outbox: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generations: dict[tuple[bytes, int], GenerationStream] = {}
        self.frames_received = 0
        self.calls_received = 0

    async def start(self) -> None:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.address)
        self._socket = socket
        self._sender = zmq.Socket.shadow(socket.underlying)
        self._reader = asyncio.get_running_loop().create_task(self._read(socket), name="rnnserve-ipc")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for generation in self._generations.values():
            generation.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
        self._context.term()

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            identity, frame = await socket.recv_multipart()
            self.frames_received += 1
            for number, method, raw in messages.decode_frame(frame):
                self.calls_received += 1
                self._dispatch(identity, number, method, raw)

    def _answer(self, identity: bytes, number: int, kind: int, payload: bytes) -> None:
        if number == 0:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.setdefault(identity, []).append((number, kind, payload))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        assert self._sender is not None
        for identity, entries in outbox.items():
            try:
                self._sender.send_multipart([identity, messages.encode_frame(entries)], zmq.NOBLOCK)
            except zmq.ZMQError as error:  # a front end that went away: its answers have no reader
                log.debug("answers for a front end dropped: %s", error)

    def _dispatch(self, identity: bytes, number: int, method: str, raw: Any) -> None:
        try:
            args = messages.decode_args(method, raw)
        except ServingError as error:
            self._answer(identity, number, ERROR, messages.error_payload(error))
            return
        if method == "ping":
            self._answer(identity, number, RESULT, messages.encode(None))
        elif method == "cancel":
            generation = self._generations.pop((identity, args[0]), None)
            if generation is not None:
                generation.cancel()
        elif method == "generate":
            self._spawn(self._generate(identity, number, args))
        else:
            self._spawn(self._run(identity, number, method, args))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, identity: bytes, number: int, method: str, args: Sequence[Any]) -> None:
        try:
            result = await getattr(self.api, method)(*args)
        except ServingError as error:
            self._answer(identity, number, ERROR, messages.error_payload(error))
        except Exception as error:
            log.exception("%s failed in the engine core", method)
            self._answer(
                identity, number, ERROR, messages.error_payload(ServingError(f"{method} failed: {error}"))
            )
        else:
            self._answer(identity, number, RESULT, messages.encode(result))

    async def _generate(self, identity: bytes, number: int, args: Sequence[Any]) -> None:
        try:
            generation = await self.api.generate(*args)
        except ServingError as error:
            self._answer(identity, number, ERROR, messages.error_payload(error))
            return
        key = (identity, number)
        self._generations[key] = generation
        start = GenerationStart(generation.session_id, generation.model, generation.version)
        self._answer(identity, number, RESULT, messages.encode(start))
        try:
            async for chunk in generation.chunks():
                self._answer(identity, number, CHUNK, messages.encode(chunk))
        except ServingError as error:
            self._answer(identity, number, ERROR, messages.error_payload(error))
        finally:
            self._generations.pop(key, None)
            generation.cancel()


async def run_engine_core(
    settings: ServerSettings, registry: ModelRegistry, address: str, state_on_device: bool | None = None
) -> int:
    """Serve the engine core on `address` until SIGTERM (see the module docstring); the exit status."""
    runtime = Runtime(settings, registry)
    runtime.recovery = recovery_for(settings, runtime.sessions, runtime.observer)
    core = EngineCore(LocalEngine(runtime), address)
    runtime.start()
    snapshots = None
    if settings.state_snapshot is not None:
        snapshots = SessionSnapshots(settings.state_snapshot, runtime, state_on_device)
        snapshots.prepare()
        await snapshots.restore()
    if runtime.recovery is not None:
        await runtime.recovery.start()

    async def changed() -> None:
        log.info("models now: %s", ", ".join(registry.names()) or "none")

    watcher = RepositoryWatcher(settings, registry, changed, state_on_device)
    loop = asyncio.get_running_loop()
    reload_task = loop.create_task(watcher.run(), name="rnnserve-hot-reload")
    periodic: asyncio.Task[None] | None = None
    if snapshots is not None and settings.snapshot_interval_s > 0:
        periodic = loop.create_task(snapshots.run_periodic(settings.snapshot_interval_s))
    await core.start()
    log.info("engine core serving %s on %s", ", ".join(registry.names()) or "no model yet", address)
    stopping = asyncio.Event()

    def drain() -> None:
        log.info("draining: new sessions are refused")
        runtime.draining = True

    loop.add_signal_handler(signal.SIGUSR1, drain)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, watcher.trigger)
    await stopping.wait()
    runtime.draining = True
    reload_task.cancel()
    if periodic is not None and snapshots is not None:
        snapshots.stop_periodic()
    await asyncio.gather(reload_task, *([periodic] if periodic else []), return_exceptions=True)
    runtime.sessions.freeze()
    deadline = loop.time() + QUIET_WAIT_S
    while runtime.sessions.busy and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await core.close()
    saved = True
    if snapshots is not None:
        saved = await snapshots.save() is not None
    if runtime.recovery is not None:
        await runtime.recovery.save_all()
    await runtime.stop()
    if runtime.recovery is not None:
        await runtime.recovery.close()
    log.info("engine core stopped")
    return 0 if saved else 1
