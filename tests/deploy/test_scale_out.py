"""Scale-out with real nginx and redis-server on loopback: three `rnnserve serve` replicas behind
nginx (deploy/nginx/nginx.conf, rewritten only for loopback), session state in Redis.

One cluster serves the module. Replicas 0 and 1 save a session's state after every request
(answering only after the save); replica 2 every SAVE_EVERY requests. nginx's access log says
which replica took each call. Every prediction is checked against the exported model run
offline on the session's whole token history (the oracle), so "equal to a single server's" and
"resumed from the saved state" are checked on the numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient
from serving.state.records import SessionRecord, decode_record
from tests.support.cluster import Cluster, Route, missing_services
from tests.support.models import ALPHABET, Oracle
from tests.support.redis_server import RedisServer
from tests.support.servers import run

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(missing_services() is not None, reason=missing_services() or ""),
]

MODEL = "tiny-lstm"
SAVE_EVERY = 3  # replica 2's --state-save-every-steps
EVERY_STEP = (0, 1)  # the replicas that save after every request
CALL_TIMEOUT_S = 10.0
VOCAB_SIZE = len(set(ALPHABET))  # the tiny models' character vocabulary


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(
    model_repository: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    every_step = {"state-save-every-steps": "1", "state-save-every-s": "0"}
    every_few = {"state-save-every-steps": str(SAVE_EVERY), "state-save-every-s": "0"}
    running = Cluster(
        tmp_path_factory.mktemp("cluster"),
        model_repository,
        redis_server,
        [every_step, every_step, every_few],
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def oracle(model_repository: Path) -> Oracle:
    return Oracle(model_repository / MODEL / "1")


class Conversation:
    """One session as its client sees it: the tokens it sent, and predictions checked against them."""

    def __init__(self, session_id: str, oracle: Oracle, seed: int) -> None:
        self.session_id = session_id
        self.oracle = oracle
        self.history: list[int] = []
        self.rng = np.random.default_rng(seed)

    def tokens(self, count: int = 1) -> list[int]:
        return [int(token) for token in self.rng.integers(0, VOCAB_SIZE, count)]

    def check(self, prediction: pb.Prediction, history: list[int]) -> None:
        """The prediction is the model's after exactly `history` (which becomes the history)."""
        assert prediction.position == len(history), (
            f"session {self.session_id}: position {prediction.position}, expected {len(history)}"
        )
        np.testing.assert_allclose(prediction.logits, self.oracle.last_logits(history), rtol=1e-5, atol=1e-5)
        self.history = history

    async def step(self, client: RnnserveClient, count: int = 1) -> pb.StepResponse:
        tokens = self.tokens(count)
        reply = await client.step(self.session_id, tokens, return_logits=True)
        self.check(reply.prediction, self.history + tokens)
        return reply


async def open_conversations(
    client: RnnserveClient, oracle: Oracle, count: int, seed: int
) -> list[Conversation]:
    opened = [await client.create_session(MODEL) for _ in range(count)]
    return [Conversation(reply.session_id, oracle, seed + index) for index, reply in enumerate(opened)]


def replica_of(cluster: Cluster, routes: list[Route], session_id: str) -> int:
    """The replica that answered the session's last call."""
    last = [route for route in routes if route.session_id == session_id][-1]
    return cluster.index_of(last.port)


def saved_record(redis_server: RedisServer, session_id: str) -> SessionRecord | None:
    with redis.Redis.from_url(redis_server.url) as client:
        value = client.get(f"rnnserve:session:{session_id}")
    return None if value is None else decode_record(value)


def wait_for_saved(redis_server: RedisServer, session_id: str, position: int, timeout: float = 5.0) -> None:
    """Wait until Redis holds the session at `position` (background saves land just after a reply)."""
    deadline = time.monotonic() + timeout
    while True:
        record = saved_record(redis_server, session_id)
        if record is not None and record.position == position:
            return
        assert time.monotonic() < deadline, f"session {session_id} is saved at {record and record.position}"
        time.sleep(0.02)


