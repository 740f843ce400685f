"""Who may call the server: bearer tokens checked on every call, and TLS credentials.

Tokens come from `--auth-tokens-file` (one per line) and from `RNNSERVE_AUTH_TOKENS`
(comma-separated), each written `TOKEN` or `NAME:TOKEN`:

    # rnnserve tokens (blank lines and lines starting with '#' are skipped)
    alice:9f1c6e0b2d7a4c83a1e5f0b6d2c9e7a4
    ci:7d3e1b8f0a2c4e6d9b1f3a5c7e9d2b4f
    4c2a9e7d1b3f5a8c0e2d4b6f8a1c3e5d

With any token configured, every call except grpc.health.v1's Check and Watch and KServe v2's
ServerLive and ServerReady (probes carry no secrets) must carry `authorization: Bearer TOKEN`
metadata, else it is answered UNAUTHENTICATED (ErrorInfo reason BEARER_TOKEN_MISSING or
BEARER_TOKEN_INVALID) before any work is done. Health's List needs a token: it enumerates every
model name the server serves. Server reflection needs a token too (grpcurl: -H 'authorization:
Bearer ...'); it only describes the public API, but an open door is one more to watch.

A token's identity owns the sessions it opens: any other identity is told NOT_FOUND for them, the
same answer as for an id that never existed. The identity is NAME when the line names one, so
an operator rotates a client's token by adding its new token under the same name, then removing
the old one, without the client losing its sessions; an unnamed token's identity is `token-`
and the first 12 hex digits of its sha256. Identities, never tokens, appear in logs and
snapshots. Presented tokens are compared by their sha256 digests, so the time a check takes
does not depend on how much of a valid token was guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from serving.core.errors import Reason, UnauthenticatedError, refuse
from serving.ops.interceptor import rebuild
from serving.settings import ServerSettings

AUTHORIZATION_KEY = "authorization"
BEARER = "bearer "
# Probes carry no secrets: grpc.health.v1's Check and Watch, and KServe v2's server liveness
# and readiness.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
MIN_TOKEN_CHARS = 16
FIRST_MESSAGE_WAIT_S = 2.0  # how long a refused stream waits for its first message (see _refusal)
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what fits an HTTP/2 header value verbatim


class SecurityConfigError(ValueError):
    """A token file, token list or TLS file that cannot be used; the message says which and why."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def anonymous_identity(token: str) -> str:
    return "token-" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class TokenTable:
    """The configured tokens, by sha256 digest, and the identity each one stands for."""

    identities: Mapping[bytes, str]

    def __len__(self) -> int:
        return len(self.identities)

    def identify(self, token: str) -> str | None:
        """The identity of a presented token, or None when it is not one of ours."""
        return self.identities.get(_digest(token))

    def identify_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The identity of a call's `authorization: Bearer TOKEN` metadata, or None."""
        token = bearer_token(metadata)
        return None if token is None else self.identify(token)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The TOKEN of `authorization: Bearer TOKEN` metadata (scheme case-insensitive), or None."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[:7].lower() == BEARER:
            return value[7:].strip()
    return None


