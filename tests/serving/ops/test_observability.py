"""Observability of the whole server: /metrics scraped over HTTP while requests run, request ids,
and logs that never carry what clients send."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient
from serving.frontend.server import BindError
from serving.ops.logs import JsonFormatter, RequestIdFilter, TextFormatter
from tests.support.ops import OpsServer, sample, wait_for
from tests.support.servers import run

INFERENCE = "rnnserve.v1.Inference"


@pytest.fixture
def ops_server(model_repository: Path) -> Iterator[OpsServer]:
    server = OpsServer(
        model_repository,
        max_sessions=2,
        session_overflow="evict",
        session_idle_timeout_s=1.0,
        log_requests=True,
    )
    yield server
    server.stop()


def test_metrics_change_as_requests_run(ops_server: OpsServer) -> None:
    server = ops_server
    before = server.scrape()
    cpu = "CPUExecutionProvider"
    for model in ("tiny-lstm", "tiny-gru"):
        assert (
            sample(before, "rnnserve_model_info", model=model, version="1", provider=cpu, providers=cpu) == 1
        )
        assert sample(before, "rnnserve_model_loads_total", model=model) == 1
    assert sample(before, "rnnserve_sessions_open") == 0 and sample(before, "rnnserve_draining") == 0

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            async with client.stream("tiny-lstm", top_k=2) as stream:
                await stream.send([1, 2, 3])
                await stream.send([4])
                during = await asyncio.to_thread(server.scrape)
                assert sample(during, "rnnserve_sessions_active", model="tiny-lstm", version="1") == 1
                assert sample(during, "rnnserve_sessions_open") == 1
                stream_labels = {
                    "grpc_service": INFERENCE,
                    "grpc_method": "Stream",
                    "grpc_type": "bidi_stream",
                }
                assert sample(during, "grpc_server_started_total", **stream_labels) == 1
                # The open and two chunks; the opened event and two predictions.
                assert sample(during, "grpc_server_msg_received_total", **stream_labels) == 3
                assert sample(during, "grpc_server_msg_sent_total", **stream_labels) == 3
                assert ("rnnserve_queue_depth", (("model", "tiny-lstm"), ("version", "1"))) in during
                await stream.end()
            with pytest.raises(grpc.aio.AioRpcError):
                await client.step("0" * 32, [1])
            _ = [r async for r in client.generate("tiny-gru", prompt_tokens=[1, 2], max_new_tokens=5)]
            # max_sessions=2: the third session evicts the least recently used one.
            for _ in range(3):
                await client.create_session("tiny-gru")

    run(scenario())
    # The two sessions left expire after 1 s idle (the sweep runs every 0.25 s).
    wait_for(
        lambda: (
            sample(server.scrape(), "rnnserve_sessions_ended_total", model="tiny-gru", reason="expired") == 2
        ),
        10,
        "the idle sessions to expire",
    )
    after = server.scrape()
    handled = "grpc_server_handled_total"
    labels = {"grpc_service": INFERENCE}
    assert (
        sample(after, handled, **labels, grpc_method="Stream", grpc_type="bidi_stream", grpc_code="OK") == 1
    )
    assert sample(after, handled, **labels, grpc_method="Step", grpc_type="unary", grpc_code="NOT_FOUND") == 1
    assert (
        sample(after, handled, **labels, grpc_method="Generate", grpc_type="server_stream", grpc_code="OK")
        == 1
    )
    assert (
        sample(after, handled, **labels, grpc_method="CreateSession", grpc_type="unary", grpc_code="OK") == 3
    )
    assert sample(after, "rnnserve_tokens_in_total", model="tiny-lstm") == 4
    assert sample(after, "rnnserve_tokens_out_total", model="tiny-gru") == 5
    assert sample(after, "rnnserve_sessions_ended_total", model="tiny-gru", reason="evicted") == 1
    assert sample(after, "rnnserve_sessions_ended_total", model="tiny-lstm", reason="closed") == 1
    assert sample(after, "rnnserve_sessions_active", model="tiny-gru", version="1") == 0
    assert sample(after, "rnnserve_batch_size_count", model="tiny-lstm") >= 2
    assert sample(after, "rnnserve_queue_wait_seconds_count", model="tiny-lstm") >= 2
    assert sample(after, "rnnserve_batch_compute_seconds_count", model="tiny-gru") >= 5
    assert sample(after, "rnnserve_sessions_open") == 0


def test_metrics_port_zero_disables_the_endpoint_and_a_taken_port_fails(model_repository: Path) -> None:
    from serving.core.registry import load_repository
    from serving.frontend.server import build_server
    from serving.ops.metrics import MetricsObserver
    from serving.settings import ServerSettings

    async def build(metrics_port: int) -> object:
        settings = ServerSettings(repository=model_repository, port=0, metrics_port=metrics_port)
        metrics = MetricsObserver(process_metrics=False)
        registry = load_repository(settings, metrics)
        server, _ = await build_server(settings, registry, metrics=metrics)
        endpoint = server.metrics_endpoint
        await server.stop(0)
        return endpoint

    assert run(build(0)) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BindError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            run(build(taken.getsockname()[1]))


class Captured(logging.Handler):
    """Formats every record as the server's handler would (text and JSON), with request ids."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.text: list[str] = []
        self.json: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(TextFormatter().format(record))
        self.json.append(json.loads(JsonFormatter().format(record)))


def test_request_ids_and_logs_without_client_content(ops_server: OpsServer) -> None:
    captured = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    try:

        async def scenario() -> tuple[str | None, str | None]:
            async with RnnserveClient(ops_server.target) as client:
                created = await client.create_session("tiny-gru")
                call = client.stub.Step(
                    pb.StepRequest(session_id=created.session_id, tokens=[7, 8, 9]),
                    metadata=(("x-request-id", "trace-42"),),
                )
                await call
                given = dict(await call.trailing_metadata()).get("x-request-id")
                generated_call = client.stub.ListModels(
                    pb.ListModelsRequest(), metadata=(("x-request-id", "not an id!"),)
                )
                await generated_call
                generated = dict(await generated_call.trailing_metadata()).get("x-request-id")
                async for _ in client.generate("tiny-gru", prompt_text="secret words", max_new_tokens=3):
                    pass
                return given, generated

        given, generated = run(scenario())
        # The access line of a call is logged as its handler returns, just after the client's read.
        wait_for(
            lambda: any(e.get("rpc", "").endswith("/Generate") for e in captured.json), 5, "the access log"
        )
    finally:
        root.removeHandler(captured)
        root.setLevel(level)
    assert given == "trace-42"
    assert generated is not None and len(generated) == 16 and generated != "not an id!"
    step_lines = [e for e in captured.json if e.get("rpc") == f"/{INFERENCE}/Step"]
    assert step_lines and step_lines[0]["request_id"] == "trace-42" and step_lines[0]["code"] == "OK"
    assert any(line.endswith("[request_id=trace-42]") for line in captured.text)
    everything = "\n".join(captured.text)
    assert "secret words" not in everything and "7, 8, 9" not in everything and "[7, 8, 9]" not in everything


def test_json_log_lines_parse() -> None:
    record = logging.LogRecord("rnnserve.test", logging.ERROR, __file__, 1, "it %s", ("failed",), None)
    record.request_id = "abc"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "it failed" and entry["level"] == "ERROR" and entry["request_id"] == "abc"
    assert time.strptime(str(entry["time"])[:19], "%Y-%m-%dT%H:%M:%S")
