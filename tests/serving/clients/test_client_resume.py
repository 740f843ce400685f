"""The client's automatic resume of a lost Stream and its retry policy.

A scripted server decides exactly where a stream is lost (before or after a chunk is applied)
and where the resumed session stands; a real server stopped and restarted with its session
snapshot shows a session going on across a restart with the predictions it would have had."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc
from serving.clients.client import (
    AnswerLostError,
    ResumePolicy,
    RnnserveClient,
    SessionDivergedError,
    StepsLostError,
)
from tests.support.models import Oracle
from tests.support.ops import OpsServer, free_port
from tests.support.servers import run

T = TypeVar("T")
SESSION = "5" * 32
FAST = ResumePolicy(timeout_s=10.0, initial_backoff_s=0.01, max_backoff_s=0.05)


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    """One session whose position is a counter; `lose` ends the next chunk's stream with
    UNAVAILABLE "before" or "after" applying it; `shift` moves the position before a resume."""

    def __init__(self) -> None:
        self.position = 0
        self.applied: list[list[int]] = []
        self.lose: str | None = None
        self.shift = 0
        self.opened_streams = 0
        self.list_calls = 0
        self.step_calls = 0

    async def Stream(  # noqa: N802 (a gRPC method name)
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        self.opened_streams += 1
        async for request in requests:
            kind = request.WhichOneof("kind")
            if kind == "open":
                yield pb.StreamResponse(session_id=SESSION, event=pb.STREAM_EVENT_OPENED)
            elif kind == "resume":
                assert request.resume.session_id == SESSION
                assert ("x-session-id", SESSION) in context.invocation_metadata()  # routed like the session
                self.position += self.shift
                self.shift = 0
                resumed = pb.Prediction(position=self.position)
                yield pb.StreamResponse(session_id=SESSION, event=pb.STREAM_EVENT_RESUMED, prediction=resumed)
            elif kind == "chunk":
                lose, self.lose = self.lose, None
                if lose == "before":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (before)")
                self.position += len(request.chunk.tokens)
                self.applied.append(list(request.chunk.tokens))
                if lose == "after":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (after)")
                prediction = pb.Prediction(position=self.position, top_ids=[request.chunk.tokens[-1]])
                yield pb.StreamResponse(
                    session_id=SESSION, event=pb.STREAM_EVENT_PREDICTION, prediction=prediction
                )

    async def ListModels(  # noqa: N802 (a gRPC method name)
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.list_calls += 1
        if self.list_calls < 3:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="scripted")])

    async def Step(  # noqa: N802 (a gRPC method name)
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        self.step_calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "never")
        raise AssertionError("abort raises")


async def with_scripted(scenario: Callable[[ScriptedInference, RnnserveClient], Awaitable[T]]) -> T:
    servicer = ScriptedInference()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with RnnserveClient(f"127.0.0.1:{port}", resume=FAST) as client:
            return await scenario(servicer, client)
    finally:
        await server.stop(0)


def test_a_chunk_lost_before_it_was_applied_is_sent_again_once() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> None:
        async with client.stream("scripted") as stream:
            assert (await stream.send([1, 2])).position == 2
            servicer.lose = "before"
            prediction = await stream.send([3])
            assert (prediction.position, list(prediction.top_ids)) == (3, [3])
            assert servicer.applied == [[1, 2], [3]]
            assert (stream.resumes, servicer.opened_streams) == (1, 2)
            assert (await stream.send([4])).position == 4

    run(with_scripted(scenario))


def test_a_chunk_applied_whose_answer_was_lost_is_reported_not_sent_again() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> None:
        async with client.stream("scripted") as stream:
            await stream.send([1, 2])
            servicer.lose = "after"
            with pytest.raises(AnswerLostError) as lost:
                await stream.send([3, 4, 5])
            assert (lost.value.client_position, lost.value.server_position, lost.value.lost_tokens) == (
                2,
                5,
                3,
            )
            assert servicer.applied == [[1, 2], [3, 4, 5]]  # applied once
            assert stream.position == 5
            assert (await stream.send([6])).position == 6  # the stream goes on after the report

    run(with_scripted(scenario))


def test_a_session_resumed_behind_the_answered_position_reports_the_lost_steps() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> None:
        async with client.stream("scripted") as stream:
            await stream.send([1, 2, 3])
            servicer.lose, servicer.shift = "before", -2  # restored from a save two tokens older
            with pytest.raises(StepsLostError) as lost:
                await stream.send([4])
            assert (lost.value.client_position, lost.value.server_position, lost.value.lost_tokens) == (
                3,
                1,
                2,
            )
            assert servicer.applied == [[1, 2, 3]]  # [4] was not sent over a state missing [2, 3]
            assert (await stream.send([2, 3, 4])).position == 4

    run(with_scripted(scenario))


def test_a_session_resumed_ahead_of_this_client_is_reported() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> None:
        async with client.stream("scripted") as stream:
            await stream.send([1])
            servicer.lose, servicer.shift = "before", 4  # another client stepped it
            with pytest.raises(SessionDivergedError) as diverged:
                await stream.send([2])
            assert (diverged.value.client_position, diverged.value.server_position) == (1, 5)

    run(with_scripted(scenario))


def test_without_a_resume_policy_a_lost_stream_raises() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> grpc.StatusCode:
        async with client.stream("scripted", resume=None) as stream:
            servicer.lose = "before"
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await stream.send([1])
            return lost.value.code()

    assert run(with_scripted(scenario)) == grpc.StatusCode.UNAVAILABLE


def test_idempotent_calls_are_retried_and_steps_are_not() -> None:
    async def scenario(servicer: ScriptedInference, client: RnnserveClient) -> tuple[int, int]:
        models = await client.list_models()
        assert [model.name for model in models] == ["scripted"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.step(SESSION, [1])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        return servicer.list_calls, servicer.step_calls

    assert run(with_scripted(scenario)) == (3, 1)


# ----- a real server, stopped and restarted -------------------------------------------------------


def test_a_stream_resumes_across_a_server_restart_with_equal_predictions(
    tmp_path: Path, model_repository: Path, oracles: dict[str, Oracle]
) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    settings: dict[str, Any] = {"port": free_port(), "state_snapshot": snapshot, "metrics_port": 0}
    servers = [OpsServer(model_repository, **settings)]
    history: list[int] = []

    def restart(older_snapshot: Path | None = None) -> None:
        servers[-1].stop(0.2)  # saves the snapshot, then the connection drops
        if older_snapshot is not None:
            shutil.copy(older_snapshot, snapshot)
        servers.append(OpsServer(model_repository, **settings))

    async def scenario() -> None:
        async with (
            RnnserveClient(servers[0].target, resume=ResumePolicy(timeout_s=60)) as client,
            client.stream("tiny-lstm", return_logits=True) as stream,
        ):
            for chunk in ([1, 2, 3], [4]):
                await stream.send(chunk)
                history.extend(chunk)
            await asyncio.to_thread(restart)
            older = tmp_path / "older.snapshot"
            shutil.copy(snapshot, older)  # the session at position 4, as the restart restored it
            prediction = await stream.send([5])  # resumes on the restarted server, then sends
            history.append(5)
            assert (prediction.position, stream.resumes) == (5, 1)
            np.testing.assert_allclose(
                prediction.logits, oracles["tiny-lstm"].last_logits(history), atol=1e-5
            )
            await stream.send([6, 7])
            history.extend([6, 7])
            await asyncio.to_thread(restart, older)  # comes back three tokens behind
            with pytest.raises(StepsLostError) as lost:
                await stream.send([8])
            assert (lost.value.client_position, lost.value.server_position) == (7, 4)
            prediction = await stream.send([5, 6, 7, 8])  # the lost tokens again, then the new one
            history.append(8)
            assert prediction.position == 8
            np.testing.assert_allclose(
                prediction.logits, oracles["tiny-lstm"].last_logits(history), atol=1e-5
            )

    try:
        run(scenario())
    finally:
        servers[-1].stop()
