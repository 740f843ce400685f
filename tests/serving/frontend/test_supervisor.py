"""`rnnserve serve --frontends 2`: any front end serves any session, and a front end or an engine
core killed with SIGKILL is restarted (calls on it end UNAVAILABLE; sessions resume by id; the
core's sessions come back from the snapshot)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc
from tests.support.models import export_tiny_model
from tests.support.ops import RNNSERVE, free_port, sample, scrape, wait_for
from tests.support.redis_server import REDIS_SKIP_REASON, RedisServer, redis_server_path

FRONTEND_KEY = "x-rnnserve-frontend"


class Cluster:
    def __init__(self, process: subprocess.Popen[bytes], target: str, snapshot: Path, metrics: str) -> None:
        self.process = process
        self.target = target
        self.snapshot = snapshot
        self.metrics = metrics  # the one /metrics of all processes

    def stub(self) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceStub]:
        """A stub on a channel of its own (its own connection, so perhaps another front end)."""
        channel = grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        return channel, inference_pb2_grpc.InferenceStub(channel)

    def children(self) -> dict[int, str]:
        """pid -> role ("core" or "frontend") of the supervisor's processes."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                arguments = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.process.pid and b"serving.frontend.supervisor" in arguments:
                found[int(entry)] = arguments[arguments.index(b"serving.frontend.supervisor") + 1].decode()
        return found

    def step(self, session_id: str, tokens: list[int]) -> tuple[pb.StepResponse, str]:
        """One Step on a fresh connection; the answer and the pid of the front end that gave it."""
        channel, stub = self.stub()
        with channel:
            response, call = stub.Step.with_call(
                pb.StepRequest(session_id=session_id, tokens=tokens), timeout=10
            )
            return response, dict(call.trailing_metadata())[FRONTEND_KEY]

    def serving(self) -> bool:
        channel, stub = self.stub()
        with channel:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=2)
                return True
            except grpc.RpcError:
                return False


@pytest.fixture(scope="module")
def cluster(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port, metrics_port = free_port(), free_port()
    snapshot = tmp_path_factory.mktemp("snapshot") / "sessions.snapshot"
    process = subprocess.Popen(
        [
            RNNSERVE, "serve", "--repository", str(model_repository), "--port", str(port),
            "--frontends", "2", "--metrics-port", str(metrics_port), "--reload-interval-s", "0",
            "--state-snapshot", str(snapshot), "--snapshot-interval-s", "0.2", "--grace-period-s", "1",
        ]
    )  # fmt: skip
    running = Cluster(process, f"127.0.0.1:{port}", snapshot, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        wait_for(running.serving, 120, "the front ends to serve")
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_any_front_end_serves_any_session(cluster: Cluster) -> None:
    channel, stub = cluster.stub()
    with channel:
        stream = stub.Stream(iter([pb.StreamRequest(open=pb.OpenSession(model="tiny-lstm"))]))
        session_id = next(stream).session_id
        list(stream)
    pids: set[str] = set()
    position = 0
    for _ in range(60):  # the kernel spreads new connections over both front ends
        response, pid = cluster.step(session_id, [1, 2])
        position += 2
        assert response.prediction.position == position
        pids.add(pid)
        if len(pids) == 2:
            break
    assert len(pids) == 2, "every Step went to one front end"
    # One /metrics sums both front ends' request series and the core's token counts.
    samples = scrape(cluster.metrics)
    steps = sample(
        samples,
        "grpc_server_handled_total",
        grpc_code="OK",
        grpc_method="Step",
        grpc_service="rnnserve.v1.Inference",
        grpc_type="unary",
    )
    assert steps >= position // 2
    assert sample(samples, "rnnserve_tokens_in_total", model="tiny-lstm") >= position
    channel, stub = cluster.stub()
    with channel:
        resumed = list(
            stub.Stream(
                iter(
                    [
                        pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id)),
                        pb.StreamRequest(chunk=pb.TokenChunk(tokens=[3])),
                    ]
                )
            )
        )
        assert resumed[0].prediction.position == position
        assert resumed[1].prediction.position == position + 1
        generated = list(stub.Generate(pb.GenerateRequest(session_id=session_id, max_new_tokens=4)))
        assert sum(len(chunk.tokens) for chunk in generated) == 4
        assert generated[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_a_killed_front_end_is_restarted_and_its_calls_end_unavailable(cluster: Cluster) -> None:
    channel, stub = cluster.stub()
    with channel:
        session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10).session_id
        _, call = stub.Step.with_call(pb.StepRequest(session_id=session_id, tokens=[4]), timeout=10)
        victim = int(dict(call.trailing_metadata())[FRONTEND_KEY])  # this channel's front end
        requests: list[pb.StreamRequest] = [pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))]
        stream = stub.Stream(iter([*requests, pb.StreamRequest(chunk=pb.TokenChunk(tokens=[5]))]))
        assert next(stream).event == pb.STREAM_EVENT_RESUMED
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: len(cluster.children()) == 3 and victim not in cluster.children(), 30, "the restart")
    wait_for(cluster.serving, 60, "serving again")
    response, _ = cluster.step(session_id, [6])  # the session lives in the core: it goes on
    assert response.prediction.position in (2, 3)  # the chunk on the killed stream may have run


