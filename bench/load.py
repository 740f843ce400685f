"""The benchmark's clients: closed-loop grpc.aio load on a server's Stream, Generate and session RPCs.

Every client here is a coroutine on the bench's one event loop (grpc.aio: a synchronous client
caps near 3-5 k messages/s on this machine, below what the server can do). A load point runs in
three phases on a shared clock: all clients connect (open their streams), then run for `warmup`
seconds uncounted, then for `duration` seconds counted; a reply counts when it arrives inside
the counted window. Each client keeps exactly one request in flight (closed loop), so N streams
means N requests outstanding. Every call carries a deadline, so a stuck server fails the bench
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from bench.stats import LatencyStats, LoadPoint
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc

# Distinct request messages each client cycles through (random tokens, built once).
REQUEST_CYCLE = 64
# Slack added to every call's deadline beyond the phase it runs in.
DEADLINE_SLACK_S = 60.0


class LoadError(RuntimeError):
    """The server under load answered wrongly (an error status, a wrong event, an early end)."""


@dataclass(frozen=True)
class Window:
    """The shared clock of a load point, in time.perf_counter_ns units."""

    counted_from_ns: int  # end of warm-up
    counted_until_ns: int  # end of the load point

    @classmethod
    def starting_now(cls, warmup_s: float, duration_s: float) -> Window:
        start = time.perf_counter_ns() + int(warmup_s * 1e9)
        return cls(start, start + int(duration_s * 1e9))

    @property
    def seconds(self) -> float:
        return (self.counted_until_ns - self.counted_from_ns) / 1e9

    def counts(self, at_ns: int) -> bool:
        return self.counted_from_ns <= at_ns <= self.counted_until_ns


class _StartLine:
    """Holds N clients until all are connected, then starts the shared clock (a barrier)."""

    def __init__(self, clients: int, warmup_s: float, duration_s: float) -> None:
        self._waiting = clients
        self._ready = asyncio.Event()
        self._warmup_s = warmup_s
        self._duration_s = duration_s
        self.window: Window | None = None

    async def arrive(self) -> Window:
        self._waiting -= 1
        if self._waiting == 0:
            self.window = Window.starting_now(self._warmup_s, self._duration_s)
            self._ready.set()
        await self._ready.wait()
        assert self.window is not None  # set before the event
        return self.window


@dataclass
class _Tally:
    """What the clients of one load point saw in the counted window."""

    messages: int = 0
    tokens: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    first_reply_ns: list[int] = field(default_factory=list)


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def _token_requests(vocab_size: int, tokens_per_message: int, seed: int) -> list[pb.StreamRequest]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(REQUEST_CYCLE, tokens_per_message))
    return [pb.StreamRequest(chunk=pb.TokenChunk(tokens=row.tolist())) for row in ids]


async def _gather_clients(clients: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run the clients together; if one fails, cancel the others and raise its error."""
    tasks = [asyncio.create_task(client()) for client in clients]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stream_load(
    channel: grpc.aio.Channel,
    *,
    model: str,
    vocab_size: int,
    streams: int,
    tokens_per_message: int,
    warmup_s: float,
    duration_s: float,
    seed: int,
) -> LoadPoint:
    """STREAMS concurrent Stream calls, each sending chunks of TOKENS_PER_MESSAGE tokens in a loop.

    Latency is per message: from writing a chunk to reading its prediction.
    """
    stub = pb_grpc.InferenceStub(channel)
    start_line = _StartLine(streams, warmup_s, duration_s)
    tally = _Tally()
    deadline_s = warmup_s + duration_s + DEADLINE_SLACK_S

    async def client(index: int) -> None:
        requests = _token_requests(vocab_size, tokens_per_message, seed + index)
        call = stub.Stream(timeout=deadline_s)
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=model)))
        opened = await call.read()
        # read() gives grpc.aio.EOF, not a StreamResponse, when the server ends the call.
        if not isinstance(opened, pb.StreamResponse) or opened.event != pb.STREAM_EVENT_OPENED:
            raise LoadError(f"stream {index}: expected STREAM_EVENT_OPENED, got {opened!r}")
        window = await start_line.arrive()
        sent_count = 0
        while True:
            sent = time.perf_counter_ns()
            if sent >= window.counted_until_ns:
                break
            await call.write(requests[sent_count % REQUEST_CYCLE])
            reply = await call.read()
            received = time.perf_counter_ns()
            sent_count += 1
            if not isinstance(reply, pb.StreamResponse) or reply.event != pb.STREAM_EVENT_PREDICTION:
                raise LoadError(f"stream {index}: expected a prediction, got {reply!r}")
            if window.counts(received):
                tally.messages += 1
                tally.latencies_ns.append(received - sent)
        await call.write(pb.StreamRequest(control=pb.CONTROL_END))
        await call.done_writing()
        # STREAM_EVENT_ENDED, then the end of the call (read() and `async for` cannot be mixed).
        while isinstance(await call.read(), pb.StreamResponse):
            pass

    await _run_clients(streams, client)
    return LoadPoint(
        streams=streams,
        seconds=_window_seconds(start_line),
        messages=tally.messages,
        tokens=tally.messages * tokens_per_message,
        latency=LatencyStats.from_ns(tally.latencies_ns),
    )


