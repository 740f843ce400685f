"""Bad input on every front door gets a clear error with the contract's code and changes no session.

Each case runs while a sequence is open; afterwards the sequence continues exactly as if the bad
requests had never been sent, and no session was opened or closed by them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from serving.clients.client import error_info
from serving.core.errors import ERROR_DOMAIN
from serving.frontend.kserve_grpc import SERVICE_NAME
from tests.support.frontend import FrontDoorServer
from tests.support.models import Oracle

SEQUENCE = 31337
MODEL = "tiny-lstm"
OVERSIZED = 5 << 20  # bytes: over the HTTP door's body limit under the default settings


@pytest.fixture(scope="module")
def doors(model_repository: Path) -> Iterator[FrontDoorServer]:
    running = FrontDoorServer(model_repository)
    yield running
    running.stop()


def _input(values: Any, shape: list[int], datatype: str = "INT64") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("tokens", shape, datatype)
    tensor.set_data_from_numpy(np.asarray(values))
    return tensor


GRPC_CASES: list[tuple[str, dict[str, Any], str, str, str]] = [
    # (case, infer() arguments, status, ErrorInfo reason, words the message must contain)
    (
        "unknown model",
        {"model_name": "nope", "inputs": [_input([[1]], [1, 1])]},
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
        "not served",
    ),
    (
        "unknown version",
        {"model_name": MODEL, "model_version": "7", "inputs": [_input([[1]], [1, 1])]},
        "NOT_FOUND",
        "VERSION_NOT_FOUND",
        "version 7",
    ),
    (
        "bad version",
        {"model_name": MODEL, "model_version": "one", "inputs": [_input([[1]], [1, 1])]},
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "positive integer",
    ),
    (
        "wrong datatype",
        {"model_name": MODEL, "inputs": [_input(np.array([[1]], np.int32), [1, 1], "INT32")]},
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "must be INT64",
    ),
    (
        "wrong shape",
        {"model_name": MODEL, "inputs": [_input(np.array([1, 2], np.int64), [2])]},
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "shape [1, T]",
    ),
    (
        "two rows",
        {"model_name": MODEL, "inputs": [_input(np.array([[1], [2]], np.int64), [2, 1])]},
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "shape [1, T]",
    ),
    (
        "out of vocabulary",
        {"model_name": MODEL, "inputs": [_input(np.array([[999]], np.int64), [1, 1])]},
        "INVALID_ARGUMENT",
        "TOKEN_OUT_OF_VOCABULARY",
        "outside the vocabulary",
    ),
    (
        "unknown parameter",
        {"model_name": MODEL, "inputs": [_input([[1]], [1, 1])], "parameters": {"colour": "red"}},
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "unknown request parameter",
    ),
    (
        "unknown sequence",
        {"model_name": MODEL, "inputs": [_input([[1]], [1, 1])], "sequence_id": 999},
        "NOT_FOUND",
        "SESSION_NOT_FOUND",
        "sequence_start",
    ),
    (
        "unknown output",
        {
            "model_name": MODEL,
            "inputs": [_input([[1]], [1, 1])],
            "outputs": [grpcclient.InferRequestedOutput("logits")],
        },
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST",
        "unknown outputs",
    ),
    (
        "bad sampling",
        {
            "model_name": MODEL,
            "inputs": [_input([[1]], [1, 1])],
            "sequence_id": SEQUENCE,
            "parameters": {"temperature": -1.0},
        },
        "INVALID_ARGUMENT",
        "INVALID_OPTION",
        "temperature",
    ),
    (
        "bad top_k on the open sequence",
        {
            "model_name": MODEL,
            "inputs": [_input([[1]], [1, 1])],
            "sequence_id": SEQUENCE,
            "parameters": {"top_k": 0},
        },
        "INVALID_ARGUMENT",
        "INVALID_OPTION",
        "top_k",
    ),
    (
        "bad tokens on the open sequence",
        {
            "model_name": MODEL,
            "inputs": [_input(np.array([[1, 999]], np.int64), [1, 2])],
            "sequence_id": SEQUENCE,
        },
        "INVALID_ARGUMENT",
        "TOKEN_OUT_OF_VOCABULARY",
        "token id 999",
    ),
]

HTTP_CASES: list[tuple[str, str, Any, int, str, str]] = [
    # (case, path, body: bytes or JSON, HTTP status, reason, words the error must contain)
    ("malformed JSON", f"/v2/models/{MODEL}/infer", b"{not json", 400, "MALFORMED_REQUEST", "not valid JSON"),
    (
        "a body over the size limit",
        f"/v2/models/{MODEL}/generate",
        b"x" * OVERSIZED,  # not JSON either: read whole, it would answer 400
        429,
        "TOO_MANY_TOKENS",
        "over this server's limit",
    ),
    ("no inputs", f"/v2/models/{MODEL}/infer", {"parameters": {}}, 400, "MALFORMED_REQUEST", "inputs"),
    (
        "float data for INT64",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [1.5]}]},
        400,
        "MALFORMED_REQUEST",
        "integers",
    ),
    (
        "data of the wrong size",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]},
        400,
        "MALFORMED_REQUEST",
        "needs 3",
    ),
    (
        "unknown datatype",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "tokens", "datatype": "INT65", "shape": [1, 1], "data": [1]}]},
        400,
        "MALFORMED_REQUEST",
        "does not define",
    ),
    (
        "string sequence_start",
        f"/v2/models/{MODEL}/infer",
        {
            "parameters": {"sequence_id": SEQUENCE, "sequence_start": "yes"},
            "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [1]}],
        },
        400,
        "MALFORMED_REQUEST",
        "boolean",
    ),
    (
        "unknown model",
        "/v2/models/nope/infer",
        {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [1]}]},
        404,
        "MODEL_NOT_FOUND",
        "not served",
    ),
    ("unknown model config", "/v2/models/nope/config", None, 404, "MODEL_NOT_FOUND", "not served"),
    (
        "generate: malformed JSON",
        f"/v2/models/{MODEL}/generate",
        b"[1,",
        400,
        "MALFORMED_REQUEST",
        "not valid JSON",
    ),
    (
        "generate: unknown parameter",
        f"/v2/models/{MODEL}/generate",
        {"text_input": "a", "parameters": {"max_new_tokens": 3}},
        400,
        "MALFORMED_REQUEST",
        "unknown generate parameter",
    ),
    (
        "generate: max_tokens type",
        f"/v2/models/{MODEL}/generate",
        {"text_input": "a", "parameters": {"max_tokens": "3"}},
        400,
        "MALFORMED_REQUEST",
        "must be int",
    ),
    (
        "generate: over the limit",
        f"/v2/models/{MODEL}/generate",
        {"text_input": "a", "parameters": {"max_tokens": 10**6}},
        429,
        "MAX_NEW_TOKENS_EXCEEDED",
        "max-new-tokens",
    ),
    (
        "generate: character outside the alphabet",
        f"/v2/models/{MODEL}/generate_stream",
        {"text_input": "ZZZ"},
        400,
        "INVALID_PROMPT",
        "cannot be encoded",
    ),
    (
        "generate: unknown session",
        f"/v2/models/{MODEL}/generate",
        {"text_input": "a", "parameters": {"session_id": "0" * 32}},
        404,
        "SESSION_NOT_FOUND",
        "session",
    ),
    (
        "generate: unknown sequence",
        f"/v2/models/{MODEL}/generate_stream",
        {"text_input": "a", "parameters": {"sequence_id": "nope"}},
        404,
        "SESSION_NOT_FOUND",
        "sequence_start",
    ),
    (
        "generate: sequence and session",
        f"/v2/models/{MODEL}/generate",
        {"text_input": "a", "parameters": {"sequence_id": 3, "keep_session": True}},
        400,
        "INVALID_OPTION",
        "not both",
    ),
]


def _start_sequence(doors: FrontDoorServer) -> grpcclient.InferenceServerClient:
    client = grpcclient.InferenceServerClient(doors.target)
    client.infer(
        MODEL, [_input(np.array([[1, 2]], np.int64), [1, 2])], sequence_id=SEQUENCE, sequence_start=True
    )
    return client


def _finish_sequence(doors: FrontDoorServer, client: grpcclient.InferenceServerClient, sessions: int) -> None:
    assert doors.on_loop(lambda: len(doors.runtime.sessions)) == sessions
    result = client.infer(
        MODEL, [_input(np.array([[3]], np.int64), [1, 1])], sequence_id=SEQUENCE, sequence_end=True
    )
    client.close()
    oracle = Oracle(doors.settings.repository / MODEL / "1")
    np.testing.assert_allclose(result.as_numpy("logprobs")[0], oracle.logprobs([1, 2, 3]), atol=1e-5)


def test_grpc_bad_requests_are_refused_and_change_nothing(doors: FrontDoorServer) -> None:
    client = _start_sequence(doors)
    sessions = doors.on_loop(lambda: len(doors.runtime.sessions))
    for case, arguments, status, _, words in GRPC_CASES:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(**arguments)
        assert refused.value.status() == f"StatusCode.{status}", case
        assert words in refused.value.message(), (case, refused.value.message())
    _finish_sequence(doors, client, sessions)


def test_grpc_refusals_carry_the_error_info_of_rnnserve_v1(doors: FrontDoorServer) -> None:
    """The same requests on a plain stub: each status carries the ErrorInfo with its reason."""
    client = _start_sequence(doors)
    sessions = doors.on_loop(lambda: len(doors.runtime.sessions))
    with grpc.insecure_channel(doors.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for case, arguments, status, reason, _ in GRPC_CASES:
            request = _get_inference_request(
                model_name=arguments["model_name"],
                inputs=arguments["inputs"],
                model_version=arguments.get("model_version", ""),
                request_id="",
                outputs=arguments.get("outputs"),
                sequence_id=arguments.get("sequence_id", 0),
                sequence_start=False,
                sequence_end=False,
                priority=0,
                timeout=None,
                parameters=arguments.get("parameters"),
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
            assert refused.value.code() == getattr(grpc.StatusCode, status), case
            info = error_info(refused.value)
            assert info is not None and info.domain == ERROR_DOMAIN, case
            assert info.reason == reason, (case, info)
    _finish_sequence(doors, client, sessions)


def test_stream_infer_answers_errors_in_the_stream_and_goes_on(doors: FrontDoorServer) -> None:
    client = _start_sequence(doors)
    sessions = doors.on_loop(lambda: len(doors.runtime.sessions))
    answers: list[Any] = []
    client.start_stream(callback=lambda result, error: answers.append(error or result))
    for index, (_, arguments, _, _, _) in enumerate(GRPC_CASES):
        client.async_stream_infer(request_id=str(index), **arguments)
    client.stop_stream()  # waits for every answer
    assert len(answers) == len(GRPC_CASES)
    assert all(isinstance(answer, InferenceServerException) for answer in answers), answers
    messages = sorted(a.message() for a in answers)
    for _, _, status, reason, words in GRPC_CASES:
        prefix = f"{status} {reason}: "
        assert any(m.startswith(prefix) and words in m for m in messages), (prefix, words, messages)
    _finish_sequence(doors, client, sessions)


def test_http_bad_requests_are_refused_and_change_nothing(doors: FrontDoorServer) -> None:
    client = _start_sequence(doors)
    sessions = doors.on_loop(lambda: len(doors.runtime.sessions))
    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        for case, path, body, status, reason, words in HTTP_CASES:
            if body is None:
                response = http.get(path)
            elif isinstance(body, bytes):
                response = http.post(path, content=body)
            else:
                response = http.post(path, json=body)
            assert response.status_code == status, (case, response.text)
            assert words in response.json()["error"], (case, response.json())
            assert response.json()["reason"] == reason, (case, response.json())
    _finish_sequence(doors, client, sessions)


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(doors: FrontDoorServer) -> None:
    """Without a Content-Length the body is counted as it arrives; the server stops reading it
    (not JSON either: read whole, it would answer 400 MALFORMED_REQUEST)."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 64 MiB, far past the limit, if the server read it all
            sent += 1
            yield b"x" * (1 << 20)

    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        try:
            response = http.post(f"/v2/models/{MODEL}/generate", content=chunks())
        except httpx.HTTPError:  # the server answered and closed before the client sent it all
            assert sent < 64
            return
    assert response.status_code == 429 and response.json()["reason"] == "TOO_MANY_TOKENS", response.text