def test_a_killed_engine_core_fails_calls_fast_and_comes_back_with_its_sessions(cluster: Cluster) -> None:
    channel, stub = cluster.stub()
    with channel:
        session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lstm"), timeout=10).session_id
    response, _ = cluster.step(session_id, [1, 2, 3])
    assert response.prediction.position == 3
    stepped = time.time_ns()
    wait_for(  # a periodic snapshot (every 0.2 s) taken after the step
        lambda: cluster.snapshot.exists() and cluster.snapshot.stat().st_mtime_ns > stepped, 30, "a snapshot"
    )
    core = next(pid for pid, role in cluster.children().items() if role == "core")
    os.kill(core, signal.SIGKILL)
    codes = []
    for _ in range(20):  # UNAVAILABLE until the new core has restored the snapshot, never a hang
        try:
            response, _ = cluster.step(session_id, [4])
            break
        except grpc.RpcError as error:
            codes.append(error.code())
            time.sleep(0.5)
    assert codes and set(codes) == {grpc.StatusCode.UNAVAILABLE}
    assert response.prediction.position == 4
    assert core not in cluster.children()


def test_a_hung_engine_core_fails_calls_with_unavailable_not_a_hang(cluster: Cluster) -> None:
    session_id = cluster_session(cluster)
    core = next(pid for pid, role in cluster.children().items() if role == "core")
    os.kill(core, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    try:
        with pytest.raises(grpc.RpcError) as hung:
            cluster.step(session_id, [1])  # the front end gives up on the core after 2 s
        assert hung.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(core, signal.SIGCONT)
    positions, pids = [], set()
    for _ in range(80):  # both front ends reconnect to the same core
        try:
            answered, pid = cluster.step(session_id, [2])
            positions.append(answered.prediction.position)
            pids.add(pid)
            if len(pids) == 2:
                break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.25)
    assert len(pids) == 2
    assert positions[0] in (1, 2)  # the step sent to the paused core may have run
    assert positions == list(range(positions[0], positions[0] + len(positions)))


def test_sigterm_drains_then_saves_the_snapshot_and_exits_zero(cluster: Cluster) -> None:
    response, _ = cluster.step(cluster_session(cluster), [1])
    assert response.prediction.position == 1
    signalled = time.time_ns()
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(60) == 0
    assert cluster.snapshot.stat().st_mtime_ns > signalled  # the core saved at its shutdown
    assert cluster.children() == {}


def cluster_session(cluster: Cluster) -> str:
    channel, stub = cluster.stub()
    with channel:
        return str(stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10).session_id)


