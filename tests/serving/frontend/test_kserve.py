"""KServe v2 as Triton speaks it, through Triton's own clients (tritonclient.grpc and .http).

A 100-token sequence, one token per request, must give the same log-probabilities as
rnnserve.v1 Stream (to 1e-5) on LSTM and GRU, on ModelInfer, ModelStreamInfer and REST infer;
the model configuration must show the sequence batcher and the implicit state.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.clients.client import error_info
from tests.support.frontend import FrontDoorServer, stream_logprobs
from tests.support.models import ALPHABET, TINY_MODELS, Oracle
from tests.support.servers import run

SEQUENCE_LENGTH = 100


@pytest.fixture(scope="module")
def doors(model_repository: Path) -> Iterator[FrontDoorServer]:
    running = FrontDoorServer(model_repository)
    yield running
    running.stop()


def _tokens(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, len(set(ALPHABET)), SEQUENCE_LENGTH).tolist()


def _grpc_input(client_module: object, token: int) -> object:
    tensor = client_module.InferInput("tokens", [1, 1], "INT64")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([[token]], np.int64))
    return tensor


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_grpc_model_infer_sequence_matches_stream(doors: FrontDoorServer, model: str) -> None:
    tokens = _tokens(1)
    expected = run(stream_logprobs(doors.target, model, tokens))
    client = grpcclient.InferenceServerClient(doors.target)
    rows = []
    for index, token in enumerate(tokens):
        result = client.infer(
            model,
            [_grpc_input(grpcclient, token)],
            sequence_id=4242,
            sequence_start=index == 0,
            sequence_end=index == len(tokens) - 1,
        )
        rows.append(result.as_numpy("logprobs")[0])
        assert result.as_numpy("next_token")[0, 0] == int(np.argmax(rows[-1]))
    client.close()
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-5)
    assert doors.on_loop(lambda: len(doors.runtime.sessions)) == 0  # END closed the sequence


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_grpc_stream_infer_sequence_matches_stream(doors: FrontDoorServer, model: str) -> None:
    tokens = _tokens(2)
    expected = run(stream_logprobs(doors.target, model, tokens))
    answers: queue.Queue[object] = queue.Queue()
    client = grpcclient.InferenceServerClient(doors.target)
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    for index, token in enumerate(tokens):
        client.async_stream_infer(
            model,
            [_grpc_input(grpcclient, token)],
            request_id=str(index),
            sequence_id="a string id",
            sequence_start=index == 0,
            sequence_end=index == len(tokens) - 1,
        )
    results = [answers.get(timeout=30) for _ in tokens]
    client.stop_stream()
    client.close()
    assert all(isinstance(r, grpcclient.InferResult) for r in results), results
    # One sequence: the answers come in request order.
    assert [r.get_response().id for r in results] == [str(i) for i in range(len(tokens))]
    np.testing.assert_allclose(np.stack([r.as_numpy("logprobs")[0] for r in results]), expected, atol=1e-5)


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
@pytest.mark.parametrize("binary", [True, False])
def test_http_infer_sequence_matches_stream(doors: FrontDoorServer, model: str, binary: bool) -> None:
    tokens = _tokens(3)
    expected = run(stream_logprobs(doors.target, model, tokens))
    client = httpclient.InferenceServerClient(doors.http_url.removeprefix("http://"))
    rows = []
    for index, token in enumerate(tokens):
        tensor = httpclient.InferInput("tokens", [1, 1], "INT64")
        tensor.set_data_from_numpy(np.array([[token]], np.int64), binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logprobs", "next_token")
        ]
        result = client.infer(
            model,
            [tensor],
            outputs=outputs,
            sequence_id=77,
            sequence_start=index == 0,
            sequence_end=index == len(tokens) - 1,
        )
        rows.append(result.as_numpy("logprobs")[0])
    client.close()
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-5)


def test_top_k_outputs_and_sampled_next_token(doors: FrontDoorServer) -> None:
    client = grpcclient.InferenceServerClient(doors.target)
    tokens = grpcclient.InferInput("tokens", [1, 3], "INT64")
    tokens.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
    ranked = client.infer("tiny-lstm", [tokens], parameters={"top_k": 4})
    full = client.infer("tiny-lstm", [tokens])
    logprobs = full.as_numpy("logprobs")[0]
    assert ranked.as_numpy("logprobs") is None
    np.testing.assert_array_equal(ranked.as_numpy("top_ids")[0], np.argsort(-logprobs, kind="stable")[:4])
    np.testing.assert_allclose(ranked.as_numpy("top_logprobs")[0], np.sort(logprobs)[::-1][:4], atol=1e-6)
    seeded = [
        client.infer("tiny-lstm", [tokens], parameters={"temperature": 1.0, "seed": 9}).as_numpy("next_token")
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    client.close()


def test_model_config_reports_the_sequence_batcher_and_state(doors: FrontDoorServer) -> None:
    client = grpcclient.InferenceServerClient(doors.target)
    config = client.get_model_config("tiny-lstm", as_json=True)["config"]
    batching = config["sequence_batching"]
    assert int(batching["max_sequence_idle_microseconds"]) == int(doors.settings.session_idle_timeout_s * 1e6)
    assert [(s["input_name"], s["output_name"], s["dims"]) for s in batching["state"]] == [
        ("h0", "hn", ["2", "16"]),
        ("c0", "cn", ["2", "16"]),
    ]
    assert config["parameters"]["arch"]["string_value"] == "lstm"
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny-gru")
    metadata = client.get_model_metadata("tiny-gru")
    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [("tokens", "INT64", [1, -1])]
    assert {m.name for m in client.get_model_repository_index().models} == set(TINY_MODELS)
    assert "sequence" in client.get_server_metadata().extensions
    client.close()
    rest = httpclient.InferenceServerClient(doors.http_url.removeprefix("http://"))
    assert rest.get_model_config("tiny-gru")["sequence_batching"]["state"][0]["input_name"] == "h0"
    assert rest.is_server_ready() and rest.is_model_ready("tiny-lstm", "1")
    stats = rest.get_inference_statistics("tiny-lstm")["model_stats"]
    assert stats[0]["name"] == "tiny-lstm"
    rest.close()


def _sequence_request(token: int, start: bool) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="tiny-lstm")
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])  # values: raw_input_contents
    request.raw_input_contents.append(np.array([[token]], np.int64).tobytes())
    request.parameters["sequence_id"].int64_param = 77
    request.parameters["sequence_start"].bool_param = start
    return request


def test_an_idle_stream_infer_ends_and_its_sequence_stays_open(model_repository: Path) -> None:
    """ModelStreamInfer has rnnserve.v1 Stream's idle limit: DEADLINE_EXCEEDED, reason STREAM_IDLE."""
    server = FrontDoorServer(model_repository, stream_idle_timeout_s=0.5)

    async def scenario() -> tuple[object, grpc.aio.AioRpcError, object]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer()
            await call.write(_sequence_request(1, start=True))
            first = await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()  # nothing more is sent: the server ends the stream
            after = await stub.ModelInfer(_sequence_request(2, start=False), timeout=10)
        return first, ended.value, after

    try:
        first, ended, after = run(scenario())
    finally:
        server.stop()
    assert not first.error_message, first.error_message  # type: ignore[attr-defined]
    assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_info(ended)
    assert info is not None and info.reason == "STREAM_IDLE", info
    assert "--stream-idle-timeout-s" in (ended.details() or "")
    oracle = Oracle(model_repository / "tiny-lstm" / "1")
    logprobs = grpcclient.InferResult(after).as_numpy("logprobs")[0]
    np.testing.assert_allclose(logprobs, oracle.logprobs([1, 2]), atol=1e-5)