def test_sessions_spread_over_replicas_and_each_session_sticks_to_its_own(
    cluster: Cluster, oracle: Oracle
) -> None:
    before = [cluster.active_sessions(index) for index in range(3)]
    calls_before = len(cluster.routes())

    async def converse() -> list[Conversation]:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            conversations = await open_conversations(client, oracle, 40, seed=100)
            for _ in range(2):
                for conversation in conversations:
                    await conversation.step(client)
            # A Stream opens its session with the id as metadata: unary calls of it follow it.
            streamed = Conversation("", oracle, seed=99)
            async with client.stream(MODEL, return_logits=True) as stream:
                streamed.session_id = stream.session_id
                for _ in range(3):
                    tokens = streamed.tokens()
                    streamed.check(await stream.send(tokens), streamed.history + tokens)
            await streamed.step(client)
            return [*conversations, streamed]

    conversations = run(converse())
    # 40 x (create + 2 steps), and the stream + its step.
    routes = cluster.routes(count_at_least=calls_before + 122)[calls_before:]
    ports: dict[str, set[int]] = {}
    for route in routes:
        assert route.session_id is not None, f"{route.method} went through nginx without x-session-id"
        assert len(route.ports) == 1, f"nginx had to try {route.ports} for {route}"
        ports.setdefault(route.session_id, set()).add(route.port)
    assert set(ports) == {conversation.session_id for conversation in conversations}
    assert all(len(seen) == 1 for seen in ports.values()), {s: p for s, p in ports.items() if len(p) > 1}
    held = [0, 0, 0]
    for (port,) in ports.values():
        held[cluster.index_of(port)] += 1
    assert all(held), f"sessions per replica: {held}"
    assert [cluster.active_sessions(index) - before[index] for index in range(3)] == held

    async def close_all() -> None:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            for conversation in conversations:
                await client.close_session(conversation.session_id)

    run(close_all())
    assert [cluster.active_sessions(index) for index in range(3)] == before
    for conversation in conversations:
        assert saved_record(cluster.redis, conversation.session_id) is None, "a closed session stays in Redis"

    async def step_closed() -> grpc.StatusCode:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await client.step(conversations[0].session_id, [1])
        return gone.value.code()

    assert run(step_closed()) == grpc.StatusCode.NOT_FOUND


async def conversations_on(
    cluster: Cluster, client: RnnserveClient, oracle: Oracle, replicas: tuple[int, ...], count: int, seed: int
) -> list[Conversation]:
    """`count` sessions opened through nginx that landed on one of `replicas` (bounded tries)."""
    found: list[Conversation] = []
    for attempt in range(60):
        calls_before = len(cluster.routes())
        (conversation,) = await open_conversations(client, oracle, 1, seed + attempt)
        await conversation.step(client)
        routes = cluster.routes(count_at_least=calls_before + 2)  # CreateSession and Step
        if replica_of(cluster, routes, conversation.session_id) in replicas:
            found.append(conversation)
            if len(found) == count:
                return found
        else:
            await client.close_session(conversation.session_id)
    raise AssertionError(f"60 sessions opened through nginx, fewer than {count} on replicas {replicas}")


def test_serving_goes_on_while_redis_is_down_and_recovery_returns_with_it(
    cluster: Cluster, oracle: Oracle
) -> None:
    redis_server = cluster.redis

    async def converse() -> None:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            conversations = await conversations_on(cluster, client, oracle, EVERY_STEP, 3, seed=200)
            for conversation in conversations:
                wait_for_saved(redis_server, conversation.session_id, len(conversation.history))
            redis_server.stop()
            started = time.monotonic()
            for _ in range(2):
                for conversation in conversations:
                    await conversation.step(client)
            (opened,) = await open_conversations(client, oracle, 1, seed=299)
            await opened.step(client)
            # Redis refuses connections: each call fails fast (the store's circuit breaker).
            assert time.monotonic() - started < 5.0

            # A replica that does not hold a session cannot look it up now, and says why.
            routes = cluster.routes()
            holder = replica_of(cluster, routes, conversations[0].session_id)
            other = cluster.replicas[(holder + 1) % 3]
            async with RnnserveClient(other.address, timeout=CALL_TIMEOUT_S) as direct:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await direct.step(conversations[0].session_id, [1])
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "cannot be looked up now" in (refused.value.details() or "")

            redis_server.start()  # empty: Redis keeps nothing on disk
            # The replicas probe Redis again within a second; every step saves from then on.
            deadline = time.monotonic() + 10.0
            for conversation in conversations:
                while True:
                    await conversation.step(client)
                    record = saved_record(redis_server, conversation.session_id)
                    if record is not None and record.position == len(conversation.history):
                        break
                    assert time.monotonic() < deadline, "the replicas did not save to Redis again"
                    await asyncio.sleep(0.1)

            # Recovery works again: another replica takes a session over from its saved state.
            # That replica's circuit breaker last tripped on the refused lookup above; it lets a
            # probe through at most a second after its last failure, so its first lookup may
            # still be refused (and changes nothing) while the slower, loaded test races it.
            for conversation in conversations:
                holder = replica_of(cluster, cluster.routes(), conversation.session_id)
                other = cluster.replicas[(holder + 1) % 3]
                async with RnnserveClient(other.address, timeout=CALL_TIMEOUT_S) as direct:
                    while True:
                        try:
                            await conversation.step(direct)
                            break
                        except grpc.aio.AioRpcError as error:
                            lockout = "cannot be looked up now" in (error.details() or "")
                            if error.code() != grpc.StatusCode.NOT_FOUND or not lockout:
                                raise
                            assert time.monotonic() < deadline, "recovery did not return with Redis"
                            await asyncio.sleep(0.1)

    run(converse())


