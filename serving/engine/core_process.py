"""The engine core process of `rnnserve serve --frontends N`: the models, every session, and the
state stores, answering the front ends' calls over the IPC channel (serving.engine.messages).

`EngineCore` listens on a Unix socket, one connection per front end, runs each call on
the in-process InferenceApi (serving.core.local.LocalEngine, so every rule of Runtime holds as in
one process), and answers in batches: every answer ready in one event-loop iteration goes back to
its front end in one frame (serving.engine.messages). The batchers run on their own threads as in
one process; the event loop here does only this bookkeeping, none of the protocol work.

Signals (sent by the supervisor, serving.frontend.supervisor): SIGUSR1 drains (new sessions are
refused with UNAVAILABLE; open ones go on) while the front ends finish their calls; SIGTERM then
freezes the sessions, saves the snapshot (--state-snapshot) and Redis (--redis-url), and exits.
SIGHUP looks for new model versions now (hot reload).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
from collections.abc import Sequence
from typing import Any

from serving.core.errors import InferenceFailedError, InvalidArgumentError, ServingError
from serving.core.interface import GenerationStream, SessionRef
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


class _FrontendProtocol(asyncio.Protocol):
    """One front end's connection: its calls in, its answers out, one frame per loop iteration."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.reader = messages.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.outbox: list[tuple[int, int, Any]] = []
        self.generations: dict[int, GenerationStream] = {}
        self.bindings: dict[int, SessionRef] = {}  # its streams' bindings, released if it goes away

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.core.peers.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except (ValueError, pickle.UnpicklingError) as error:
            log.error("closing a front end's connection that sent a bad frame: %s", error)
            assert self.transport is not None
            self.transport.abort()
            return
        for entries in frames:
            self.core.frames_received += 1
            self.core.calls_received += len(entries)
            for number, method, args in entries:
                self.core.dispatch(self, number, method, args)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.core.peers.discard(self)
        for generation in self.generations.values():
            generation.cancel()  # its reader is gone
        self.generations.clear()
        for ref in self.bindings.values():  # its streams ended with it, as a client's disconnect
            self.core.release_orphan(ref)
        self.bindings.clear()

    def answer(self, number: int, kind: int, payload: Any) -> None:
        if number == 0 or self.transport is None:
            return
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outbox.append((number, kind, payload))

    def flush(self) -> None:
        entries, self.outbox = self.outbox, []
        if entries and self.transport is not None:
            self.core.frames_sent += 1
            self.transport.write(messages.encode_frame(entries))


class EngineCore:
    """Serves an InferenceApi to the front ends that connect to the Unix socket at `path`."""

    def __init__(self, api: LocalEngine, path: str) -> None:
        self.api = api
        self.path = path
        self.peers: set[_FrontendProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.frames_received = 0
        self.calls_received = 0
        self.frames_sent = 0

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # left by a core that was killed
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _FrontendProtocol(self), self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def dispatch(self, peer: _FrontendProtocol, number: int, method: str, args: Any) -> None:
        if method == "ping":
            peer.answer(number, RESULT, None)
        elif method == "cancel":
            generation = peer.generations.pop(args[0], None)
            if generation is not None:
                generation.cancel()
        elif method == "generate":
            self._spawn(self._generate(peer, number, args))
        elif method in messages.METHODS:
            self._spawn(self._run(peer, number, method, args))
        else:
            error = InvalidArgumentError(
                f"the engine core has no method {method!r}; methods: {sorted(messages.METHODS)}"
            )
            peer.answer(number, ERROR, messages.error_payload(error))

    def release_orphan(self, ref: SessionRef) -> None:
        self._spawn(self._release_quietly(ref))

    async def _release_quietly(self, ref: SessionRef) -> None:
        try:
            await self.api.release(ref, False)
        except ServingError:
            return  # the session is gone already, or the core is shutting down: nothing to release

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, peer: _FrontendProtocol, number: int, method: str, args: Sequence[Any]) -> None:
        try:
            result = await getattr(self.api, method)(*args)
        except ServingError as error:
            peer.answer(number, ERROR, messages.error_payload(error))
        except Exception as error:
            log.exception("%s failed in the engine core", method)
            failure = InferenceFailedError(f"{method} failed in the engine core: {error}")
            peer.answer(number, ERROR, messages.error_payload(failure))
        else:
            if isinstance(result, SessionRef) and result.binding:
                peer.bindings[result.binding] = result
            elif method == "release":
                peer.bindings.pop(args[0].binding, None)
            peer.answer(number, RESULT, result)

    async def _generate(self, peer: _FrontendProtocol, number: int, args: Sequence[Any]) -> None:
        try:
            generation = await self.api.generate(*args)
        except ServingError as error:
            peer.answer(number, ERROR, messages.error_payload(error))
            return
        peer.generations[number] = generation
        peer.answer(
            number, RESULT, GenerationStart(generation.session_id, generation.model, generation.version)
        )
        try:
            async for chunk in generation.chunks():
                peer.answer(number, CHUNK, chunk)
        except ServingError as error:
            peer.answer(number, ERROR, messages.error_payload(error))
        finally:
            peer.generations.pop(number, None)
            generation.cancel()


async def run_engine_core(
    settings: ServerSettings, registry: ModelRegistry, path: str, state_on_device: bool | None = None
) -> int:
    """Serve the engine core on the Unix socket `path` until SIGTERM (see the module docstring).

    Returns the exit status: 0, or 1 when the shutdown snapshot could not be saved."""
    runtime = Runtime(settings, registry)
    runtime.recovery = recovery_for(settings, runtime.sessions, runtime.observer)
    core = EngineCore(LocalEngine(runtime), path)
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
    log.info("engine core serving %s on %s", ", ".join(registry.names()) or "no model yet", path)
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
    log.info(
        "engine core stopped: %d calls came in %d frames; %d answer frames went out",
        core.calls_received,
        core.frames_received,
        core.frames_sent,
    )
    return 0 if saved else 1
