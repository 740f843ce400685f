"""Session spill and recovery through a real redis-server, with in-process servers as replicas.

Two servers on one Redis stand for two replicas; a call made straight to the second one is what
nginx does when the first is gone. Each test uses its own key namespace on one Redis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from contract.session_id import SESSION_ID_KEY, new_session_id
from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient, error_info
from serving.state.records import SessionRecord, decode_record
from serving.state.redis_store import RedisStateStore, RedisStoreOptions
from tests.support.models import ALPHABET, Oracle, export_tiny_model
from tests.support.redis_server import REDIS_SKIP_REASON, RedisServer, free_port, redis_server_path
from tests.support.servers import ServerThread, run

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason=REDIS_SKIP_REASON)

MODEL = "tiny-lstm"
VOCAB_SIZE = len(set(ALPHABET))
# No saves by count or time unless a test asks: what is saved then comes from eviction, open, shutdown.
NO_PERIODIC = {"state_save_every_steps": 0, "state_save_every_s": 0.0}
# A loaded CI machine can stall a process for longer than the default 0.25 s; a Redis that is
# down refuses connections at once on loopback anyway.
REDIS_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)


@pytest.fixture
def replica(
    make_server: Callable[..., ServerThread], redis_server: RedisServer, namespace: str
) -> Callable[..., ServerThread]:
    """A server on the test's Redis namespace (more settings as keyword arguments)."""

    def make(repository: Path | None = None, **overrides: Any) -> ServerThread:
        settings = {
            "redis_url": redis_server.url,
            "redis_namespace": namespace,
            "redis_timeout_s": REDIS_TIMEOUT_S,
            **overrides,
        }
        return make_server(repository, **settings)

    return make


@pytest.fixture(scope="module")
def oracle(model_repository: Path) -> Oracle:
    return Oracle(model_repository / MODEL / "1")


def saved(redis_server: RedisServer, namespace: str, session_id: str) -> SessionRecord | None:
    with redis.Redis.from_url(redis_server.url) as client:
        value = client.get(f"{namespace}:session:{session_id}")
    return None if value is None else decode_record(value)


def wait_saved_at(redis_server: RedisServer, namespace: str, session_id: str, position: int) -> SessionRecord:
    deadline = time.monotonic() + 5.0
    while True:
        record = saved(redis_server, namespace, session_id)
        if record is not None and record.position == position:
            return record
        assert time.monotonic() < deadline, f"saved at {record and record.position}, expected {position}"
        time.sleep(0.02)


class History:
    """A session's tokens; each prediction is checked against the offline model on all of them."""

    def __init__(self, session_id: str, oracle: Oracle, seed: int = 0) -> None:
        self.session_id = session_id
        self.oracle = oracle
        self.tokens: list[int] = []
        self.rng = np.random.default_rng(seed)

    async def step(self, client: RnnserveClient, restored_at: int | None = None) -> pb.StepResponse:
        """One token. `restored_at`: the position the server's state is expected to be at."""
        token = int(self.rng.integers(0, VOCAB_SIZE))
        reply = await client.step(self.session_id, [token], return_logits=True)
        kept = len(self.tokens) if restored_at is None else restored_at
        history = [*self.tokens[:kept], token]
        assert reply.prediction.position == len(history)
        np.testing.assert_allclose(reply.prediction.logits, self.oracle.last_logits(history), atol=1e-5)
        self.tokens = history
        return reply


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("state_on_device", [False, True], ids=["host-pool", "device-pool"])
def test_an_evicted_session_is_spilled_and_comes_back_on_its_next_call(
    replica: Callable[..., ServerThread],
    redis_server: RedisServer,
    namespace: str,
    oracle: Oracle,
    state_on_device: bool,
) -> None:
    server = replica(max_sessions=2, state_on_device=state_on_device, **NO_PERIODIC)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            first = History((await client.create_session(MODEL)).session_id, oracle, 1)
            second = History((await client.create_session(MODEL)).session_id, oracle, 2)
            for _ in range(3):
                await first.step(client)
            await second.step(client)
            await second.step(client)
            third = History((await client.create_session(MODEL)).session_id, oracle, 3)  # evicts `first`
            wait_saved_at(redis_server, namespace, first.session_id, 3)
            await third.step(client)
            await first.step(client)  # restored, evicting `second`
            await second.step(client)  # restored, evicting `third`
            await third.step(client)

    run(scenario())
    assert server.observer.ended.count((MODEL, "evicted")) == 4


class OwnedServerThread(ServerThread):
    """A test server that names each caller by its `x-test-owner` metadata, as auth would."""

    async def _start(self) -> tuple[Any, int]:
        from serving.frontend.server import create_server

        server, port = await create_server(
            self.settings, self.registry, observer=self.observer, identity=owner
        )
        await server.start()
        return server, port


