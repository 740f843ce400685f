"""`RemoteRuntime`: the InferenceApi of a front-end process, answered by the engine core over IPC.

Calls made during one event-loop iteration leave in one frame (the flush runs at the end of the
iteration, with `call_soon`, so a lone call waits for no timer and a busy loop writes one frame
per iteration, not one per call). Answers come back in batches likewise (serving.engine.messages).

The engine core may die. Its socket then closes: every call in flight fails at once with
UNAVAILABLE, and so does every new call until the connection is back (the heartbeat reconnects
every `heartbeat_s`). A core that stops answering without closing (hung) is treated the same
once a ping has waited `lost_after_s`. A call is never sent twice, so none runs later on a
restarted core; clients resume their sessions by id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

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
    number: int = 0


class _CoreProtocol(asyncio.Protocol):
    def __init__(self, connection: EngineConnection) -> None:
        self.connection = connection
        self.reader = messages.FrameReader()

    def data_received(self, data: bytes) -> None:
        for entries in self.reader.feed(data):
            self.connection._received(entries)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection._disconnected(self)


class EngineConnection:
    """The front end's end of the IPC channel: numbered calls, batched per loop iteration."""

    def __init__(self, path: str, heartbeat_s: float = 0.25, lost_after_s: float = 2.0) -> None:
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _CoreProtocol | None = None
        self._calls: dict[int, _Call] = {}
        self._outbox: list[tuple[int, str, tuple[Any, ...]]] = []
        self._numbers = itertools.count(1)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._ping_sent: float | None = None  # when the unanswered ping left
        self._closing = False
        self.frames_sent = 0  # frames written (each carries one or more calls)
        self.calls_sent = 0

    async def start(self, wait_s: float = 0.0) -> None:
        """Connect (retrying for up to `wait_s` while the core starts) and start the heartbeat."""
        deadline = time.monotonic() + wait_s
        while not await self._connect() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _connect(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_unix_connection(lambda: _CoreProtocol(self), self.path)
        except OSError:
            return False
        self._transport, self._protocol = transport, protocol
        self._ping_sent = None
        log.info("connected to the engine core at %s", self.path)
        return True

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
        self._fail_all(UnavailableError("the front end is shutting down"))

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def _unavailable(self) -> UnavailableError:
        return UnavailableError(
            "the engine core is not answering (it is restarting); retry, resuming sessions by id"
        )

    def submit(self, method: str, args: tuple[Any, ...], stream: bool = False) -> _Call:
        """Queue a call for this iteration's frame; its answer settles the returned call's future."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call = _Call(method, future, asyncio.Queue() if stream else None)
        if self._transport is None:
            future.set_exception(self._unavailable())
            return call
        call.number = next(self._numbers)
        self._calls[call.number] = call
        self._queue(call.number, method, args)
        return call

    def notify(self, method: str, args: tuple[Any, ...]) -> None:
        """Send a call that has no answer (e.g. cancel)."""
        if self._transport is not None:
            self._queue(0, method, args)

    def forget(self, call: _Call) -> None:
        """Stop delivering to a call whose caller went away."""
        self._calls.pop(call.number, None)

    def _queue(self, number: int, method: str, args: tuple[Any, ...]) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((number, method, args))

    def _flush(self) -> None:
        entries, self._outbox = self._outbox, []
        if not entries:
            return
        if self._transport is None:  # lost since the calls were queued: they failed already
            return
        self.frames_sent += 1
        self.calls_sent += len(entries)
        self._transport.write(messages.encode_frame(entries))

    def _received(self, entries: list[tuple[int, int, Any]]) -> None:
        self._ping_sent = None  # any answer shows the core is alive
        calls = self._calls
        for number, kind, payload in entries:
            call = calls.get(number)
            if call is None:
                continue  # a call whose caller went away, or a ping
            if kind == RESULT:
                if call.chunks is None:
                    del calls[number]
                if not call.future.done():
                    call.future.set_result(payload)
            elif kind == CHUNK:
                assert call.chunks is not None, "chunks answer a Generate"
                call.chunks.put_nowait(payload)
                if payload.finish_reason:
                    del calls[number]
            elif kind == ERROR:
                self._settle_error(number, messages.decode_error(payload))

    def _settle_error(self, number: int, error: ServingError) -> None:
        call = self._calls.pop(number, None)
        if call is None:
            return
        if not call.future.done():
            call.future.set_exception(error)
        elif call.chunks is not None:
            call.chunks.put_nowait(error)

    def _fail_all(self, error: ServingError) -> None:
        for number in list(self._calls):
            self._settle_error(number, error)

    def _disconnected(self, protocol: _CoreProtocol) -> None:
        if protocol is not self._protocol:
            return
        self._transport = self._protocol = None
        self._outbox.clear()
        if not self._closing:
            log.warning("lost the engine core: failing its %d calls in flight", len(self._calls))
        self._fail_all(self._unavailable())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self._transport is None:
                await self._connect()
                continue
            now = time.monotonic()
            if self._ping_sent is not None and now - self._ping_sent > self.lost_after_s:
                log.warning("the engine core has not answered for %.1f s", now - self._ping_sent)
                self._transport.abort()  # -> _disconnected
                continue
            if self._ping_sent is None:
                self._ping_sent = now
                self._queue(messages.PING_CALL, "ping", ())


class RemoteGeneration:
    """A GenerationStream whose tokens come from the engine core."""

    def __init__(self, connection: EngineConnection, call: _Call, start: GenerationStart) -> None:
        self._connection = connection
        self._call = call
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
        self._connection.notify("cancel", (self._call.number,))


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
        # Protobuf containers become lists: only plain values cross.
        fields = dataclasses.replace(
            fields, prompt_tokens=list(fields.prompt_tokens), stop_tokens=list(fields.stop_tokens)
        )
        call = self.connection.submit("generate", (fields, owner), stream=True)
        try:
            start: GenerationStart = await call.future
        except asyncio.CancelledError:
            self.connection.forget(call)
            self.connection.notify("cancel", (call.number,))
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
