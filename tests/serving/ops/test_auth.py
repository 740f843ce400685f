"""Security: TLS with certificates made in the test (and mutual TLS), bearer tokens accepted and
refused, health open to probes, sessions owned by the token that opened them, and limits."""

from __future__ import annotations

import os
import subprocess
import urllib.error
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.clients.client import Connection, RnnserveClient
from serving.clients.health import check
from serving.ops.auth import SecurityConfigError, load_tokens
from serving.settings import ServerSettings
from tests.support.ops import (
    RNNSERVE,
    Certificates,
    OpsServer,
    free_port,
    make_certificates,
    sample,
    scrape,
)
from tests.support.servers import run

T = TypeVar("T")
ALICE = "alice-token-0123456789abcdef"
ALICE_NEW = "alice-rotated-9876543210fedcba"
BOB = "bob-token-0123456789abcdef0123"
ANONYMOUS = "anon-token-0123456789abcdef012"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def secured(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsServer]:
    """Tokens from a file and from the variable, two sessions per token at most, tight limits."""
    token_file = tmp_path_factory.mktemp("tokens") / "tokens"
    token_file.write_text(f"# rnnserve tokens\n\nalice:{ALICE}\n{ANONYMOUS}\n")
    server = OpsServer(
        model_repository,
        auth_tokens_file=token_file,
        auth_tokens=f"bob:{BOB}, alice:{ALICE_NEW}",
        max_sessions_per_token=2,
        max_tokens_per_request=8,
        max_new_tokens=4,
        max_message_bytes=1024,
    )
    yield server
    server.stop()