def parse_token_entries(entries: Iterable[str], source: str) -> dict[str, str]:
    """{token: identity} from `TOKEN` / `NAME:TOKEN` entries; blank and '#' entries are skipped.

    Raises SecurityConfigError naming the source and entry number (never the token).
    """
    tokens: dict[str, str] = {}
    for number, raw in enumerate(entries, start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = "", entry
        where = f"{source}, entry {number}"
        if sep and not _NAME.fullmatch(name):
            raise SecurityConfigError(
                f"{where}: the name before ':' must be 1-64 characters of letters, digits and ._@-"
            )
        if not _TOKEN.fullmatch(token) or "," in token:
            raise SecurityConfigError(
                f"{where}: a token is visible ASCII without spaces or commas (a token with ':' needs "
                f"a NAME: in front)"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(
                f"{where}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                f"(e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)"
            )
        identity = name or anonymous_identity(token)
        if tokens.get(token, identity) != identity:
            raise SecurityConfigError(f"{where}: the same token is listed under two names")
        tokens[token] = identity
    return tokens


def load_tokens(settings: ServerSettings) -> TokenTable | None:
    """The tokens of --auth-tokens-file and RNNSERVE_AUTH_TOKENS; None when neither is set.

    Raises SecurityConfigError when the file cannot be read, an entry is malformed, or auth is
    configured but no token results (an empty file would otherwise lock every client out).
    """
    if not settings.auth:
        return None
    tokens: dict[str, str] = {}
    if settings.auth_tokens_file is not None:
        path = settings.auth_tokens_file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise SecurityConfigError(f"--auth-tokens-file {path} cannot be read: {error}") from None
        tokens.update(parse_token_entries(lines, f"--auth-tokens-file {path}"))
    if settings.auth_tokens.strip():
        from_environment = parse_token_entries(settings.auth_tokens.split(","), "RNNSERVE_AUTH_TOKENS")
        for token, identity in from_environment.items():
            if tokens.get(token, identity) != identity:
                raise SecurityConfigError("RNNSERVE_AUTH_TOKENS names a token of the token file differently")
            tokens[token] = identity
    if not tokens:
        raise SecurityConfigError(
            "authentication is configured (--auth-tokens-file or RNNSERVE_AUTH_TOKENS) but holds no token"
        )
    return TokenTable({_digest(token): identity for token, identity in tokens.items()})


def _discard(data: bytes) -> None:
    """The request deserializer of a refused call: its body is never decoded."""
    return None


def _refusal(handler: grpc.RpcMethodHandler, error: UnauthenticatedError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED and does nothing else.

    The request body is not decoded, and the status is set rather than raised (`refuse`, not
    `context.abort`, whose exception and traceback would keep the call's objects in a reference
    cycle until the garbage collector ran), so an unauthenticated flood costs no memory.
    """
    streaming_requests = handler.request_streaming

    async def answer(request: Any, context: grpc.aio.ServicerContext) -> None:
        # A coroutine serves every kind: grpc.aio treats one behind a streaming response as a
        # handler that writes with context.write (here it writes nothing).
        if streaming_requests:
            # Take the client's first message before answering: a grpc.aio client whose first
            # write is still in flight when the call ends reports INTERNAL ("Internal error from
            # Core") instead of this status. Bounded, so a silent client cannot hold the call.
            with contextlib.suppress(asyncio.TimeoutError):  # the same class as TimeoutError (3.11+)
                await asyncio.wait_for(context.read(), FIRST_MESSAGE_WAIT_S)
        refuse(context, error)

    return rebuild(handler, answer, request_deserializer=_discard)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to every call without a valid bearer token (health stays open)."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(
                handler,
                UnauthenticatedError(
                    "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'",
                    Reason.BEARER_TOKEN_MISSING,
                ),
            )
        if self.tokens.identify(token) is None:
            return _refusal(
                handler,
                UnauthenticatedError(
                    "the bearer token is not valid on this server", Reason.BEARER_TOKEN_INVALID
                ),
            )
        return handler

    def identity(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's identity (session owner); the interceptor has already checked the token."""
        identity = self.tokens.identify_metadata(context.invocation_metadata())
        if identity is None:  # only reachable if the interceptor were bypassed
            raise PermissionError("a call reached the servicer without a valid bearer token")
        return identity


def _read_pem(path: Path, flag: str, marker: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{flag} {path} cannot be read: {error}") from None
    if f"-----BEGIN {marker}".encode() not in data:
        raise SecurityConfigError(f"{flag} {path} is not PEM with a '-----BEGIN {marker}' block")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: mutual TLS); None without.

    Raises SecurityConfigError when a file cannot be read or is not PEM of the expected kind.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain = _read_pem(settings.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _read_pem(settings.tls_key, "--tls-key", "")  # PRIVATE KEY, RSA/EC PRIVATE KEY, ...
    if b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError(f"--tls-key {settings.tls_key} holds no PEM private key")
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read_pem(settings.tls_client_ca, "--tls-client-ca", "CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def metrics_tls_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """An HTTPS context for /metrics with the gRPC server's --tls-cert/--tls-key; None without TLS.

    Raises SecurityConfigError when the certificate or key cannot be used.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise SecurityConfigError(
            f"--tls-cert {settings.tls_cert} and --tls-key {settings.tls_key} cannot serve /metrics: {error}"
        ) from None
    return context
