"""Admission control: when a model's batch queue (--max-queue-steps) or the session limit (refuse
mode) is full, new work is refused at once with RESOURCE_EXHAUSTED naming the limit, while the work
already admitted completes with correct predictions. Latencies are reported, not asserted tightly:
the 2-core test machine is shared."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from serving.clients.client import RnnserveClient
from tests.support.faults import (
    SlowBatches,
    WorkerGate,
    footprint,
    percentiles_ms,
    report,
    settles_to,
    wait_until,
)
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
VOCAB = 32
# A refused client waits this long before it tries again (as a gRPC retry policy would); retrying
# at once turns refusals into a storm that takes the event loop from the admitted requests.
RETRY_BACKOFF_S = 0.01


async def timed(call: Awaitable[Any]) -> tuple[float, Any]:
    """(seconds, result or the AioRpcError) of one call."""
    start = time.perf_counter()
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        return time.perf_counter() - start, error
    return time.perf_counter() - start, result


def test_a_full_batch_queue_refuses_new_work_at_once(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle], request: pytest.FixtureRequest
) -> None:
    """The lstm worker is held (as a long run would hold it) with 4 steps queued, its limit: the
    next steps, a Generate and a Stream chunk are refused while the held ones wait; another model
    and session creation are unaffected; once the worker goes on, the admitted steps complete and
    the refused sessions are as they were."""
    server = make_server(max_queue_steps=4)
    baseline = footprint(server)
    lstm = oracles["tiny-lstm"]

    async def scenario() -> tuple[list[float], list[float]]:
        async with RnnserveClient(server.target) as client:
            ids = [(await client.create_session("tiny-lstm")).session_id for _ in range(10)]
            for i, session_id in enumerate(ids):
                await client.step(session_id, [i])
            gru_session = (await client.create_session("tiny-gru")).session_id
            async with client.stream("tiny-lstm") as stream:  # opened before the queue fills
                with WorkerGate(server, "tiny-lstm") as gate:
                    admitted = [
                        asyncio.ensure_future(timed(client.step(s, [20], return_logits=True)))
                        for s in ids[:4]
                    ]
                    await asyncio.to_thread(gate.wait_for_backlog, 4)
                    refused = await asyncio.gather(*(timed(client.step(s, [20])) for s in ids[4:]))
                    for _, error in refused:
                        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == EXHAUSTED
                        assert (
                            "model 'tiny-lstm' version 1 has 4 requests waiting for a batch, its limit "
                            in (error.details() or "")
                        )
                        assert "(--max-queue-steps 4)" in (error.details() or "")
                    sessions_before = footprint(server).sessions
                    with pytest.raises(grpc.aio.AioRpcError) as generate:
                        async for _ in client.generate(
                            "tiny-lstm", prompt_tokens=[1], max_new_tokens=3, keep_session=True
                        ):
                            pass
                    assert generate.value.code() == EXHAUSTED
                    assert footprint(server).sessions == sessions_before, "a refused Generate left a session"
                    with pytest.raises(grpc.aio.AioRpcError) as chunk:
                        await stream.send([1])
                    assert chunk.value.code() == EXHAUSTED
                    await client.step(gru_session, [1])  # another model's queue is its own
                    extra = (
                        await client.create_session("tiny-lstm")
                    ).session_id  # sessions are not queued work
                    assert all(not task.done() for task in admitted), (
                        "admitted steps ran past the held worker"
                    )
            completed = await asyncio.gather(*admitted)
            for i, (_, step) in enumerate(completed):
                np.testing.assert_allclose(step.prediction.logits, lstm.last_logits([i, 20]), atol=1e-5)
            for i, session_id in enumerate(ids[4:], start=4):  # refused: state as before
                step = await client.step(session_id, [21], return_logits=True)
                assert step.prediction.position == 2
                np.testing.assert_allclose(step.prediction.logits, lstm.last_logits([i, 21]), atol=1e-5)
            # The refused chunk ended its stream; its session is kept for resumption, like any.
            for session_id in [*ids, gru_session, extra, stream.session_id]:
                await client.close_session(session_id)
            return [seconds for seconds, _ in refused], [seconds for seconds, _ in completed]

    refusals, admitted = run(scenario())
    assert settles_to(server, baseline) == baseline
    report(
        request.config,
        f"\nadmission (queue full, worker held): refusals {percentiles_ms(refusals)}; "
        f"admitted steps waited for the held worker: {percentiles_ms(admitted)}",
    )


@dataclass
class Tally:
    """One client's outcome in a load test."""

    ok: list[float] = field(default_factory=list)  # latencies of successful requests (s)
    refused: list[float] = field(default_factory=list)  # latencies of RESOURCE_EXHAUSTED answers
    problems: list[str] = field(default_factory=list)
    # (tokens accepted so far, position, logits) of each answer, checked after the run so that
    # the offline model's cost does not slow the clients down (and inflate the latencies).
    answers: list[tuple[tuple[int, ...], int, list[float]]] = field(default_factory=list)

    def check(self, oracle: Oracle) -> list[str]:
        wrong = [
            f"wrong prediction after {len(history)} tokens (position {position})"
            for history, position, logits in self.answers
            if position != len(history) or not np.allclose(logits, oracle.last_logits(history), atol=1e-5)
        ]
        return self.problems + wrong