def as_user(server: OpsServer, token: str | None, scenario: Callable[[RnnserveClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with RnnserveClient(server.target, connection=Connection(token=token), timeout=10) as client:
            return await scenario(client)

    return run(go())


def refusal(
    server: OpsServer, token: str | None, scenario: Callable[[RnnserveClient], Awaitable[Any]]
) -> Any:
    """The AioRpcError a scenario fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        as_user(server, token, scenario)
    return failed.value


def test_tokens_are_required_except_for_health(secured: OpsServer) -> None:
    def list_models(client: RnnserveClient) -> Awaitable[Any]:
        return client.list_models()

    missing = refusal(secured, None, list_models)
    assert missing.code() == UNAUTHENTICATED and "authorization: Bearer <token>" in missing.details()
    wrong = refusal(secured, "not-a-token-of-this-server", list_models)
    assert (
        wrong.code() == UNAUTHENTICATED and wrong.details() == "the bearer token is not valid on this server"
    )
    for token in (ALICE, ALICE_NEW, BOB, ANONYMOUS):
        assert len(as_user(secured, token, list_models)) == 2
    generate = refusal(
        secured, None, lambda c: c.generate("tiny-gru", prompt_tokens=[1], max_new_tokens=1).__anext__()
    )
    assert generate.code() == UNAUTHENTICATED

    async def stream(client: RnnserveClient) -> None:
        async with client.stream("tiny-gru") as opened:
            await opened.send([1])

    assert refusal(secured, None, stream).code() == UNAUTHENTICATED
    # Probes carry no secrets: health answers without a token; reflection does not.
    assert check(secured.target, "", 5) == (True, f"the server at {secured.target}: SERVING")
    with grpc.insecure_channel(secured.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="tiny-lstm"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as closed:
            list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            )
        assert closed.value.code() == UNAUTHENTICATED  # type: ignore[attr-defined]
    metrics = secured.scrape(token=BOB)
    labels = {"grpc_service": "rnnserve.v1.Inference", "grpc_method": "ListModels", "grpc_type": "unary"}
    assert sample(metrics, "grpc_server_handled_total", grpc_code="UNAUTHENTICATED", **labels) == 2
    assert sample(metrics, "grpc_server_handled_total", grpc_code="OK", **labels) == 4


def test_a_session_belongs_to_the_token_that_opened_it(secured: OpsServer) -> None:
    async def open_and_step(client: RnnserveClient) -> str:
        session_id = (await client.create_session("tiny-lstm")).session_id
        await client.step(session_id, [1, 2])
        return session_id

    session_id = as_user(secured, ALICE, open_and_step)
    unknown = refusal(secured, BOB, lambda c: c.step("f" * 32, [3]))
    foreign = refusal(secured, BOB, lambda c: c.step(session_id, [3]))
    assert foreign.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.details() == unknown.details().replace("f" * 32, session_id)  # nothing tells them apart
    assert (
        refusal(secured, ANONYMOUS, lambda c: c.close_session(session_id)).code() == grpc.StatusCode.NOT_FOUND
    )

    async def resume(client: RnnserveClient) -> int:
        async with client.stream(session_id=session_id) as stream:
            return (await stream.send([3])).position

    assert refusal(secured, BOB, resume).code() == grpc.StatusCode.NOT_FOUND

    async def continue_generation(client: RnnserveClient) -> list[Any]:
        return [r async for r in client.generate(session_id=session_id, max_new_tokens=1)]

    assert refusal(secured, BOB, continue_generation).code() == grpc.StatusCode.NOT_FOUND
    # The session is untouched by those attempts, and a rotated token of the same name owns it.
    assert as_user(secured, ALICE, resume) == 3
    assert as_user(secured, ALICE_NEW, resume) == 4
    as_user(secured, ALICE, lambda c: c.close_session(session_id))


def test_limits_answer_resource_exhausted_naming_the_setting(secured: OpsServer) -> None:
    async def open_three(client: RnnserveClient) -> None:
        opened = [(await client.create_session("tiny-gru")).session_id for _ in range(2)]
        try:
            await client.create_session("tiny-gru")
        finally:
            for session_id in opened:
                await client.close_session(session_id)

    too_many = refusal(secured, BOB, open_three)
    assert too_many.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bob holds its limit of 2 open sessions (--max-sessions-per-token)" in too_many.details()
    as_user(secured, ANONYMOUS, lambda c: c.create_session("tiny-gru"))  # another token is not limited

    def step(tokens: list[int]) -> Callable[[RnnserveClient], Awaitable[Any]]:
        async def scenario(client: RnnserveClient) -> Any:
            session_id = (await client.create_session("tiny-gru")).session_id
            try:
                return await client.step(session_id, tokens)
            finally:
                await client.close_session(session_id)

        return scenario

    tokens = refusal(secured, ALICE, step([1] * 9))
    assert (
        tokens.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-tokens-per-request" in tokens.details()
    )
    message = refusal(secured, ALICE, step([1] * 600))  # over --max-message-bytes 1024
    assert message.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    generate = refusal(
        secured, ALICE, lambda c: c.generate("tiny-gru", prompt_tokens=[1], max_new_tokens=5).__anext__()
    )
    assert generate.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-new-tokens" in generate.details()


def test_tls_with_certificates_made_in_the_test(
    model_repository: Path, certificates: Certificates, tmp_path: Path
) -> None:
    server = OpsServer(
        model_repository,
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        auth_tokens=f"ci:{ALICE}",
        health_port=free_port(),
    )
    try:

        async def step(connection: Connection) -> int:
            async with RnnserveClient(server.target, connection=connection, timeout=5) as client:
                session_id = (await client.create_session("tiny-gru")).session_id
                return (await client.step(session_id, [1, 2, 3])).prediction.position

        assert run(step(Connection(tls_ca=certificates.ca, token=ALICE))) == 3
        # The certificate names localhost too.
        localhost = Connection(tls_ca=certificates.ca, tls_server_name="localhost", token=ALICE)
        assert run(step(localhost)) == 3
        for refused in (Connection(token=ALICE), Connection(tls_ca=certificates.other_ca, token=ALICE)):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                run(step(refused))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        # Health: over TLS on the main port, and in plaintext on the health port for probes.
        assert check(server.target, "", 5, Connection(tls_ca=certificates.ca))[0]
        assert not check(server.target, "", 5)[0]
        health_target = f"127.0.0.1:{server.server.health_port}"
        assert check(health_target, "tiny-gru", 5) == (True, f"'tiny-gru' at {health_target}: SERVING")
        # The command-line clients speak TLS and send the token from $RNNSERVE_TOKEN.
        env = {**os.environ, "RNNSERVE_TOKEN": ALICE}
        generate = [
            RNNSERVE,
            "generate",
            "--target",
            server.target,
            "--model",
            "tiny-gru",
            "--prompt",
            "to be",
        ]
        generate += ["--max-new-tokens", "5", "--seed", "1", "--tls-ca", str(certificates.ca)]
        done = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("to be") and len(done.stdout.rstrip("\n")) == len("to be") + 5
        env.pop("RNNSERVE_TOKEN")
        refused = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr
        health = [RNNSERVE, "health", "--target", server.target, "--tls-ca", str(certificates.ca)]
        assert subprocess.run(health, capture_output=True, timeout=60, check=False).returncode == 0
    finally:
        server.stop()


def test_mutual_tls_wants_a_client_certificate(model_repository: Path, certificates: Certificates) -> None:
    server = OpsServer(
        model_repository,
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        tls_client_ca=certificates.ca,
    )
    try:

        async def models(connection: Connection) -> int:
            async with RnnserveClient(server.target, connection=connection, timeout=5) as client:
                return len(await client.list_models())

        client_cert = Connection(
            tls_ca=certificates.ca, tls_cert=certificates.client_cert, tls_key=certificates.client_key
        )
        assert run(models(client_cert)) == 2
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            run(models(Connection(tls_ca=certificates.ca)))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("short", "the token has 5 characters; use at least 16"),
        ("bad name!:0123456789abcdef0", "the name before ':' must be"),
        (f"a:{ALICE},b:{ALICE}", "the same token is listed under two names"),
        (" , ", "holds no token"),
    ],
)
def test_bad_token_lists_are_refused_without_showing_tokens(tokens: str, message: str) -> None:
    settings = ServerSettings(auth_tokens=tokens)
    with pytest.raises(SecurityConfigError, match=message) as refused:
        load_tokens(settings)
    assert ALICE not in str(refused.value) and ALICE not in repr(settings)


def test_serve_refuses_unusable_security_files(tmp_path: Path, model_repository: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text("not a key")
    args = [RNNSERVE, "serve", "--repository", str(model_repository), "--port", "0", "--metrics-port", "0"]
    tls = subprocess.run(
        [*args, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tls.returncode == 2 and "--tls-cert" in tls.stderr and "cannot be read" in tls.stderr
    half = subprocess.run(
        [*args, "--tls-key", str(key)], capture_output=True, text=True, timeout=60, check=False
    )
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def test_metrics_speak_tls_and_want_a_token_when_the_server_does(
    model_repository: Path, certificates: Certificates
) -> None:
    server = OpsServer(
        model_repository,
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        auth_tokens=f"ci:{ALICE}",
    )
    try:
        url = server.metrics_url
        assert url.startswith("https://127.0.0.1:")
        samples = server.scrape(token=ALICE, tls_ca=certificates.ca)
        assert any(name == "rnnserve_sessions_active" for name, _ in samples)
        for token in (None, "not-a-token-of-this-server", BOB):
            with pytest.raises(urllib.error.HTTPError) as refused:
                server.scrape(token=token, tls_ca=certificates.ca)
            assert refused.value.code == 401
            assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
            refused.value.close()
        # Plain HTTP, or a CA that did not sign the certificate, gets nothing.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(url.replace("https://", "http://"), token=ALICE)
        with pytest.raises(urllib.error.URLError):
            server.scrape(token=ALICE, tls_ca=certificates.other_ca)
    finally:
        server.stop()


def test_unprotected_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    assert ServerSettings(host="0.0.0.0").metrics_bind_host == "127.0.0.1"
    assert ServerSettings(host="0.0.0.0", metrics_host="0.0.0.0").metrics_bind_host == "0.0.0.0"
    # With tokens or TLS, /metrics has them too, so it follows --host.
    assert ServerSettings(host="0.0.0.0", auth_tokens=f"ci:{ALICE}").metrics_bind_host == "0.0.0.0"
    tls = ServerSettings(host="::", tls_cert=Path("cert.pem"), tls_key=Path("key.pem"))
    assert tls.metrics_bind_host == "::"
