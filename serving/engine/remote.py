"""`RemoteRuntime`: the InferenceApi of a front-end process, answered by the engine core over IPC.

Calls made during one event-loop iteration leave in one ZeroMQ message (the flush runs at the end
of the iteration, with `call_soon`, so a lone call waits for no timer and a busy loop sends one
message per iteration, not one per call). Answers come back in batches likewise.

The engine core may die: the connection pings it every `heartbeat_s`; when nothing has come back
for `lost_after_s`, every call in flight fails with UNAVAILABLE, the socket is replaced (calls
queued for the dead core are dropped, so none runs later on a restarted core) and new calls fail
at once with UNAVAILABLE until the core answers again. Clients resume their sessions by id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from serving.core.errors import ServingError, UnavailableError
from serving.core.interface import (
    GeneratedChunk,
    GenerateRequestFields,
    HealthReport,
    ModelInfo,
    Prediction,
    SessionRef,
    StepOptions,
)
from serving.engine import messages
from serving.engine.messages import CHUNK, ERROR, RESULT, GenerationStart

log = logging.getLogger(__name__)


@dataclass
class _Call:
    method: str
    future: asyncio.Future[Any]
    chunks: asyncio.Queue[GeneratedChunk | ServingError] | None = None  # a Generate's tokens


@dataclass
class EngineConnection:
    """The front end's end of the IPC channel: numbered calls, batched per loop iteration."""

    address: str
    heartbeat_s: float = 0.25
    lost_after_s: float = 1.5
    _context: zmq.asyncio.Context = field(default_factory=zmq.asyncio.Context)
    _socket: zmq.asyncio.Socket | None = None
    _sender: zmq.Socket[bytes] | None = None  # the same socket, sending without a future
    _calls: dict[int, _Call] = field(default_factory=dict)
    _outbox: list[tuple[int, str, bytes]] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _last_heard: float = 0.0
    _lost: bool = False
    frames_sent: int = 0  # messages sent (each carries one or more calls)
    calls_sent: int = 0

    async def start(self, wait_s: float = 0.0) -> None:
        """Connect and start the heartbeat; wait up to `wait_s` for the core's first answer."""
        self._last_heard = time.monotonic()
        self._connect()
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat()))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            call = self.submit("ping", ())
            try:
                await asyncio.wait_for(asyncio.shield(call.future), 0.1)
                return
            except (asyncio.TimeoutError, UnavailableError):
                await asyncio.sleep(0.02)

    def _connect(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a core that is not connected
        socket.connect(self.address)
        self._socket = socket
        self._sender = zmq.Socket.shadow(socket.underlying)
        self._reader = asyncio.get_running_loop().create_task(self._read(socket))

    async def close(self) -> None:
        for task in [*self._tasks, *([self._reader] if self._reader else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._reader] if self._reader else []), return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
        self._fail_all(UnavailableError("the front end is shutting down"))
        self._context.term()

    @property
    def connected(self) -> bool:
        """False while the engine core is not answering (see the module docstring)."""
        return not self._lost

    def _unavailable(self) -> UnavailableError:
        return UnavailableError(
            "the engine core is not answering (it is restarting); retry, resuming sessions by id"
        )

    def submit(self, method: str, args: tuple[Any, ...], stream: bool = False) -> _Call:
        """Queue a call for this iteration's message; its answer settles the returned call's future."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call = _Call(method, future, asyncio.Queue() if stream else None)
        if self._lost:
            future.set_exception(self._unavailable())
            return call
        number = next(self._numbers)
        self._calls[number] = call
        self._queue(number, method, args)
        return call

    def notify(self, method: str, args: tuple[Any, ...]) -> None:
        """Send a call that has no answer (e.g. cancel)."""
        if not self._lost:
            self._queue(0, method, args)

    def _queue(self, number: int, method: str, args: tuple[Any, ...]) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((number, method, messages.encode(args)))

    def _flush(self) -> None:
        entries, self._outbox = self._outbox, []
        if not entries or self._sender is None:
            return
        self.frames_sent += 1
        self.calls_sent += len(entries)
        try:
            self._sender.send(messages.encode_frame(entries), zmq.NOBLOCK)
        except zmq.Again:
            # No core connected (IMMEDIATE): these calls cannot be delivered.
            for number, _, _ in entries:
                self._settle_error(number, self._unavailable())

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frame = await socket.recv()
            self._last_heard = time.monotonic()
            if self._lost:
                log.info("the engine core answers again")
                self._lost = False
            for number, kind, payload in messages.decode_frame(frame):
                self._deliver(number, kind, payload)

    def _deliver(self, number: int, kind: int, payload: msgspec.Raw) -> None:
        call = self._calls.get(number)
        if call is None:
            return  # a call already failed (the core was lost) or a ping's answer
        if kind == RESULT:
            if call.chunks is None:
                del self._calls[number]
            if not call.future.done():
                call.future.set_result(messages.decode_result(call.method, payload))
        elif kind == CHUNK:
            chunk = messages.decode_chunk(payload)
            assert call.chunks is not None, "chunks answer a Generate"
            call.chunks.put_nowait(chunk)
            if chunk.finish_reason:
                del self._calls[number]
        elif kind == ERROR:
            self._settle_error(number, messages.decode_error(payload))

    def _settle_error(self, number: int, error: ServingError) -> None:
        call = self._calls.pop(number, None)
        if call is None or call.method == "ping":
            return  # nobody waits for a heartbeat's answer
        if not call.future.done():
            call.future.set_exception(error)
        elif call.chunks is not None:
            call.chunks.put_nowait(error)

    def _fail_all(self, error: ServingError) -> None:
        for number in list(self._calls):
            self._settle_error(number, error)

    def forget(self, number_of: _Call) -> None:
        """Stop delivering to a call whose caller went away."""
        for number, call in list(self._calls.items()):
            if call is number_of:
                del self._calls[number]

    def number(self, of: _Call) -> int:
        return next((number for number, call in self._calls.items() if call is of), 0)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if time.monotonic() - self._last_heard > self.lost_after_s and not self._lost:
                log.warning(
                    "the engine core has not answered for %.1f s: failing its calls", self.lost_after_s
                )
                self._lost = True
                self._fail_all(self._unavailable())
                if self._reader is not None:
                    self._reader.cancel()
                if self._socket is not None:
                    self._socket.close(linger=0)
                self._outbox.clear()
                self._connect()
            # The ping goes even while lost: its answer shows that a (restarted) core is back.
            number = next(self._numbers)
            self._calls[number] = _Call("ping", asyncio.get_running_loop().create_future())
            self._queue(number, "ping", ())
            self._drop_old_pings(number)

    def _drop_old_pings(self, newest: int) -> None:
        for number, call in list(self._calls.items()):
            if call.method == "ping" and number != newest:
                del self._calls[number]


class RemoteGeneration:
    """A GenerationStream whose tokens come from the engine core."""

    def __init__(self, connection: EngineConnection, call: _Call, start: GenerationStart) -> None:
        self._connection = connection
        self._call = call
        self._number = connection.number(call)
        self._finished = False
        self.session_id = start.session_id
        self.model = start.model
        self.version = start.version

    async def chunks(self) -> AsyncIterator[GeneratedChunk]:
        assert self._call.chunks is not None
        while True:
            item = await self._call.chunks.get()
            if isinstance(item, ServingError):
                self._finished = True
                raise item
            if item.finish_reason:
                self._finished = True
            yield item
            if item.finish_reason:
                return

    def cancel(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._connection.forget(self._call)
        self._connection.notify("cancel", (self._number,))


class RemoteRuntime:
    """InferenceApi over an EngineConnection (a front-end process of `--frontends N`)."""

    def __init__(self, connection: EngineConnection) -> None:
        self.connection = connection

    async def _call(self, method: str, *args: Any) -> Any:
        call = self.connection.submit(method, args)
        try:
            return await call.future
        except asyncio.CancelledError:
            self.connection.forget(call)
            raise

    async def open_session(
        self,
        model: str,
        version: int = 0,
        owner: str | None = None,
        session_id: str | None = None,
        options: StepOptions | None = None,
    ) -> SessionRef:
        result: SessionRef = await self._call("open_session", model, version, owner, session_id, options)
        return result

    async def resume(self, session_id: str, owner: str | None, options: StepOptions) -> SessionRef:
        result: SessionRef = await self._call("resume", session_id, owner, options)
        return result

    async def step(self, ref: SessionRef, tokens: Sequence[int]) -> Prediction:
        result: Prediction = await self._call("step", ref, list(tokens))
        return result

    async def step_once(
        self, session_id: str, owner: str | None, tokens: Sequence[int], options: StepOptions
    ) -> tuple[SessionRef, Prediction]:
        result: tuple[SessionRef, Prediction] = await self._call(
            "step_once", session_id, owner, list(tokens), options
        )
        return result

    async def reset(self, ref: SessionRef) -> None:
        await self._call("reset", ref)

    async def close(self, session_id: str, owner: str | None) -> None:
        await self._call("close", session_id, owner)

    async def release(self, ref: SessionRef, ended: bool) -> None:
        await self._call("release", ref, ended)

    async def generate(self, fields: GenerateRequestFields, owner: str | None) -> RemoteGeneration:
        call = self.connection.submit("generate", (fields, owner), stream=True)
        try:
            start: GenerationStart = await call.future
        except asyncio.CancelledError:
            number = self.connection.number(call)
            self.connection.forget(call)
            if number:
                self.connection.notify("cancel", (number,))
            raise
        return RemoteGeneration(self.connection, call, start)

    async def list_models(self) -> list[ModelInfo]:
        result: list[ModelInfo] = await self._call("list_models")
        return result

    async def get_model(self, name: str, version: int = 0) -> ModelInfo:
        result: ModelInfo = await self._call("get_model", name, version)
        return result

    async def health(self) -> HealthReport:
        result: HealthReport = await self._call("health")
        return result