async def stepping_client(
    client: RnnserveClient,
    model: str,
    attempts: int,
    seed: int,
    tally: Tally,
    until: asyncio.Event | None = None,
) -> None:
    """A closed loop of one-token Steps on its own session (`attempts` of them, or fewer once
    `until` is set); each answer is recorded with the tokens the server had accepted (a refused
    Step must not change the state), for Tally.check."""
    rng = random.Random(seed)
    session_id = (await client.create_session(model)).session_id
    history: list[int] = []
    for _ in range(attempts):
        if until is not None and until.is_set():
            break
        token = rng.randrange(VOCAB)
        seconds, result = await timed(client.step(session_id, [token], return_logits=True))
        if isinstance(result, grpc.aio.AioRpcError):
            if result.code() != EXHAUSTED:
                tally.problems.append(f"{result.code().name}: {result.details()}")
            tally.refused.append(seconds)
            await asyncio.sleep(RETRY_BACKOFF_S)
            continue
        history.append(token)
        tally.ok.append(seconds)
        tally.answers.append((tuple(history), result.prediction.position, list(result.prediction.logits)))
    await client.close_session(session_id)


@pytest.mark.parametrize("max_queue_steps", [8, 4096])
def test_a_saturated_queue_refuses_fast_and_admitted_steps_stay_correct(
    make_server: Callable[..., ServerThread],
    oracles: dict[str, Oracle],
    request: pytest.FixtureRequest,
    max_queue_steps: int,
) -> None:
    """32 clients in closed loops against batches of 4 of a model whose run takes 5 ms (a larger
    model). With a queue of 8 the excess is refused and the admitted steps wait for at most about
    three runs; with the default 4096 nothing is refused and every step waits behind the others.
    Either way everything admitted is answered correctly."""
    server = make_server(max_queue_steps=max_queue_steps, max_batch_size=4)
    baseline = footprint(server)
    slow = SlowBatches(server.registry.latest("tiny-lstm").engine, delay_s=0.005)
    tallies = [Tally() for _ in range(32)]

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            await asyncio.gather(
                *(stepping_client(client, "tiny-lstm", 30, seed, tally) for seed, tally in enumerate(tallies))
            )

    try:
        run(scenario())
    finally:
        slow.remove()
    problems = [p for t in tallies for p in t.check(oracles["tiny-lstm"])]
    ok = [s for t in tallies for s in t.ok]
    refused = [s for t in tallies for s in t.refused]
    assert not problems, problems[:5]
    if max_queue_steps < 32:
        assert refused, "the queue never filled: nothing was refused"
    else:
        assert not refused
    assert len(ok) + len(refused) == 32 * 30 and ok
    assert settles_to(server, baseline) == baseline
    report(
        request.config,
        f"\nadmission (32 closed loops, queue {max_queue_steps}, batch 4, 5 ms runs): {len(ok)} steps "
        f"admitted, all correct, {percentiles_ms(ok)}; {len(refused)} refused, {percentiles_ms(refused)}",
    )


def test_at_the_session_limit_new_sessions_are_refused_fast_and_admitted_ones_keep_working(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle], request: pytest.FixtureRequest
) -> None:
    """16 sessions (the limit, refuse mode) keep stepping while 300 attempts to open more, by every
    RPC that opens one, are refused; the admitted sessions' answers stay correct."""
    server = make_server(max_sessions=16, session_overflow="refuse")
    baseline = footprint(server)
    tallies = [Tally() for _ in range(16)]
    refusals: list[float] = []

    async def scenario() -> list[float]:
        async with RnnserveClient(server.target) as client:
            alone = Tally()  # admitted latency before the flood, for comparison
            await stepping_client(client, "tiny-gru", 30, 99, alone)

            flooded = asyncio.Event()

            async def admitted(seed: int, tally: Tally) -> None:
                model = "tiny-lstm" if seed % 2 else "tiny-gru"
                await stepping_client(client, model, 5000, seed, tally, until=flooded)

            async def flood() -> None:
                assert await asyncio.to_thread(wait_until, lambda: footprint(server).sessions == 16)
                openers = [
                    lambda: client.create_session("tiny-lstm"),
                    lambda: collect(client.generate("tiny-gru", prompt_tokens=[1], max_new_tokens=2)),
                    lambda: open_stream(client),
                ]
                for attempt in range(300):
                    seconds, result = await timed(openers[attempt % 3]())
                    assert isinstance(result, grpc.aio.AioRpcError), "a session over the limit was opened"
                    assert result.code() == EXHAUSTED
                    assert "the server holds its limit of 16 sessions" in (result.details() or "")
                    refusals.append(seconds)
                flooded.set()

            await asyncio.gather(flood(), *(admitted(seed, tally) for seed, tally in enumerate(tallies)))
            assert not alone.check(oracles["tiny-gru"])
            return alone.ok

    alone = run(scenario())
    problems = [
        p for seed, t in enumerate(tallies) for p in t.check(oracles["tiny-lstm" if seed % 2 else "tiny-gru"])
    ]
    assert not problems, problems[:5]
    assert all(not t.refused and t.ok for t in tallies)
    assert len(refusals) == 300
    assert settles_to(server, baseline) == baseline
    report(
        request.config,
        f"\nadmission (session limit 16, refuse): 300 opens refused, {percentiles_ms(refusals)}; "
        f"admitted steps during the flood {percentiles_ms([s for t in tallies for s in t.ok])}; "
        f"one session alone before it {percentiles_ms(alone)}",
    )


async def collect(responses: Any) -> list[Any]:
    return [response async for response in responses]


async def open_stream(client: RnnserveClient) -> None:
    async with client.stream("tiny-lstm"):
        pass
