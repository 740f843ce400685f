"""Other identities' sessions: every answer is exactly the one for an id that never existed.

Alice's session, open, closed, expired or evicted, restored from a snapshot or from Redis: Bob's
Step, Stream resume, Generate and CloseSession on it get the answer of an unknown id, word for
word. A proposed id (x-session-id) that is open, or reserved for its owner after it ended, gets
one answer whoever holds it; its owner may take a closed id again, others only after the idle
timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from contract.session_id import SESSION_ID_KEY, new_session_id
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc
from serving.state.snapshot import SessionSnapshots
from tests.support.redis_server import REDIS_SKIP_REASON, RedisServer, redis_server_path
from tests.support.servers import ServerThread, run

MODEL = "tiny-gru"
IDLE_TIMEOUT_S = 1.5
Answer = tuple[grpc.StatusCode, str]


def owner(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("x-test-owner")


class OwnedServer(ServerThread):
    """A test server that names each caller by its `x-test-owner` metadata, as auth would."""

    async def _start(self) -> tuple[Any, int]:
        from serving.frontend.server import create_server

        server, port = await create_server(
            self.settings, self.registry, observer=self.observer, identity=owner
        )
        if self.settings.state_snapshot is not None:
            server.snapshots = SessionSnapshots(self.settings.state_snapshot, server.runtime)
        await server.start()
        return server, port


class Caller:
    """One identity's calls on one server, each answered as (status, details)."""

    def __init__(self, server: ServerThread, name: str) -> None:
        self.target = server.target
        self.metadata = (("x-test-owner", name),)

    async def _answer(self, call: Callable[[pb_grpc.InferenceStub], Any]) -> Answer:
        async with grpc.aio.insecure_channel(self.target) as channel:
            try:
                await call(pb_grpc.InferenceStub(channel))
            except grpc.aio.AioRpcError as error:
                return error.code(), str(error.details())
        return grpc.StatusCode.OK, ""

    def open(self, session_id: str | None = None) -> str:
        async def go() -> str:
            async with grpc.aio.insecure_channel(self.target) as channel:
                metadata = (
                    self.metadata if session_id is None else (*self.metadata, (SESSION_ID_KEY, session_id))
                )
                reply = await pb_grpc.InferenceStub(channel).CreateSession(
                    pb.CreateSessionRequest(model=MODEL), metadata=metadata, timeout=10
                )
                await pb_grpc.InferenceStub(channel).Step(
                    pb.StepRequest(session_id=reply.session_id, tokens=[1, 2]),
                    metadata=self.metadata,
                    timeout=10,
                )
                return str(reply.session_id)

        return run(go())

    def propose(self, session_id: str) -> Answer:
        metadata = (*self.metadata, (SESSION_ID_KEY, session_id))
        return run(
            self._answer(
                lambda stub: stub.CreateSession(
                    pb.CreateSessionRequest(model=MODEL), metadata=metadata, timeout=10
                )
            )
        )

    def close(self, session_id: str) -> Answer:
        return run(self._close(session_id))

    async def _close(self, session_id: str) -> Answer:
        return await self._answer(
            lambda stub: stub.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), metadata=self.metadata, timeout=10
            )
        )

    def answers(self, session_id: str) -> dict[str, Answer]:
        """Step, Stream resume, Generate (continuing) and CloseSession on `session_id`, in order."""
        metadata = self.metadata

        async def resume(stub: pb_grpc.InferenceStub) -> None:
            call = stub.Stream(metadata=metadata, timeout=10)
            await call.write(pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id)))
            await call.read()
            await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[3])))
            reply = await call.read()
            assert reply != grpc.aio.EOF
            await call.done_writing()

        async def generate(stub: pb_grpc.InferenceStub) -> None:
            request = pb.GenerateRequest(session_id=session_id, max_new_tokens=1)
            async for _ in stub.Generate(request, metadata=metadata, timeout=10):
                pass

        async def go() -> dict[str, Answer]:
            return {
                "Step": await self._answer(
                    lambda stub: stub.Step(
                        pb.StepRequest(session_id=session_id, tokens=[3]), metadata=metadata, timeout=10
                    )
                ),
                "Stream resume": await self._answer(resume),
                "Generate": await self._answer(generate),
                "CloseSession": await self._close(session_id),
            }

        return run(go())


