"""Session ids, idle expiry, the session limit (LRU eviction or refusal), and session serialisation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from serving.clients.client import RnnserveClient
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run


def test_session_ids_are_random_128_bit_hex(server: ServerThread) -> None:
    async def scenario() -> list[str]:
        async with RnnserveClient(server.target) as client:
            ids = [(await client.create_session("tiny-gru")).session_id for _ in range(20)]
            for session_id in ids:
                await client.close_session(session_id)
            return ids

    ids = run(scenario())
    assert len(set(ids)) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)


def test_idle_sessions_expire_with_a_message(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(session_idle_timeout_s=1.0)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            idle = (await client.create_session("tiny-lstm")).session_id
            busy = (await client.create_session("tiny-lstm")).session_id
            for _ in range(13):  # keep one session in use past the timeout of the other
                await asyncio.sleep(0.1)
                await client.step(busy, [1])
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await client.step(idle, [1])
            assert expired.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"session {idle} expired after 1 s without requests" in (expired.value.details() or "")
            await client.step(busy, [2])

    run(scenario())


def test_the_sweep_frees_expired_sessions_without_lookups(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(session_idle_timeout_s=0.2)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            for _ in range(5):
                await client.create_session("tiny-gru")

    run(scenario())
    assert server.on_loop(len, server.runtime.sessions) == 5
    deadline = time.monotonic() + 5
    while server.on_loop(len, server.runtime.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.on_loop(len, server.runtime.sessions) == 0
    assert [reason for _, reason in server.observer.ended] == ["expired"] * 5
    model = server.registry.latest("tiny-gru")
    assert model.active_sessions == 0 and model.engine.pool.allocator.in_use == 0


def test_lru_eviction_at_the_session_limit(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    server = make_server(max_sessions=3, session_overflow="evict")

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            first, second, third = [(await client.create_session("tiny-lstm")).session_id for _ in range(3)]
            await client.step(first, [5])  # `second` is now the least recently used
            fourth = (await client.create_session("tiny-gru")).session_id
            with pytest.raises(grpc.aio.AioRpcError) as evicted:
                await client.step(second, [1])
            assert evicted.value.code() == grpc.StatusCode.NOT_FOUND
            assert (
                f"session {second} was evicted (least recently used) when the server reached its limit "
                f"of 3 sessions"
            ) in (evicted.value.details() or "")
            step = await client.step(first, [6], return_logits=True)
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-lstm"].last_logits([5, 6]), atol=1e-5
            )
            await client.step(third, [1])
            await client.step(fourth, [1])

    run(scenario())


def test_refusal_at_the_session_limit(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_sessions=2, session_overflow="refuse")

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            kept = [(await client.create_session("tiny-lstm")).session_id for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.create_session("tiny-lstm")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the server holds its limit of 2 sessions" in (refused.value.details() or "")
            for session_id in kept:
                await client.step(session_id, [1])
            await client.close_session(kept[0])
            await client.create_session("tiny-gru")  # room again

    run(scenario())


def test_concurrent_steps_on_one_session_take_turns(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    """Steps sent at once on one session run one after the other, each on the state the previous left."""

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session_id = (await client.create_session("tiny-gru")).session_id
            results = await asyncio.gather(
                *(client.step(session_id, [t], return_logits=True) for t in range(1, 21))
            )
            positions = sorted(r.prediction.position for r in results)
            assert positions == list(range(1, 21))
            # Whatever order they ran in, the final state is the 20 tokens in that order.
            order = [t for _, t in sorted((r.prediction.position, i + 1) for i, r in enumerate(results))]
            last = max(results, key=lambda r: r.prediction.position)
            np.testing.assert_allclose(
                last.prediction.logits, oracles["tiny-gru"].last_logits(order), atol=1e-5
            )

    run(scenario())


def test_closing_a_session_frees_its_slot_for_reuse(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            used = (await client.create_session("tiny-lstm")).session_id
            await client.step(used, [9, 9, 9])
            await client.close_session(used)
            fresh = (await client.create_session("tiny-lstm")).session_id
            step = await client.step(fresh, [1], return_logits=True)
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-lstm"].last_logits([1]), atol=1e-5
            )
            await client.close_session(fresh)

    run(scenario())
