"""The HTTP door: Triton's generate extension (JSON and server-sent events), sequences shared
with the gRPC doors, bearer tokens, and the routes' error answers."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.ops.auth import load_tokens
from serving.settings import ServerSettings
from tests.support.frontend import FrontDoorServer, grpc_generate_text
from tests.support.models import Oracle
from tests.support.servers import run

TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"


@pytest.fixture(scope="module")
def doors(model_repository: Path) -> Iterator[FrontDoorServer]:
    running = FrontDoorServer(model_repository)
    yield running
    running.stop()


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_generate_stream_gives_grpc_generates_text(doors: FrontDoorServer, model: str) -> None:
    expected = run(grpc_generate_text(doors.target, model, "to be or", 40, seed=11))
    body = {"text_input": "to be or", "parameters": {"max_tokens": 40, "seed": 11}}
    with (
        httpx.Client(base_url=doors.http_url, timeout=30) as http,
        http.stream("POST", f"/v2/models/{model}/generate_stream", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert "".join(e["text_output"] for e in events) == expected
    assert sum(len(e["token_ids"]) for e in events) == 40
    assert all(e["model_name"] == model and e["model_version"] == "1" for e in events)
    assert events[-1]["finish_reason"] == "length"
    assert all("finish_reason" not in e for e in events[:-1])
    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        whole = http.post(f"/v2/models/{model}/versions/1/generate", json=body).json()
    assert whole["text_output"] == expected and whole["finish_reason"] == "length"
    assert doors.on_loop(lambda: len(doors.runtime.sessions)) == 0


def test_a_sequence_is_one_session_on_every_door(doors: FrontDoorServer) -> None:
    """Started over HTTP generate, continued over gRPC infer, ended over HTTP infer."""
    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        started = http.post(
            "/v2/models/tiny-gru/generate",
            json={
                "text_input": "ab",
                "parameters": {"max_tokens": 3, "sequence_id": 5, "sequence_start": True},
            },
        ).json()
        client = grpcclient.InferenceServerClient(doors.target)
        tokens = grpcclient.InferInput("tokens", [1, 1], "INT64")
        tokens.set_data_from_numpy(np.array([[4]], np.int64))
        client.infer("tiny-gru", [tokens], sequence_id=5)
        client.close()
        ended = http.post(
            "/v2/models/tiny-gru/infer",
            json={
                "parameters": {"sequence_id": 5, "sequence_end": True},
                "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [[6]]}],
                "outputs": [{"name": "logprobs"}],
            },
        )
        assert ended.status_code == 200, ended.text
        logprobs = np.array(ended.json()["outputs"][0]["data"])
        again = http.post(
            "/v2/models/tiny-gru/infer",
            json={
                "parameters": {"sequence_id": 5},
                "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [6]}],
            },
        )
    assert again.status_code == 404 and "sequence_start" in again.json()["error"]
    vocab = json.loads(doors.runtime.registry.latest("tiny-gru").tokenizer.to_json())["vocab"]
    history = [vocab.index("a"), vocab.index("b"), *started["token_ids"], 4, 6]
    oracle = Oracle(doors.settings.repository / "tiny-gru" / "1")
    np.testing.assert_allclose(logprobs, oracle.logprobs(history), atol=1e-5)


def test_session_mode_keeps_state_across_prompts(doors: FrontDoorServer) -> None:
    with httpx.Client(base_url=doors.http_url, timeout=30) as http:
        first = http.post(
            "/v2/models/tiny-lstm/generate",
            json={"text_input": "the", "parameters": {"max_tokens": 4, "seed": 1, "keep_session": True}},
        ).json()
        session_id = first["session_id"]
        second = http.post(
            "/v2/models/tiny-lstm/generate",
            json={"text_input": " cat", "parameters": {"max_tokens": 4, "seed": 1, "session_id": session_id}},
        ).json()
    assert second["session_id"] == session_id
    position = doors.on_loop(lambda: doors.runtime.sessions.get(session_id).position)
    assert position == len("the") + 4 + len(" cat") + 4


def test_bearer_tokens_and_ownership_on_http(model_repository: Path) -> None:
    tokens = load_tokens(ServerSettings(auth_tokens=f"alice:{TOKEN},bob:{BOB_TOKEN}"))
    server = FrontDoorServer(model_repository, tokens=tokens)
    try:
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            assert http.get("/v2/health/ready").status_code == 200  # probes need no token
            missing = http.get("/v2/models/tiny-gru")
            assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
            wrong = http.get("/v2/models/tiny-gru", headers={"Authorization": "Bearer nope-nope-nope-nope"})
            assert wrong.status_code == 401
            alice = {"Authorization": f"Bearer {TOKEN}"}
            kept = http.post(
                "/v2/models/tiny-gru/generate",
                headers=alice,
                json={"text_input": "a", "parameters": {"max_tokens": 2, "keep_session": True}},
            ).json()
            stolen = http.post(
                "/v2/models/tiny-gru/generate",
                headers={"Authorization": f"Bearer {BOB_TOKEN}"},
                json={"text_input": "a", "parameters": {"session_id": kept["session_id"]}},
            )
            assert stolen.status_code == 404
    finally:
        server.stop()


def test_rnnserve_generate_accepts_an_http_url(
    doors: FrontDoorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.clients.generate import main

    expected = run(grpc_generate_text(doors.target, "tiny-lstm", "abc", 20, seed=5))
    argv = [
        "--model",
        "tiny-lstm",
        "--prompt",
        "abc",
        "--max-new-tokens",
        "20",
        "--seed",
        "5",
        "--temperature",
        "1",
    ]
    assert main(["--target", doors.http_url, *argv]) == 0
    assert capsys.readouterr().out == "abc" + expected + "\n"
    assert main(["--target", doors.http_url, "--model", "nope", "--prompt", "a"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_http_port_settings_and_a_taken_port(model_repository: Path) -> None:
    import socket

    from serving.frontend.server import BindError, build_server
    from serving.settings import parse_settings

    assert parse_settings([], environ={}).http_port == 8000
    assert parse_settings([], environ={"RNNSERVE_HTTP_PORT": "0"}).http_port == 0
    flagged = parse_settings(["--http-port", "8100", "--http-host", "::1"], environ={})
    assert (flagged.http_port, flagged.http_bind_host) == (8100, "::1")
    with pytest.raises(SystemExit):
        parse_settings(["--http-port", "50051"], environ={})  # the gRPC port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(repository=model_repository, port=0, metrics_port=0, http_port=port)

        async def build() -> None:
            from serving.core.registry import load_repository

            await build_server(settings, load_repository(settings))

        with pytest.raises(BindError, match=f"HTTP 127.0.0.1:{port}"):
            run(build())


def test_the_http_door_serves_https_with_the_servers_certificate(
    model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --tls-cert/--tls-key (and --tls-client-ca) the HTTP door is HTTPS, asking for client
    certificates as gRPC does; plaintext HTTP gets no answer."""
    from tests.support.ops import OpsServer, free_port, make_certificates

    certificates = make_certificates(tmp_path / "certificates")
    server = OpsServer(
        model_repository,
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        tls_client_ca=certificates.ca,
        http_port=free_port(),
        metrics_port=0,
    )
    try:
        frontend = server.server.http_frontend
        assert frontend is not None and frontend.url.startswith("https://")
        ready_url = f"https://127.0.0.1:{frontend.port}/v2/health/ready"
        trusted = ssl.create_default_context(cafile=str(certificates.ca))
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(ready_url, verify=trusted, timeout=10)
        trusted.load_cert_chain(certificates.client_cert, certificates.client_key)
        ready = httpx.get(ready_url, verify=trusted, timeout=10)
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        with pytest.raises(httpx.HTTPError):  # plaintext
            httpx.get(f"http://127.0.0.1:{frontend.port}/v2/health/ready", timeout=10)
        from serving.clients.generate import main

        tls = ["--tls-ca", str(certificates.ca), "--tls-cert", str(certificates.client_cert)]
        tls += ["--tls-key", str(certificates.client_key)]
        argv = ["--target", frontend.url, "--model", "tiny-lstm", "--prompt", "abc", "--max-new-tokens", "5"]
        assert main([*argv, *tls]) == 0
        assert capsys.readouterr().out.startswith("abc")
    finally:
        server.stop()
