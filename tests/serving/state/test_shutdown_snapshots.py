"""Graceful shutdown and session snapshots, against `rnnserve serve` in a subprocess: SIGTERM
under load loses no answered step, a restart restores every session exactly, SIGKILL loses only
what came after the last snapshot, and a disk that refuses the snapshot is survived."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.clients.client import RnnserveClient
from serving.clients.health import check
from serving.state.records import read_snapshot, write_snapshot
from tests.support.models import Oracle
from tests.support.ops import OpsServer, ServerProcess, free_port, sample, scrape, server_processes, wait_for
from tests.support.servers import run

__all__ = ["server_processes"]  # the fixture, imported for the tests below


@dataclass
class Client:
    """One session driven by the load: its answered tokens and how it ended."""

    model: str
    streaming: bool
    session_id: str = ""
    history: list[int] = field(default_factory=list)
    error: grpc.StatusCode | None = None


class Load:
    """Sessions sending one token at a time as fast as answers come, each until its first error."""

    def __init__(self, target: str, clients: list[Client]) -> None:
        self.target = target
        self.clients = clients
        self.unexpected: list[BaseException] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="load")
        self._thread.start()

    async def _run(self) -> None:
        # resume=None: the load records how its streams end, rather than waiting for a restart.
        async with RnnserveClient(self.target, timeout=20, resume=None) as connection:
            await asyncio.gather(
                *(self._drive(connection, client, i) for i, client in enumerate(self.clients))
            )

    async def _drive(self, connection: RnnserveClient, client: Client, index: int) -> None:
        rng = np.random.default_rng(index)
        try:
            if client.streaming:
                async with connection.stream(client.model) as stream:
                    client.session_id = stream.session_id
                    while True:
                        token = int(rng.integers(0, 32))
                        await stream.send([token])
                        client.history.append(token)
            else:
                client.session_id = (await connection.create_session(client.model)).session_id
                while True:
                    token = int(rng.integers(0, 32))
                    await connection.step(client.session_id, [token])
                    client.history.append(token)
        except grpc.aio.AioRpcError as error:
            client.error = error.code()
        except Exception as error:  # recorded: the test asserts there was none
            self.unexpected.append(error)

    def steps(self) -> int:
        return min(len(client.history) for client in self.clients)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not end after the server stopped"


async def resume_and_step(target: str, client: Client, token: int) -> tuple[int, np.ndarray]:
    """The session's next prediction after the restart: (position, logits)."""
    async with RnnserveClient(target, timeout=20) as connection:
        if client.streaming:
            async with connection.stream(session_id=client.session_id, return_logits=True) as stream:
                prediction = await stream.send([token])
        else:
            prediction = (await connection.step(client.session_id, [token], return_logits=True)).prediction
    return prediction.position, np.array(prediction.logits)


def test_sigterm_under_load_loses_no_answered_step(
    tmp_path: Path,
    model_repository: Path,
    oracles: dict[str, Oracle],
    server_processes: Callable[..., ServerProcess],
) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    metrics_port = free_port()
    args = ["--repository", str(model_repository), "--state-snapshot", str(snapshot)]
    server = server_processes([*args, "--grace-period-s", "2", "--metrics-port", str(metrics_port)])
    target = server.wait_started()
    clients = [
        Client(model, streaming) for model in ("tiny-lstm", "tiny-gru") for streaming in (True, True, False)
    ]
    load = Load(target, clients)
    wait_for(lambda: load.steps() >= 5 or bool(load.unexpected), 30, "the load to run")
    metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert sample(metrics, "rnnserve_tokens_in_total", model="tiny-lstm") >= 15
    server.send(signal.SIGTERM)
    server.wait_for_log("stopping: health is NOT_SERVING")
    # Draining: the streams go on, but health says NOT_SERVING and new sessions are refused.
    assert check(target, "", 5) == (False, f"the server at {target}: NOT_SERVING")

    async def open_session() -> grpc.StatusCode:
        async with RnnserveClient(target, timeout=5) as connection:
            try:
                await connection.create_session("tiny-lstm")
            except grpc.aio.AioRpcError as error:
                assert "shutting down" in (error.details() or "")
                return error.code()
        return grpc.StatusCode.OK

    assert run(open_session()) == grpc.StatusCode.UNAVAILABLE
    assert server.wait(30) == 0
    load.join(20)
    assert load.unexpected == []
    assert {client.error for client in clients} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert "saved 6 sessions" in server.log and "stopped" in server.log
    assert len(read_snapshot(snapshot)) == 6

    restarted = server_processes([*args, "--metrics-port", "0"])
    target = restarted.wait_started()
    assert "restored 6 of 6 sessions" in restarted.log
    for client in clients:
        position, logits = run(resume_and_step(target, client, 7))
        assert position == len(client.history) + 1, client
        np.testing.assert_allclose(logits, oracles[client.model].last_logits([*client.history, 7]), atol=1e-5)
    restarted.send(signal.SIGTERM)
    assert restarted.wait() == 0