def test_front_ends_authenticate_and_the_core_checks_ownership(
    model_repository: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret-token\nbob:bob-secret-token\n")
    port = free_port()
    process = subprocess.Popen(
        [
            RNNSERVE, "serve", "--repository", str(model_repository), "--port", str(port),
            "--frontends", "2", "--metrics-port", "0", "--reload-interval-s", "0",
            "--auth-tokens-file", str(tokens), "--grace-period-s", "1",
        ]
    )  # fmt: skip
    cluster = Cluster(process, f"127.0.0.1:{port}", tmp_path / "unused", "")
    alice = (("authorization", "Bearer alice-secret-token"),)
    bob = (("authorization", "Bearer bob-secret-token"),)
    try:

        def answers_alice() -> bool:
            channel, stub = cluster.stub()
            with channel:
                try:
                    stub.ListModels(pb.ListModelsRequest(), metadata=alice, timeout=2)
                    return True
                except grpc.RpcError:
                    return False

        wait_for(answers_alice, 120, "the front ends to serve")
        channel, stub = cluster.stub()
        with channel:
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            session_id = stub.CreateSession(
                pb.CreateSessionRequest(model="tiny-gru"), metadata=alice, timeout=10
            ).session_id
        pids = set()
        for _ in range(40):  # bob is refused by every front end; alice is served by every one
            channel, stub = cluster.stub()
            with channel:
                with pytest.raises(grpc.RpcError) as foreign:
                    stub.Step(pb.StepRequest(session_id=session_id, tokens=[1]), metadata=bob, timeout=10)
                assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
                _, call = stub.Step.with_call(
                    pb.StepRequest(session_id=session_id, tokens=[1]), metadata=alice, timeout=10
                )
                pids.add(dict(call.trailing_metadata())[FRONTEND_KEY])
            if len(pids) == 2:
                break
        assert len(pids) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.mark.skipif(redis_server_path() is None, reason=REDIS_SKIP_REASON)
def test_a_killed_engine_core_comes_back_with_its_sessions_from_redis(
    model_repository: Path, tmp_path: Path
) -> None:
    port = free_port()
    with RedisServer(tmp_path / "redis") as redis:
        process = subprocess.Popen(
            [
                RNNSERVE, "serve", "--repository", str(model_repository), "--port", str(port),
                "--frontends", "1", "--metrics-port", "0", "--reload-interval-s", "0",
                "--redis-url", redis.url, "--state-save-every-steps", "1", "--redis-timeout-s", "2",
                "--grace-period-s", "1",
            ]
        )  # fmt: skip
        cluster = Cluster(process, f"127.0.0.1:{port}", tmp_path / "unused", "")
        try:
            wait_for(cluster.serving, 120, "the front end to serve")
            session_id = cluster_session(cluster)
            response, _ = cluster.step(session_id, [1, 2])  # saved before the answer (every step)
            assert response.prediction.position == 2
            core = next(pid for pid, role in cluster.children().items() if role == "core")
            os.kill(core, signal.SIGKILL)
            answered = None
            for _ in range(60):  # UNAVAILABLE until the new core answers; then restored from Redis
                try:
                    answered, _ = cluster.step(session_id, [3])
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    time.sleep(0.5)
            assert answered is not None and answered.prediction.position == 3
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def test_sighup_reloads_in_the_core_and_sessions_keep_their_version(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(model_repository / "tiny-gru", repository / "tiny-gru")
    port = free_port()
    process = subprocess.Popen(
        [
            RNNSERVE, "serve", "--repository", str(repository), "--port", str(port),
            "--frontends", "1", "--metrics-port", "0", "--reload-interval-s", "0", "--grace-period-s", "1",
        ]
    )  # fmt: skip
    cluster = Cluster(process, f"127.0.0.1:{port}", tmp_path / "unused", "")
    try:
        wait_for(cluster.serving, 120, "the front end to serve")
        old = cluster_session(cluster)
        export_tiny_model(repository, tmp_path / "checkpoints", "tiny-gru", "gru", 1, seed=1, version=2)
        process.send_signal(signal.SIGHUP)  # the supervisor passes it to the core

        def latest() -> int:
            channel, stub = cluster.stub()
            with channel:
                return int(stub.GetModel(pb.GetModelRequest(name="tiny-gru"), timeout=10).latest_version)

        wait_for(lambda: latest() == 2, 60, "version 2 to load")
        response, _ = cluster.step(old, [1])
        assert response.version == 1  # the open session stays on its version
        assert cluster.step(cluster_session(cluster), [1])[0].version == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
