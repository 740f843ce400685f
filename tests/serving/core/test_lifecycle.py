"""The seams later operations build on: versions added and retired while serving (sessions stay
on their version; a retired version unloads with its last session), draining, health turning
NOT_SERVING, and closing a Stream's session when its client goes away (if configured)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.clients.client import RnnserveClient
from serving.core.registry import batching_options, engine_options, load_version
from serving.core.repository import read_manifest
from tests.support.models import Oracle, export_tiny_model
from tests.support.servers import ServerThread, run


def test_a_new_version_takes_new_sessions_and_the_old_one_unloads_with_its_last_session(
    tmp_path: Path,
    model_repository: Path,
    make_server: Callable[..., ServerThread],
    oracles: dict[str, Oracle],
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-gru", repository / "tiny-gru")
    server = make_server(repository)
    version_2 = export_tiny_model(repository, tmp_path / "checkpoints", "tiny-gru", "gru", 1, seed=1)
    new_oracle = Oracle(version_2)

    async def open_session() -> tuple[str, int]:
        async with RnnserveClient(server.target) as client:
            created = await client.create_session("tiny-gru")
            return created.session_id, created.version

    async def step(session_id: str, tokens: list[int]) -> np.ndarray:
        async with RnnserveClient(server.target) as client:
            return np.array((await client.step(session_id, tokens, return_logits=True)).prediction.logits)

    old_session, old_version = run(open_session())
    assert old_version == 1
    loaded = load_version(
        read_manifest(version_2),
        engine_options(server.settings),
        batching_options(server.settings),
        server.observer,
    )
    server.on_loop(server.registry.add, loaded)
    server.on_loop(server.registry.retire, "tiny-gru", 1)
    new_session, new_version = run(open_session())
    assert new_version == 2
    np.testing.assert_allclose(run(step(new_session, [1, 2])), new_oracle.last_logits([1, 2]), atol=1e-5)
    np.testing.assert_allclose(
        run(step(old_session, [1, 2])), oracles["tiny-gru"].last_logits([1, 2]), atol=1e-5
    )
    assert [m.version for m in server.registry.versions("tiny-gru")] == [2, 1]

    async def close(session_id: str) -> None:
        async with RnnserveClient(server.target) as client:
            await client.close_session(session_id)

    run(close(old_session))
    assert [m.version for m in server.registry.versions("tiny-gru")] == [2]


def test_draining_refuses_new_sessions_and_serves_open_ones(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            open_session = (await client.create_session("tiny-lstm")).session_id
            server.on_loop(setattr, server.runtime, "draining", True)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.create_session("tiny-lstm")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            await client.step(open_session, [1, 2])

    run(scenario())


def test_health_turns_not_serving(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()
    server.call(server.server.set_serving(False))
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tiny-lstm"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("close_on_disconnect", [False, True])
def test_a_stream_left_without_end(
    make_server: Callable[..., ServerThread], close_on_disconnect: bool
) -> None:
    server = make_server(close_on_disconnect=close_on_disconnect)

    async def leave_without_end() -> str:
        async with RnnserveClient(server.target) as client, client.stream("tiny-gru") as stream:
            await stream.send([1, 2])
            return stream.session_id

    session_id = run(leave_without_end())
    deadline = time.monotonic() + 5
    while (
        close_on_disconnect and server.on_loop(len, server.runtime.sessions) and time.monotonic() < deadline
    ):
        time.sleep(0.02)

    async def resume() -> int:
        async with RnnserveClient(server.target) as client, client.stream(session_id=session_id) as stream:
            return (await stream.send([3])).position

    if close_on_disconnect:
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            run(resume())
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "was closed" in (gone.value.details() or "")
    else:
        assert run(resume()) == 3


def test_state_rows_can_be_copied_between_sessions_on_the_worker(
    server: ServerThread, oracles: dict[str, Oracle]
) -> None:
    """The snapshot/restore seam: read a session's rows on its model's worker thread, write them
    into another session, and the copy predicts exactly what the original would."""

    async def scenario() -> tuple[list[float], list[float]]:
        async with RnnserveClient(server.target) as client:
            original = (await client.create_session("tiny-lstm")).session_id
            await client.step(original, [4, 5, 6])
            copy = (await client.create_session("tiny-lstm")).session_id

            async def transfer() -> None:
                runtime = server.runtime
                source, target = runtime.sessions.get(original), runtime.sessions.get(copy)
                model = source.model
                saved = await model.batcher.run_in_worker(
                    lambda: model.engine.read_rows(np.array([source.slot]))
                )
                moved = dataclasses.replace(saved, slots=np.array([target.slot]))
                await model.batcher.run_in_worker(lambda: model.engine.write_rows(moved))
                target.position = source.position

            server.call(transfer())
            first = await client.step(original, [7], return_logits=True)
            second = await client.step(copy, [7], return_logits=True)
            assert first.prediction.position == second.prediction.position == 4
            return list(first.prediction.logits), list(second.prediction.logits)

    first, second = run(scenario())
    assert first == second
    np.testing.assert_allclose(first, oracles["tiny-lstm"].last_logits([4, 5, 6, 7]), atol=1e-5)