def owner(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("x-test-owner")


@pytest.fixture
def owned_servers(
    model_repository: Path, redis_server: RedisServer, namespace: str
) -> Iterator[list[ServerThread]]:
    settings = {
        "redis_url": redis_server.url,
        "redis_namespace": namespace,
        "redis_timeout_s": REDIS_TIMEOUT_S,
        "state_save_every_steps": 1,
    }
    servers = [OwnedServerThread(model_repository, **settings) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def test_another_replica_restores_a_session_only_for_its_owner(
    owned_servers: list[ServerThread], oracle: Oracle
) -> None:
    first, second = owned_servers

    async def scenario() -> None:
        alice = (("x-test-owner", "alice"),)
        bob = (("x-test-owner", "bob"),)
        async with RnnserveClient(first.target, metadata=alice) as client:
            session = History((await client.create_session(MODEL)).session_id, oracle)
            await session.step(client)
            await session.step(client)
        async with RnnserveClient(second.target, metadata=bob) as intruder:
            error = await rpc_error(intruder.step(session.session_id, [1]))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error.details() == f"session {session.session_id!r} not found"  # nothing more said
        async with RnnserveClient(second.target, metadata=alice) as client:
            await session.step(client)

    run(scenario())


def reason(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    assert info is not None, f"{error.code().name} without an ErrorInfo"
    return info.reason


def test_a_session_is_restored_only_onto_the_same_model_version(
    replica: Callable[..., ServerThread], tmp_path: Path, oracle: Oracle
) -> None:
    other_weights = tmp_path / "other-weights"
    export_tiny_model(other_weights, tmp_path / "checkpoints", MODEL, "lstm", 2, seed=7)
    gru_only = tmp_path / "gru-only"
    export_tiny_model(gru_only, tmp_path / "checkpoints", "tiny-gru", "gru", 1)
    first = replica(state_save_every_steps=1)

    async def scenario() -> None:
        async with RnnserveClient(first.target) as client:
            session = History((await client.create_session(MODEL)).session_id, oracle)
            await session.step(client)
        async with RnnserveClient(replica(other_weights).target) as client:
            error = await rpc_error(client.step(session.session_id, [1]))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert "sha256" in (error.details() or "")
            assert reason(error) == "SESSION_NOT_RESTORABLE"
        async with RnnserveClient(replica(gru_only).target) as client:
            error = await rpc_error(client.step(session.session_id, [1]))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert f"model {MODEL!r} version 1, which this replica does not serve" in (error.details() or "")
            assert reason(error) == "SESSION_NOT_RESTORABLE"

    run(scenario())


def test_shutdown_saves_every_session_for_the_other_replicas(
    replica: Callable[..., ServerThread], oracle: Oracle
) -> None:
    first = replica(**NO_PERIODIC)

    async def opened() -> list[History]:
        async with RnnserveClient(first.target) as client:
            sessions = [History((await client.create_session(MODEL)).session_id, oracle, i) for i in range(4)]
            for count, session in enumerate(sessions):
                for _ in range(count):
                    await session.step(client)
            return sessions

    sessions = run(opened())
    first.call(first.server.stop(1.0))  # drain: nothing was saved by policy, all is saved now

    async def resumed() -> None:
        async with RnnserveClient(replica(**NO_PERIODIC).target) as client:
            for session in sessions:
                await session.step(client)  # at its full position: no step lost

    run(resumed())


def test_sessions_are_saved_once_their_oldest_unsaved_step_is_old_enough(
    replica: Callable[..., ServerThread], redis_server: RedisServer, namespace: str, oracle: Oracle
) -> None:
    server = replica(state_save_every_steps=0, state_save_every_s=0.2)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session = History((await client.create_session(MODEL)).session_id, oracle)
            await session.step(client)
            await session.step(client)
        # No further request: the sweep saves it (or the second step did, if it came late).
        wait_saved_at(redis_server, namespace, session.session_id, 2)

    run(scenario())


def test_every_k_steps_saves_in_the_background(
    replica: Callable[..., ServerThread], redis_server: RedisServer, namespace: str, oracle: Oracle
) -> None:
    server = replica(state_save_every_steps=3, state_save_every_s=0.0)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session = History((await client.create_session(MODEL)).session_id, oracle)
            for _ in range(4):
                await session.step(client)
        wait_saved_at(redis_server, namespace, session.session_id, 3)
        async with RnnserveClient(replica(**NO_PERIODIC).target) as client:
            await session.step(client, restored_at=3)  # the fourth step is lost with its replica

    run(scenario())


def test_a_client_proposes_the_ids_of_the_sessions_it_opens(
    replica: Callable[..., ServerThread], oracle: Oracle
) -> None:
    first, second = replica(**NO_PERIODIC), replica(**NO_PERIODIC)

    async def scenario() -> None:
        in_use: str | None = None
        async with RnnserveClient(first.target) as client:
            proposed = new_session_id()
            reply = await client.stub.CreateSession(
                pb.CreateSessionRequest(model=MODEL), metadata=((SESSION_ID_KEY, proposed),)
            )
            assert reply.session_id == proposed
            # The client proposes by itself: a Stream, a kept Generate, CreateSession.
            async with client.stream(MODEL) as stream:
                assert re.fullmatch(r"[0-9a-f]{32}", stream.session_id)
            error = await rpc_error(
                client.stub.CreateSession(
                    pb.CreateSessionRequest(model=MODEL), metadata=((SESSION_ID_KEY, "not-hex"),)
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "32 lower-case hex characters" in (error.details() or "")
            error = await rpc_error(
                client.stub.CreateSession(
                    pb.CreateSessionRequest(model=MODEL), metadata=((SESSION_ID_KEY, proposed),)
                )
            )
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS, "an open session's id is taken"
            assert reason(error) == "SESSION_ID_IN_USE"
            in_use = error.details()
            error = await rpc_error(
                client.stub.Step(
                    pb.StepRequest(session_id=proposed, tokens=[1]),
                    metadata=((SESSION_ID_KEY, new_session_id()),),
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "differs from the request's session id" in (error.details() or "")
        async with RnnserveClient(second.target) as client:
            # Saved in Redis by another replica: taken there too.
            error = await rpc_error(
                client.stub.CreateSession(
                    pb.CreateSessionRequest(model=MODEL), metadata=((SESSION_ID_KEY, proposed),)
                )
            )
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert error.details() == in_use  # the same answer as on the replica holding it
            assert reason(error) == "SESSION_ID_IN_USE"
        assert second.on_loop(len, second.runtime.sessions) == 0

    run(scenario())


def test_a_kept_generation_continues_on_another_replica(
    replica: Callable[..., ServerThread], redis_server: RedisServer, namespace: str, oracle: Oracle
) -> None:
    first = replica(state_save_every_steps=1)

    async def scenario() -> None:
        async with RnnserveClient(first.target) as client:
            replies = [
                reply
                async for reply in client.generate(
                    MODEL, prompt_tokens=[1, 2, 3], max_new_tokens=5, keep_session=True
                )
            ]
        session_id = replies[0].session_id
        generated = [token for reply in replies for token in reply.tokens]
        session = History(session_id, oracle)
        session.tokens = [1, 2, 3, *generated]
        wait_saved_at(redis_server, namespace, session_id, len(session.tokens))
        async with RnnserveClient(replica(**NO_PERIODIC).target) as client:
            await session.step(client)

    run(scenario())


def test_serving_goes_on_without_redis_and_only_recovery_is_lost(
    make_server: Callable[..., ServerThread], oracle: Oracle
) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    first = make_server(redis_url=nobody, state_save_every_steps=1)
    second = make_server(redis_url=nobody, state_save_every_steps=1)

    async def scenario() -> None:
        async with RnnserveClient(first.target) as client:
            session = History((await client.create_session(MODEL)).session_id, oracle)
            started = time.monotonic()
            for _ in range(5):
                await session.step(client)
            assert time.monotonic() - started < 3.0, "a Redis that is down must fail fast"
            await client.close_session(session.session_id)
            kept = History((await client.create_session(MODEL)).session_id, oracle)
            await kept.step(client)
        async with RnnserveClient(second.target) as client:
            error = await rpc_error(client.step(kept.session_id, [1]))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert "cannot be looked up now" in (error.details() or "")

    run(scenario())


def test_the_first_call_after_a_redis_restart_succeeds(redis_server: RedisServer, namespace: str) -> None:
    """Pooled connections to a Redis that restarted are broken; a call must not fail on one."""

    async def scenario() -> None:
        store = RedisStateStore(RedisStoreOptions(url=redis_server.url, namespace=namespace))
        record = SessionRecord(
            session_id=new_session_id(),
            model=MODEL,
            version=1,
            model_sha256="ab" * 32,
            position=1,
            owner=None,
            last_used=time.time(),
            states={"h": np.zeros((2, 16), np.float32)},
        )
        try:
            await store.save_many([record] * 4, 60.0)  # a few pooled connections
            await store.save(record, 60.0)
            redis_server.restart()
            await store.save(record, 60.0)
            assert await store.load(record.session_id) is not None
            assert store.available
        finally:
            await store.close()

    run(scenario())


@pytest.mark.parametrize(
    ("session_id", "sent"),
    [(new_session_id(), True), ("a" * 128, True), ("", False), ("a" * 129, False), ("a\x1f", False),
     ("é" * 4, False), (" a", False)],
)  # fmt: skip
def test_the_client_sends_only_ids_that_can_travel_as_metadata(session_id: str, sent: bool) -> None:
    async def metadata() -> dict[str, str]:
        async with RnnserveClient("127.0.0.1:1") as client:  # no call is made
            return dict(client.session_metadata(session_id))

    assert (run(metadata()).get(SESSION_ID_KEY) == session_id) is sent