async def generate_load(
    channel: grpc.aio.Channel,
    *,
    model: str,
    vocab_size: int,
    generations: int,
    prompt_tokens: int,
    max_new_tokens: int,
    warmup_s: float,
    duration_s: float,
    seed: int,
) -> tuple[LoadPoint, LatencyStats | None]:
    """GENERATIONS concurrent Generate calls, each starting a new one when the last finishes.

    Returns the load point (tokens = generated tokens received in the window; latency = the gap
    between successive replies of a call) and the time to the first reply of each call (None
    when no call had replied).
    A call still running when the window closes is cancelled.
    """
    stub = pb_grpc.InferenceStub(channel)
    start_line = _StartLine(generations, warmup_s, duration_s)
    tally = _Tally()
    deadline_s = warmup_s + duration_s + DEADLINE_SLACK_S
    rng = np.random.default_rng(seed)

    async def client(index: int) -> None:
        window = await start_line.arrive()
        calls = 0
        while time.perf_counter_ns() < window.counted_until_ns:
            request = pb.GenerateRequest(
                model=model,
                prompt_tokens=rng.integers(0, vocab_size, size=prompt_tokens).tolist(),
                max_new_tokens=max_new_tokens,
                sampling=pb.SamplingOptions(temperature=1.0, seed=seed + index * 1_000_003 + calls),
            )
            calls += 1
            started = previous = time.perf_counter_ns()
            call = stub.Generate(request, timeout=deadline_s)
            async for reply in call:
                received = time.perf_counter_ns()
                if previous == started:
                    # Every call's first reply counts, warm-up included: the calls that start
                    # together at the start line may all answer before the window opens.
                    tally.first_reply_ns.append(received - started)
                if window.counts(received):
                    tally.messages += 1
                    tally.tokens += len(reply.tokens)
                    tally.latencies_ns.append(received - previous)
                previous = received
                if received >= window.counted_until_ns:
                    call.cancel()
                    break

    await _run_clients(generations, client)
    point = LoadPoint(
        streams=generations,
        seconds=_window_seconds(start_line),
        messages=tally.messages,
        tokens=tally.tokens,
        latency=LatencyStats.from_ns(tally.latencies_ns),
    )
    return point, LatencyStats.from_ns(tally.first_reply_ns) if tally.first_reply_ns else None


async def create_sessions(channel: grpc.aio.Channel, model: str, count: int, concurrency: int) -> list[str]:
    """COUNT sessions through CreateSession, CONCURRENCY calls in flight; returns their ids."""
    stub = pb_grpc.InferenceStub(channel)
    session_ids: list[str] = []
    request = pb.CreateSessionRequest(model=model)

    async def client(_: int) -> None:
        while len(session_ids) < count:
            # Claimed before the await, so the clients together make exactly COUNT sessions.
            session_ids.append("")
            slot = len(session_ids) - 1
            reply = await stub.CreateSession(request, timeout=DEADLINE_SLACK_S)
            session_ids[slot] = reply.session_id

    await _run_clients(min(concurrency, count), client)
    return session_ids


async def step_sessions(
    channel: grpc.aio.Channel, session_ids: list[str], vocab_size: int, concurrency: int
) -> None:
    """One Step of one token on each session, CONCURRENCY calls in flight."""
    stub = pb_grpc.InferenceStub(channel)
    next_index = 0

    async def client(index: int) -> None:
        nonlocal next_index
        while next_index < len(session_ids):
            session_id = session_ids[next_index]
            next_index += 1
            await stub.Step(
                pb.StepRequest(session_id=session_id, tokens=[(next_index + index) % vocab_size]),
                timeout=DEADLINE_SLACK_S,
            )

    await _run_clients(min(concurrency, len(session_ids)), client)


async def close_sessions(channel: grpc.aio.Channel, session_ids: list[str], concurrency: int) -> None:
    """CloseSession on each id, CONCURRENCY calls in flight."""
    stub = pb_grpc.InferenceStub(channel)
    pending = list(session_ids)

    async def client(_: int) -> None:
        while pending:
            await stub.CloseSession(
                pb.CloseSessionRequest(session_id=pending.pop()), timeout=DEADLINE_SLACK_S
            )

    await _run_clients(min(concurrency, len(session_ids)), client)


async def _run_clients(count: int, client: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    try:
        await _gather_clients([functools.partial(client, index) for index in range(count)])
    except grpc.aio.AioRpcError as error:
        raise LoadError(f"the server answered {error.code().name}: {error.details()}") from None


def _window_seconds(start_line: _StartLine) -> float:
    if start_line.window is None:
        raise LoadError("no client reached the start line")
    return start_line.window.seconds
