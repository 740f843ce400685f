"""Hot reload: versions exported into a running server's repository are verified and served to
new sessions while open sessions stay on theirs; broken versions are refused once; SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from contract import signature as sig
from serving.clients.client import RnnserveClient
from serving.clients.health import check
from tests.support.models import Oracle, export_tiny_model
from tests.support.ops import OpsServer, ServerProcess, sample, server_processes, wait_for
from tests.support.servers import run

__all__ = ["server_processes"]  # the fixture, imported for the tests below


class StreamingClients:
    """Sessions streaming one token at a time on a thread of their own until `stop()`."""

    def __init__(self, target: str, model: str, count: int) -> None:
        self.target = target
        self.model = model
        self.count = count
        self.histories: list[list[int]] = [[] for _ in range(count)]
        self.last_logits: list[np.ndarray | None] = [None] * count
        self.versions: list[int] = [0] * count
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="streaming-clients")
        self._thread.start()

    async def _run(self) -> None:
        async with RnnserveClient(self.target, timeout=30) as client:
            await asyncio.gather(*(self._stream(client, i) for i in range(self.count)))

    async def _stream(self, client: RnnserveClient, index: int) -> None:
        rng = np.random.default_rng(index)
        try:
            async with client.stream(self.model, return_logits=True) as stream:
                self.versions[index] = stream.version
                while not self._stop.is_set():
                    token = int(rng.integers(0, 32))
                    prediction = await stream.send([token])
                    self.histories[index].append(token)
                    assert prediction.position == len(self.histories[index])
                    self.last_logits[index] = np.array(prediction.logits)
                    await asyncio.sleep(0.005)
                await stream.end()
        except Exception as error:  # recorded: the test asserts there was none
            self.errors.append(error)

    def steps(self) -> int:
        return min(len(history) for history in self.histories)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_version_exported_while_sessions_stream(
    tmp_path: Path, model_repository: Path, oracles: dict[str, Oracle]
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-gru", repository / "tiny-gru")
    server = OpsServer(repository, reload_interval_s=0.2)
    clients = StreamingClients(server.target, "tiny-gru", count=3)
    try:
        wait_for(lambda: clients.steps() >= 3 or bool(clients.errors), 20, "the streams to run")
        version_2 = export_tiny_model(repository, tmp_path / "checkpoints", "tiny-gru", "gru", 1, seed=1)
        wait_for(lambda: server.versions("tiny-gru") == [2, 1], 20, "version 2 to load")
        reloaded_at = clients.steps()

        async def new_session() -> tuple[int, np.ndarray]:
            async with RnnserveClient(server.target) as client:
                created = await client.create_session("tiny-gru")
                step = await client.step(created.session_id, [1, 2], return_logits=True)
                await client.close_session(created.session_id)
                return created.version, np.array(step.prediction.logits)

        version, logits = run(new_session())
        assert version == 2
        np.testing.assert_allclose(logits, Oracle(version_2).last_logits([1, 2]), atol=1e-5)
        # The old sessions keep streaming on version 1 after version 2 took over.
        wait_for(lambda: clients.steps() >= reloaded_at + 3 or bool(clients.errors), 20, "more old steps")
    finally:
        clients.stop()
    assert clients.errors == []
    assert clients.versions == [1, 1, 1]
    for history, last in zip(clients.histories, clients.last_logits, strict=True):
        np.testing.assert_allclose(last, oracles["tiny-gru"].last_logits(history), atol=1e-5)
    # The streams ended their sessions: version 1 had no session left, so it unloaded.
    wait_for(lambda: server.versions("tiny-gru") == [2], 10, "version 1 to unload")
    metrics = server.scrape()
    assert sample(metrics, "rnnserve_model_reloads_total", model="tiny-gru") == 1
    assert sample(metrics, "rnnserve_model_unloads_total", model="tiny-gru") == 1
    assert (
        sample(
            metrics,
            "grpc_server_handled_total",
            grpc_service="rnnserve.v1.Inference",
            grpc_method="Stream",
            grpc_type="bidi_stream",
            grpc_code="OK",
        )
        == 3
    )
    server.stop()


def _publish(model_dir: Path, version: int, files: dict[str, bytes]) -> Path:
    """Put a version in place the way an exporter does: a staging directory, then a rename."""
    staging = model_dir / f".tmp-test-{version}"
    staging.mkdir()
    for name, data in files.items():
        (staging / name).write_bytes(data)
    target = model_dir / str(version)
    os.rename(staging, target)
    return target


def test_a_broken_version_is_refused_once_and_the_old_one_serves(
    tmp_path: Path, model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny-lstm", repository / "tiny-lstm")
    model = (repository / "tiny-lstm" / "1" / sig.MODEL_FILE).read_bytes()
    config = (repository / "tiny-lstm" / "1" / sig.CONFIG_FILE).read_text()
    server = OpsServer(repository, reload_interval_s=0.05)
    try:
        with caplog.at_level(logging.ERROR, logger="serving.ops.reload"):
            half_written = _publish(
                repository / "tiny-lstm",
                2,
                {
                    sig.MODEL_FILE: model[: len(model) // 2],  # a copy still in progress
                    sig.CONFIG_FILE: config.replace('"version": 1', '"version": 2').encode(),
                },
            )
            _publish(repository / "tiny-lstm", 3, {sig.MODEL_FILE: model})  # config.json never came
            refusals = "rnnserve_model_refusals_total"
            wait_for(lambda: sample(server.scrape(), refusals) == 2, 10, "both versions to be refused")
            before, checks = len(caplog.records), server.server.watcher.checks
            wait_for(lambda: server.server.watcher.checks >= checks + 8, 10, "eight more polls")
            assert sample(server.scrape(), refusals) == 2, "a refused version was retried unchanged"
            assert len(caplog.records) == before
        messages = [record.getMessage() for record in caplog.records]
        assert any(f"refused {half_written}" in m and "does not match" in m for m in messages)
        assert any("incomplete version, config.json is missing" in m for m in messages)
        assert server.versions("tiny-lstm") == [1]

        async def serves() -> int:
            async with RnnserveClient(server.target) as client:
                created = await client.create_session("tiny-lstm")
                return (await client.step(created.session_id, [3, 4])).prediction.position

        assert run(serves()) == 2
        assert check(server.target, "tiny-lstm", 5) == (True, f"'tiny-lstm' at {server.target}: SERVING")
        # The copy completes (a new file renamed over the old one): the version is tried again.
        (half_written / "complete.tmp").write_bytes(model)
        os.replace(half_written / "complete.tmp", half_written / sig.MODEL_FILE)
        wait_for(lambda: server.versions("tiny-lstm")[0] == 2, 10, "the completed version to load")
    finally:
        server.stop()


def test_sighup_serves_a_model_exported_into_an_empty_repository(
    tmp_path: Path, server_processes: Callable[..., ServerProcess]
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    server = server_processes(
        ["--repository", str(repository), "--reload-interval-s", "0", "--metrics-port", "0"]
    )
    target = server.wait_started()
    assert "has no servable model yet" in server.wait_for_log("no servable model yet").string
    assert check(target, "", 5) == (False, f"the server at {target}: NOT_SERVING")
    export_tiny_model(repository, tmp_path / "checkpoints", "tiny-gru", "gru", 1)
    server.send(signal.SIGHUP)
    wait_for(lambda: check(target, "", 5)[0], 20, "the server to serve after SIGHUP")
    assert check(target, "tiny-gru", 5)[0]

    async def generate() -> list[int]:
        async with RnnserveClient(target) as client:
            tokens: list[int] = []
            async for response in client.generate("tiny-gru", prompt_tokens=[1, 2], max_new_tokens=4):
                tokens += response.tokens
            return tokens

    assert len(run(generate())) == 4
    server.send(signal.SIGTERM)
    assert server.wait() == 0
