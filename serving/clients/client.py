"""A small typed Python client for rnnserve (grpc.aio): sessions, streams, steps, generation.

    async with RnnserveClient("127.0.0.1:50051") as client:
        info = await client.get_model("shakespeare-lstm")
        async with client.stream("shakespeare-lstm", top_k=3) as stream:
            prediction = await stream.send([12, 7])      # Prediction after token 7
        async for response in client.generate("shakespeare-lstm", prompt_text="ROMEO:",
                                              max_new_tokens=100, sampling=Sampling(seed=1)):
            print(response.text, end="")

Responses are the protobuf messages of protos/rnnserve/v1/inference.proto. A failed call raises
grpc.aio.AioRpcError; `error.code()` is the status (see serving/core/errors.py) and `error.details()`
the server's message. It is built on grpc.aio because the synchronous API caps a client at a few
thousand messages per second.

Behind a load balancer (nginx hashing `x-session-id`, deploy/nginx/nginx.conf) every call of a
session must reach the replica that holds it: the client sends the session id as `x-session-id`
metadata on every call that names a session (Step, CloseSession, a Generate continuing one, a
Stream resuming one), and proposes the id of each session it opens (serving.frontend.affinity), so that
the opening call is routed like the ones that follow. Pass `propose_session_ids=False` to let
the server choose ids instead.

A secured server (TLS, bearer tokens) is reached with a Connection:

    connection = Connection(tls_ca=Path("ca.pem"), token=os.environ["RNNSERVE_TOKEN"])
    async with RnnserveClient("rnnserve.example:50051", connection=connection) as client:
        ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from contract.sampling import Sampling
from contract.session_id import SESSION_ID_KEY, new_session_id, routable
from contract.tokenizer import Tokenizer, tokenizer_from_json
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc

Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]
# grpc.aio's end-of-stream marker for call.read() (missing from the grpc-stubs type stubs).
EOF_MARKER = grpc.aio.EOF  # type: ignore[attr-defined]
TOKEN_ENV = "RNNSERVE_TOKEN"


class ConnectionConfigError(ValueError):
    """TLS files that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Connection:
    """How to reach a server: TLS (with a CA, a client certificate) and a bearer token.

    `tls` with no `tls_ca` trusts the system's CA certificates. `tls_server_name` checks the
    server's certificate against that name instead of the target's host (e.g. a certificate
    for "localhost" reached as 127.0.0.1).
    """

    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate, for mutual TLS (with tls_key)
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, or None for plaintext. Raises ConnectionConfigError for bad files."""
        if not self.uses_tls:
            return None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConnectionConfigError("--tls-cert and --tls-key go together: give both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"),
            private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token) if self.token else ()

    def options(self) -> list[tuple[str, Any]]:
        if self.uses_tls and self.tls_server_name:
            return [("grpc.ssl_target_name_override", self.tls_server_name)]
        return []


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConnectionConfigError(f"{flag} {path} cannot be read: {error}") from None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a failed call (its `reason` names the case, e.g. "SESSION_EXPIRED"; see
    serving.core.errors.Reason), or None for a status without one (e.g. from a proxy or grpc itself)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status code or message: not ours
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a server with bearer tokens asks for."""
    return (("authorization", f"Bearer {token}"),)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name and --token (for the CLIs)."""
    parser.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificates to trust (TLS)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-server-name", default=None, help="name the server's certificate must carry, if not the host"
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token for a server with tokens (default: ${TOKEN_ENV}; prefer the variable, "
        f"a flag shows in the process list)",
    )


def connection_from(args: argparse.Namespace) -> Connection:
    """The Connection of parsed add_connection_arguments flags (token: flag, else $RNNSERVE_TOKEN)."""
    return Connection(
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
    )


def sampling_options(sampling: Sampling) -> pb.SamplingOptions:
    """The wire form of `sampling`: unset fields stay unset, so the server applies its defaults."""
    options = pb.SamplingOptions(top_k=sampling.top_k)
    if sampling.temperature is not None:
        options.temperature = sampling.temperature
    if sampling.top_p is not None:
        options.top_p = sampling.top_p
    if sampling.seed is not None:
        options.seed = sampling.seed
    return options


def prediction_options(
    top_k: int = 0, return_logits: bool = False, sampling: Sampling | None = None
) -> pb.PredictionOptions:
    options = pb.PredictionOptions(top_k=top_k, return_logits=return_logits)
    if sampling is not None:
        options.sampling.CopyFrom(sampling_options(sampling))
    return options


# Idempotent calls, retried on UNAVAILABLE by gRPC itself (a service-config retryPolicy; see
# docs/errors.md). They read and change nothing. CreateSession, Step, Generate and Stream change a
# session, so a repeat could apply a step twice; CloseSession's effect is idempotent but its
# answer is not (a retry after a lost answer reports SESSION_CLOSED for a close that worked).
RETRIED_METHODS = (
    ("rnnserve.v1.Inference", "ListModels"),
    ("rnnserve.v1.Inference", "GetModel"),
    ("grpc.health.v1.Health", "Check"),
)
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    }
)
# A Stream is resumed after these: the connection (or the server) went away. CANCELLED reaches
# the client only when the server cancelled the call (its own cancel raises CancelledError).
RESUMABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class ResumePolicy:
    """How a StreamSession resumes its session after a lost stream."""

    timeout_s: float = 30.0  # give up (raising the last error) after this long without a stream
    initial_backoff_s: float = 0.1  # wait between attempts, doubled up to max_backoff_s
    max_backoff_s: float = 2.0


class StreamResumeError(Exception):
    """A Stream was resumed after a lost connection, but the server's session is not where the
    client left it. `client_position`: the position of the last answer the client received;
    `server_position`: the session's position on the server now. The stream stays open, with
    the session at `server_position`: the caller decides what to send next."""

    def __init__(self, message: str, session_id: str, client_position: int, server_position: int) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.client_position = client_position
        self.server_position = server_position


class AnswerLostError(StreamResumeError):
    """The chunk in flight when the stream was lost was applied, but its prediction never came.
    It is not sent again; the session continues after it (`lost_tokens` were consumed)."""

    def __init__(self, session_id: str, client_position: int, server_position: int) -> None:
        self.lost_tokens = server_position - client_position
        super().__init__(
            f"session {session_id}: the stream was lost after the server applied the chunk of "
            f"{self.lost_tokens} tokens at position {client_position}, before its prediction arrived; "
            f"the session continues at position {server_position}",
            session_id,
            client_position,
            server_position,
        )


class StepsLostError(StreamResumeError):
    """The resumed session is behind the last answered position (it was restored from an older
    save): the tokens answered after `server_position` are not in its state; send them again."""

    def __init__(self, session_id: str, client_position: int, server_position: int) -> None:
        self.lost_tokens = client_position - server_position
        super().__init__(
            f"session {session_id}: the server resumed it at position {server_position}, but "
            f"{client_position} tokens had been answered; the last {self.lost_tokens} are lost "
            f"(send them again to continue where the client was)",
            session_id,
            client_position,
            server_position,
        )


class SessionDivergedError(StreamResumeError):
    """The resumed session is ahead of what this client sent: another client stepped it."""

    def __init__(self, session_id: str, client_position: int, server_position: int) -> None:
        super().__init__(
            f"session {session_id}: the server resumed it at position {server_position}, but this "
            f"client had it at {client_position} (another client stepped it)",
            session_id,
            client_position,
            server_position,
        )


class StreamSession:
    """One session over a bidirectional Stream: `send` a chunk, get the prediction after it.

    Use as an async context manager. Leaving the block without `end()` half-closes the stream
    and keeps the session on the server (resume it by `session_id` until it expires).

    With a ResumePolicy, a stream lost to UNAVAILABLE or a dropped connection is reopened with
    `resume` of the session (waiting for the server to come back), and the request in flight is
    settled by the position the server reports (see docs/errors.md): sent again when the
    server had not applied it, else AnswerLostError; StepsLostError or SessionDivergedError
    when the session is not where this client left it. `position` is the session's position as
    of the last answer (tokens consumed since open or the last reset).
    """

    def __init__(
        self,
        stub: inference_pb2_grpc.InferenceStub,
        first: pb.StreamRequest,
        metadata: Metadata,
        timeout: float | None,
        resume: ResumePolicy | None = None,
        resume_metadata: Callable[[str], Metadata] | None = None,
    ) -> None:
        self._stub = stub
        self._first = first
        self._metadata = metadata
        self._timeout = timeout
        self._resume = resume
        self._resume_metadata = resume_metadata or (lambda session_id: metadata)
        kind = first.WhichOneof("kind")
        self._options = first.open.options if kind == "open" else first.resume.options
        self._call: grpc.aio.StreamStreamCall | None = None
        self.session_id = ""
        self.model = ""
        self.version = 0
        self.position = 0
        self.resumes = 0  # how many times the stream was lost and resumed
        self.ended = False
        self._lost = False  # a stream was lost since the last request began

    async def __aenter__(self) -> StreamSession:
        self._call = self._stub.Stream(metadata=self._metadata, timeout=self._timeout)
        opened = await self._roundtrip(self._first)
        self.session_id, self.model, self.version = opened.session_id, opened.model, opened.version
        self.position = opened.prediction.position  # 0 when opened; a resumed session's position
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._call is None or self._call.done():
            return
        if kind is not None:
            self._call.cancel()
            return
        await self._call.done_writing()
        await self._finish()

    async def _finish(self) -> None:
        """Read to the end of the stream: raises AioRpcError if its status is not OK."""
        assert self._call is not None
        while await self._call.read() is not EOF_MARKER:
            pass

    async def _roundtrip(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """Write one request and read its answer on the current call."""
        assert self._call is not None, "use StreamSession inside `async with`"
        if self._call.done():
            # The call ended (the connection dropped) since the last answer: its status says why.
            await self._call.wait_for_connection()
        await self._call.write(request)
        response = await self._call.read()  # raises AioRpcError when the server ended it with one
        if response is EOF_MARKER:
            raise ConnectionError("the server ended the stream without a response")
        assert isinstance(response, pb.StreamResponse)
        return response

    async def _exchange(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """A round trip that survives lost streams, as the ResumePolicy allows."""
        try:
            return await self._roundtrip(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            lost = await self._lost_status(error)
            if self._resume is None or lost is None:
                raise
        return await self._recover(request, lost)

    async def _lost_status(self, error: Exception) -> grpc.aio.AioRpcError | None:
        """The error when it means a lost stream (RESUMABLE_CODES), else None."""
        if isinstance(error, asyncio.InvalidStateError):  # written after the call had ended
            assert self._call is not None
            if not self._call.done():  # half-closed by this client (after end()): not a loss
                return None
            try:
                await self._call.read()
            except grpc.aio.AioRpcError as status:
                error = status
            else:
                return None
        if isinstance(error, grpc.aio.AioRpcError) and error.code() in RESUMABLE_CODES:
            return error
        return None

    async def _recover(self, request: pb.StreamRequest, lost: grpc.aio.AioRpcError) -> pb.StreamResponse:
        """Resume after `lost`, then settle `request` (in flight when the stream was lost)."""
        assert self._resume is not None
        self._lost = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resume.timeout_s
        while True:
            server_position = await self._reopen(lost, deadline)
            kind = request.WhichOneof("kind")
            if kind == "chunk":
                applied = self.position + len(request.chunk.tokens)
                if server_position == applied:
                    self.position = server_position
                    raise AnswerLostError(self.session_id, applied - len(request.chunk.tokens), applied)
                if server_position != self.position:
                    client_position, self.position = self.position, server_position
                    if server_position < client_position:
                        raise StepsLostError(self.session_id, client_position, server_position)
                    raise SessionDivergedError(self.session_id, client_position, server_position)
            # Not applied (or a control, which is the same when repeated): send it again.
            try:
                return await self._roundtrip(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                again = await self._lost_status(error)
                if again is None or loop.time() >= deadline:
                    raise
                lost = again

    async def _reopen(self, lost: grpc.aio.AioRpcError, deadline: float) -> int:
        """Open a new Stream that resumes this session; returns the session's position on the
        server. Retries with backoff until `deadline`, then raises the last error."""
        assert self._resume is not None
        loop = asyncio.get_running_loop()
        backoff = self._resume.initial_backoff_s
        resume = pb.StreamRequest(resume=pb.ResumeSession(session_id=self.session_id, options=self._options))
        while True:
            if self._call is not None:
                self._call.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise lost
            # wait_for_ready: the call waits for the server to come back instead of failing at once.
            self._call = self._stub.Stream(
                metadata=self._resume_metadata(self.session_id), timeout=self._timeout, wait_for_ready=True
            )
            try:
                resumed = await asyncio.wait_for(self._roundtrip(resume), remaining)
            except asyncio.TimeoutError:  # the same class as TimeoutError from Python 3.11
                self._call.cancel()
                raise lost from None
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                again = await self._lost_status(error)
                if again is None:
                    raise  # e.g. NOT_FOUND: the session expired meanwhile (its reason says so)
                lost = again
                await asyncio.sleep(max(0.0, min(backoff, deadline - loop.time())))
                backoff = min(backoff * 2, self._resume.max_backoff_s)
                continue
            self.resumes += 1
            return resumed.prediction.position

    async def send(self, tokens: Iterable[int]) -> pb.Prediction:
        """Send one chunk of token ids; returns the prediction after its last token."""
        response = await self._exchange(pb.StreamRequest(chunk=pb.TokenChunk(tokens=list(tokens))))
        self.position = response.prediction.position
        return response.prediction

    async def reset(self) -> None:
        """Return the session to the zero state."""
        await self._exchange(pb.StreamRequest(control=pb.CONTROL_RESET))
        self.position = 0

    async def end(self) -> None:
        """Close the session on the server and finish the stream."""
        self._lost = False
        try:
            await self._exchange(pb.StreamRequest(control=pb.CONTROL_END))
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if not self._lost or info is None or info.reason != "SESSION_CLOSED":
                raise
            # The stream was lost with this END's answer, and the resume found the session
            # closed: the END was applied.
            self.ended = True
            return
        self.ended = True
        assert self._call is not None
        await self._call.done_writing()
        await self._finish()


class RnnserveClient:
    """Client for one server. `metadata` goes with every call (e.g. an authorization header);
    `connection` adds its TLS credentials, token metadata and channel options.

    The channel it makes retries the idempotent calls on UNAVAILABLE (RETRIED_METHODS); its
    streams resume lost sessions as `resume` says (None: a lost stream raises its error).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        connection: Connection | None = None,
        options: ChannelOptions = (),
        propose_session_ids: bool = True,
        resume: ResumePolicy | None = ResumePolicy(),
    ) -> None:
        if connection is not None:
            credentials = connection.credentials() or credentials
            metadata = (*metadata, *connection.metadata())
            options = (*options, *connection.options())
        options = (("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG), *options)
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials, options=list(options))
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=list(options))
            )
        self.target = target
        self.channel = channel
        self.metadata = tuple(metadata)
        self.propose_session_ids = propose_session_ids
        self.resume = resume
        self.timeout = timeout  # default deadline of unary calls, in seconds
        self.stub = inference_pb2_grpc.InferenceStub(channel)

    async def __aenter__(self) -> RnnserveClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    # ----- catalogue ---------------------------------------------------------------------------

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self.stub.ListModels(
            pb.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout
        )
        return list(response.models)

    async def get_model(self, name: str, version: int = 0) -> pb.ModelInfo:
        """The model with one version: `version`, or the latest when 0 (`.versions[0]`)."""
        return await self.stub.GetModel(
            pb.GetModelRequest(name=name, version=version), metadata=self.metadata, timeout=self.timeout
        )

    async def tokenizer(self, name: str, version: int = 0) -> Tokenizer:
        """The model's own tokenizer, to encode prompts and decode tokens client-side."""
        info = await self.get_model(name, version)
        return tokenizer_from_json(info.versions[0].tokenizer_json)

    # ----- sessions ----------------------------------------------------------------------------

    def session_metadata(self, session_id: str) -> Metadata:
        """The client's metadata plus `x-session-id` (what a load balancer routes a session by),
        unless the id cannot be a session's (the server then answers NOT_FOUND wherever it lands)."""
        if not routable(session_id):
            return self.metadata
        return (*self.metadata, (SESSION_ID_KEY, session_id))

    def _opening_metadata(self) -> Metadata:
        """Metadata for a call that opens a session: with a proposed id, unless turned off."""
        return self.session_metadata(new_session_id()) if self.propose_session_ids else self.metadata

    async def create_session(self, model: str, version: int = 0) -> pb.CreateSessionResponse:
        return await self.stub.CreateSession(
            pb.CreateSessionRequest(model=model, version=version),
            metadata=self._opening_metadata(),
            timeout=self.timeout,
        )

    async def step(
        self,
        session_id: str,
        tokens: Iterable[int],
        *,
        top_k: int = 0,
        return_logits: bool = False,
        sampling: Sampling | None = None,
    ) -> pb.StepResponse:
        request = pb.StepRequest(
            session_id=session_id,
            tokens=list(tokens),
            options=prediction_options(top_k, return_logits, sampling),
        )
        return await self.stub.Step(request, metadata=self.session_metadata(session_id), timeout=self.timeout)

    async def close_session(self, session_id: str) -> None:
        await self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id),
            metadata=self.session_metadata(session_id),
            timeout=self.timeout,
        )

    def stream(
        self,
        model: str = "",
        *,
        version: int = 0,
        session_id: str = "",
        top_k: int = 0,
        return_logits: bool = False,
        sampling: Sampling | None = None,
        timeout: float | None = None,
        resume: ResumePolicy | bool | None = True,
    ) -> StreamSession:
        """A Stream that opens a session on `model`, or resumes `session_id`.

        The session id travels as metadata when the call starts (a load balancer routes the
        whole stream by it): the resumed session's, or the id proposed for the new one.
        `resume`: True for the client's ResumePolicy, None (or False) to raise on a lost stream.
        """
        options = prediction_options(top_k, return_logits, sampling)
        if session_id:
            first = pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id, options=options))
            metadata = self.session_metadata(session_id)
        else:
            first = pb.StreamRequest(open=pb.OpenSession(model=model, version=version, options=options))
            metadata = self._opening_metadata()
        policy = self.resume if resume is True else (resume or None)
        return StreamSession(self.stub, first, metadata, timeout, policy, self.session_metadata)

    # ----- generation --------------------------------------------------------------------------

    async def generate(
        self,
        model: str = "",
        *,
        prompt_tokens: Sequence[int] = (),
        prompt_text: str = "",
        max_new_tokens: int = 100,
        sampling: Sampling | None = None,
        stop_tokens: Sequence[int] = (),
        version: int = 0,
        session_id: str = "",
        keep_session: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a generation's responses (tokens as they come; the last has finish_reason)."""
        request = pb.GenerateRequest(
            model=model,
            version=version,
            session_id=session_id,
            prompt_tokens=list(prompt_tokens),
            prompt_text=prompt_text,
            max_new_tokens=max_new_tokens,
            stop_tokens=list(stop_tokens),
            keep_session=keep_session,
        )
        if sampling is not None:
            request.sampling.CopyFrom(sampling_options(sampling))
        if session_id:
            metadata = self.session_metadata(session_id)
        elif keep_session:
            metadata = self._opening_metadata()
        else:
            metadata = self.metadata  # a session of its own, ended with the call: no affinity
        call = self.stub.Generate(request, metadata=metadata, timeout=timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # stops the server's work when the caller stops early; no-op after the end

    # ----- health ------------------------------------------------------------------------------

    async def health(self, service: str = "") -> str:
        """The health status name of `service` ("" = the whole server), e.g. "SERVING"."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), metadata=self.metadata, timeout=self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