def test_killed_replica_sessions_resume_elsewhere_from_their_last_save(
    cluster: Cluster, oracle: Oracle
) -> None:
    victim = 2  # saves every SAVE_EVERY requests
    redis_server = cluster.redis

    async def converse() -> None:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            conversations = await conversations_on(cluster, client, oracle, (victim,), 3, seed=300)
            # 1 step so far each; make it 5, 2 and 3 steps: saved at 3, 0 (open) and 3.
            for conversation, more in zip(conversations, (4, 1, 2), strict=True):
                for _ in range(more):
                    await conversation.step(client)
            saved_at = [len(c.history) // SAVE_EVERY * SAVE_EVERY for c in conversations]
            for conversation, position in zip(conversations, saved_at, strict=True):
                wait_for_saved(redis_server, conversation.session_id, position)

            cluster.replicas[victim].kill()
            for conversation, position in zip(conversations, saved_at, strict=True):
                tokens = conversation.tokens()
                reply = await client.step(conversation.session_id, tokens, return_logits=True)
                # The steps after the last save are lost; the state is the saved one, exactly.
                conversation.check(reply.prediction, conversation.history[:position] + tokens)
                await conversation.step(client)
            routes = cluster.routes()
            for conversation in conversations:
                assert replica_of(cluster, routes, conversation.session_id) != victim

    try:
        run(converse())
    finally:
        restore_cluster(cluster, victim)


def test_killed_replica_sessions_resume_elsewhere_without_losing_a_step(
    cluster: Cluster, oracle: Oracle
) -> None:
    victim = 0  # saves after every request, before answering it

    async def converse() -> None:
        async with RnnserveClient(cluster.address, timeout=CALL_TIMEOUT_S) as client:
            conversations = await conversations_on(cluster, client, oracle, (victim,), 3, seed=400)
            for _ in range(3):
                for conversation in conversations:
                    await conversation.step(client)
            streamed = conversations[0]  # resumed on a Stream after the kill

            cluster.replicas[victim].kill()
            calls_before = len(cluster.routes())
            for conversation in conversations[1:]:
                await conversation.step(client)  # nginx moves on to another replica, which restores
                await conversation.step(client)
            async with client.stream(session_id=streamed.session_id, return_logits=True) as stream:
                for _ in range(2):
                    tokens = streamed.tokens()
                    streamed.check(await stream.send(tokens), streamed.history + tokens)
            await streamed.step(client)
            routes = cluster.routes(count_at_least=calls_before + 6)
            for conversation in conversations:
                after = [
                    route for route in routes[calls_before:] if route.session_id == conversation.session_id
                ]
                assert after and all(cluster.index_of(route.port) != victim for route in after)
                assert len({route.port for route in after}) == 1, "a moved session must stay where it moved"

    try:
        run(converse())
    finally:
        restore_cluster(cluster, victim)


def restore_cluster(cluster: Cluster, victim: int) -> None:
    """Bring the killed replica back on its port, and nginx with no memory of its failure."""
    cluster.replicas[victim].restart()
    assert cluster.nginx is not None
    cluster.nginx.restart()


@pytest.mark.slow
def test_the_scale_bench_measures_every_configuration(tmp_path: Path) -> None:
    from bench import cli as bench

    tiny = ["--arch", "lstm", "--vocab-size", "16", "--embedding-size", "8", "--hidden-size", "16"]
    argv = [*tiny, "--scenarios", "scale", "--streams", "1,4", "--duration", "0.3", "--warmup", "0.05"]
    assert bench.main([*argv, "--out", str(tmp_path), "--no-png"]) == 0
    section = json.loads((tmp_path / "latest.json").read_text())["scenarios"]["scale"]
    assert set(section) == {
        "one-server",
        "one-server-nginx",
        "3-replicas-nginx",
        "one-server-save-every-step",
        "one-server-save-every-16",
    }
    for label, figures in section.items():
        assert [point["streams"] for point in figures["sweep"]] == [1, 4], label
        assert all(point["messages"] > 0 for point in figures["sweep"]), label
    every_step = section["one-server-save-every-step"]
    # Every answered step was saved (warm-up steps too), and far fewer every 16 steps.
    assert every_step["redis_sets"] >= sum(point["messages"] for point in every_step["sweep"])
    every_16 = section["one-server-save-every-16"]
    assert every_16["redis_sets"] < sum(point["messages"] for point in every_16["sweep"]) / 4