def test_sigkill_loses_only_what_came_after_the_last_snapshot(
    tmp_path: Path,
    model_repository: Path,
    oracles: dict[str, Oracle],
    server_processes: Callable[..., ServerProcess],
) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    args = ["--repository", str(model_repository), "--state-snapshot", str(snapshot), "--metrics-port", "0"]
    server = server_processes([*args, "--snapshot-interval-s", "0.2"])
    target = server.wait_started()
    client = Client("tiny-lstm", streaming=False)

    async def step(tokens: list[int]) -> None:
        async with RnnserveClient(target) as connection:
            if not client.session_id:
                client.session_id = (await connection.create_session(client.model)).session_id
            await connection.step(client.session_id, tokens)
            client.history += tokens

    run(step([1, 2, 3]))
    saves = server.log.count("saved 1 sessions")
    wait_for(lambda: server.log.count("saved 1 sessions") >= saves + 2, 20, "a save after the step")
    run(step([4]))
    server.send(signal.SIGKILL)
    server.wait()
    stale = tmp_path / f".{snapshot.name}.interrupted.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a snapshot")

    restarted = server_processes(args)
    target = restarted.wait_started()
    assert "removed 1 temporary snapshot file" in restarted.log and not stale.exists()
    position, logits = run(resume_and_step(target, client, 5))
    kept = position - 1  # the tokens the last snapshot had: 3, or 4 if a save came after the last step
    assert kept in (3, 4)
    np.testing.assert_allclose(
        logits, oracles["tiny-lstm"].last_logits([*client.history[:kept], 5]), atol=1e-5
    )
    restarted.send(signal.SIGTERM)
    assert restarted.wait() == 0


def _refuse_file_writes() -> None:
    """In the server's process: every write to a file fails (EFBIG), like a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_a_snapshot_the_disk_refuses_is_logged_and_serving_goes_on(
    tmp_path: Path, model_repository: Path, server_processes: Callable[..., ServerProcess]
) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    write_snapshot(snapshot, [])
    previous = snapshot.read_bytes()
    metrics_port = free_port()
    args = ["--repository", str(model_repository), "--state-snapshot", str(snapshot)]
    server = server_processes(
        [*args, "--snapshot-interval-s", "0.1", "--metrics-port", str(metrics_port)],
        preexec_fn=_refuse_file_writes,
    )
    target = server.wait_started()
    server.wait_for_log(r"session snapshot not saved: cannot write the session snapshot .*File too large")

    async def serves() -> int:
        async with RnnserveClient(target) as connection:
            created = await connection.create_session("tiny-gru")
            return (await connection.step(created.session_id, [1, 2])).prediction.position

    assert run(serves()) == 2
    metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert sample(metrics, "rnnserve_snapshot_writes_total", outcome="failed") >= 1
    assert sample(metrics, "rnnserve_snapshot_writes_total", outcome="ok") == 0
    server.send(signal.SIGTERM)
    assert server.wait() == 1  # stopped, but the shutdown snapshot was lost: say so
    assert "stopped" in server.log
    assert snapshot.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.name]


def test_snapshot_and_restore_with_the_device_state_pool(
    tmp_path: Path, model_repository: Path, oracles: dict[str, Oracle]
) -> None:
    """The CUDA engine's pool path (device buffers, `fresh` rows), exercised on CPU: a session with
    steps and one without any come back exactly."""
    snapshot = tmp_path / "sessions.snapshot"
    server = OpsServer(model_repository, state_on_device=True, state_snapshot=snapshot, metrics_port=0)

    async def open_sessions() -> tuple[str, str]:
        async with RnnserveClient(server.target) as client:
            used = (await client.create_session("tiny-lstm")).session_id
            await client.step(used, [5, 6, 7])
            # A reset session's device row still holds its old state: `fresh` says it is zero.
            unused = (await client.create_session("tiny-lstm")).session_id
            await client.step(unused, [9])
            async with client.stream(session_id=unused) as stream:
                await stream.reset()
            return used, unused

    used, unused = run(open_sessions())
    server.stop(grace=1)
    restarted = OpsServer(model_repository, state_on_device=True, state_snapshot=snapshot, metrics_port=0)
    try:

        async def resume() -> list[tuple[int, np.ndarray]]:
            async with RnnserveClient(restarted.target) as client:
                answers = [await client.step(sid, [8], return_logits=True) for sid in (used, unused)]
            return [(a.prediction.position, np.array(a.prediction.logits)) for a in answers]

        (used_position, used_logits), (unused_position, unused_logits) = run(resume())
    finally:
        restarted.stop()
    assert (used_position, unused_position) == (4, 1)
    np.testing.assert_allclose(used_logits, oracles["tiny-lstm"].last_logits([5, 6, 7, 8]), atol=1e-5)
    np.testing.assert_allclose(unused_logits, oracles["tiny-lstm"].last_logits([8]), atol=1e-5)


def test_shutdown_keeps_the_sessions_of_streams_it_cuts_with_close_on_disconnect(
    tmp_path: Path, model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server, not the client, ends these streams: their sessions stay for the snapshot."""
    snapshot = tmp_path / "sessions.snapshot"
    server = OpsServer(model_repository, close_on_disconnect=True, state_snapshot=snapshot, metrics_port=0)

    async def stop_while_streaming() -> str:
        async with RnnserveClient(server.target) as client:
            stream = client.stream("tiny-gru", resume=None)
            await stream.__aenter__()
            await stream.send([1, 2])
            await asyncio.to_thread(server.stop, 0.2)
            # The server ended the call: writing fails, with its status or as already finished.
            with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
                await stream.send([3])
            return stream.session_id

    with caplog.at_level(logging.ERROR):
        session_id = run(stop_while_streaming())
        gc.collect()  # an unretrieved task exception is logged when the task is collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [record.session_id for record in read_snapshot(snapshot)] == [session_id]