def as_if_unknown(caller: Caller, session_id: str) -> dict[str, Answer]:
    """What `caller` is told about an id that never existed, worded for `session_id`."""
    unknown = new_session_id()
    return {
        rpc: (code, details.replace(unknown, session_id))
        for rpc, (code, details) in caller.answers(unknown).items()
    }


@pytest.fixture
def owned(model_repository: Path) -> Iterator[OwnedServer]:
    server = OwnedServer(model_repository, session_idle_timeout_s=IDLE_TIMEOUT_S, max_sessions=3)
    yield server
    server.stop()


def test_another_identity_is_told_nothing_about_open_closed_expired_or_evicted_sessions(
    owned: OwnedServer,
) -> None:
    alice, bob = Caller(owned, "alice"), Caller(owned, "bob")
    session = alice.open()
    assert bob.answers(session) == as_if_unknown(bob, session)  # open
    assert alice.close(session) == (grpc.StatusCode.OK, "")
    closed = bob.answers(session)
    assert closed == as_if_unknown(bob, session)
    assert all(
        code == grpc.StatusCode.NOT_FOUND and "closed" not in details for code, details in closed.values()
    )
    assert alice.answers(session)["Step"] == (grpc.StatusCode.NOT_FOUND, f"session {session} was closed")

    expiring = alice.open()
    time.sleep(IDLE_TIMEOUT_S + 0.5)
    assert bob.answers(expiring) == as_if_unknown(bob, expiring)
    assert "expired" in alice.answers(expiring)["Step"][1]

    evicted = alice.open()
    for _ in range(3):  # the server holds 3 sessions: Bob's third evicts Alice's, the least recent
        bob.open()
    assert bob.answers(evicted) == as_if_unknown(bob, evicted)
    assert "evicted" in alice.answers(evicted)["Step"][1]


def test_a_proposed_id_gets_one_answer_whoever_holds_it_and_ended_ids_stay_reserved(
    owned: OwnedServer,
) -> None:
    alice, bob = Caller(owned, "alice"), Caller(owned, "bob")
    session = alice.open()
    in_use = alice.propose(session)
    assert in_use[0] == grpc.StatusCode.ALREADY_EXISTS and "in use" in in_use[1]
    assert bob.propose(session) == in_use  # not "already open", not whose
    assert alice.close(session) == (grpc.StatusCode.OK, "")
    # Closed: reserved for its owner for the idle timeout.
    assert bob.propose(session) == in_use
    assert alice.propose(session) == (grpc.StatusCode.OK, "")
    assert alice.close(session) == (grpc.StatusCode.OK, "")
    time.sleep(IDLE_TIMEOUT_S + 0.2)
    assert bob.propose(session) == (grpc.StatusCode.OK, "")  # the reservation is over
    assert alice.answers(session) == as_if_unknown(alice, session)  # now it is Bob's


def test_sessions_restored_from_a_snapshot_keep_their_owner(model_repository: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    first = OwnedServer(model_repository, state_snapshot=snapshot)
    try:
        session = Caller(first, "alice").open()
    finally:
        first.stop()  # saves the snapshot
    second = OwnedServer(model_repository, state_snapshot=snapshot)
    try:
        bob = Caller(second, "bob")
        assert bob.answers(session) == as_if_unknown(bob, session)
        assert bob.propose(session) == Caller(second, "alice").propose(session)
        assert Caller(second, "alice").answers(session)["Step"][0] == grpc.StatusCode.OK
    finally:
        second.stop()


@pytest.mark.skipif(redis_server_path() is None, reason=REDIS_SKIP_REASON)
def test_sessions_recovered_from_redis_keep_their_owner(model_repository: Path, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        settings = {
            "redis_url": redis_server.url,
            "redis_namespace": "ownership",
            "redis_timeout_s": 2.0,
            "state_save_every_steps": 1,
        }
        replicas = [OwnedServer(model_repository, **settings) for _ in range(2)]
        try:
            session = Caller(replicas[0], "alice").open()
            bob = Caller(replicas[1], "bob")
            assert bob.answers(session) == as_if_unknown(bob, session)
            # Claimed in Redis by Alice: Bob's proposal on the other replica gets the in-use answer.
            in_use = Caller(replicas[0], "bob").propose(session)
            assert in_use[0] == grpc.StatusCode.ALREADY_EXISTS and "in use" in in_use[1]
            assert bob.propose(session) == in_use
            assert Caller(replicas[1], "alice").answers(session)["Step"][0] == grpc.StatusCode.OK
        finally:
            for replica in replicas:
                replica.stop()