def test_a_body_that_is_not_the_message_answers_invalid_argument(doors: FrontDoorServer) -> None:
    with grpc.insecure_channel(doors.target) as channel:
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/ModelInfer",
            request_serializer=lambda body: body,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in refused.value.details()
    info = error_info(refused.value)
    assert info is not None and info.reason == "MALFORMED_REQUEST"


def test_kserve_grpc_needs_a_bearer_token_except_for_probes(model_repository: Path) -> None:
    from tests.support.ops import OpsServer

    token = "alice-token-0123456789abcdef"
    server = OpsServer(model_repository, auth_tokens=f"alice:{token}", metrics_port=0)
    try:
        client = grpcclient.InferenceServerClient(server.target)
        assert client.is_server_live() and client.is_server_ready()  # probes need no token
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [_input(np.array([[1]], np.int64), [1, 1])])
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        headers = {"authorization": f"Bearer {token}"}
        answer = client.infer(MODEL, [_input(np.array([[1]], np.int64), [1, 1])], headers=headers)
        assert answer.as_numpy("next_token").shape == (1, 1)
        client.close()
    finally:
        server.stop()


def test_a_huge_model_name_is_refused_with_not_found_and_echoed_cut(doors: FrontDoorServer) -> None:
    """Every door answers a model name of any length with NOT_FOUND and a short message."""
    huge = "m" * 100_000
    client = grpcclient.InferenceServerClient(doors.target)
    for call in (
        lambda: client.infer(huge, [_input([[1]], [1, 1])]),
        lambda: client.infer(huge, [_input([[1]], [1, 1])], sequence_id=SEQUENCE),  # a sequence's lookup
        lambda: client.get_model_metadata(huge),
        lambda: client.get_model_config(huge),
    ):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.NOT_FOUND", refused.value.message()[:200]
        assert len(refused.value.message()) < 1000
    client.close()
    long_name = "m" * 8_000  # within what an HTTP request line may carry
    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        for response in (
            http.get(f"/v2/models/{long_name}"),
            http.post(f"/v2/models/{long_name}/generate", json={"text_input": "a"}),
            http.post(
                f"/v2/models/{long_name}/generate", json={"text_input": "a", "parameters": {"sequence_id": 5}}
            ),
        ):
            assert response.status_code == 404, response.text[:200]
            assert response.json()["reason"] == "MODEL_NOT_FOUND"
            assert len(response.json()["error"]) < 1000
