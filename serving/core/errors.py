"""Domain errors of the server, their machine-readable reasons, and the one place that maps them
to gRPC statuses.

Code under serving/ raises these; only the servicer turns them into a status (`grpc_status`), so
every RPC answers the same problem with the same code. Each message says what was wrong and what
is allowed, because it reaches the client verbatim; text the client sent is repeated through
`shown`, at most ECHO_CHARACTERS of it (a 100 KB model name copied whole into a status message
made the answer's metadata too large for gRPC, and the client saw RESOURCE_EXHAUSTED instead of
NOT_FOUND).

    ServingError
    ├── InvalidArgumentError         INVALID_ARGUMENT     bad tokens or options
    │   └── StreamOrderError         INVALID_ARGUMENT     a request out of order on a Stream
    ├── NotFoundError                NOT_FOUND            unknown model or version
    │   └── SessionNotFoundError     NOT_FOUND            unknown, expired, evicted or closed session
    ├── AlreadyExistsError           ALREADY_EXISTS       a proposed session id in use
    ├── ResourceExhaustedError       RESOURCE_EXHAUSTED   a limit (tokens, max_new_tokens, sessions)
    ├── StreamIdleError              DEADLINE_EXCEEDED    a Stream silent for its idle timeout
    ├── UnavailableError             UNAVAILABLE          draining, or a model version unloading
    ├── UnauthenticatedError         UNAUTHENTICATED      auth on, token missing or wrong
    └── InferenceFailedError         INTERNAL             onnxruntime failed on a batch

Besides its class (the status code), every error carries a `Reason`, the case within the code,
and metadata naming what it concerns (the model, the session, the limit). On the wire they travel
as a `google.rpc.Status` with one `google.rpc.ErrorInfo` (domain `ERROR_DOMAIN`) in the
`grpc-status-details-bin` trailer (set by `refuse`), which `grpc_status.rpc_status.from_call`
decodes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from contract.model_name import MAX_MODEL_NAME

ERROR_DOMAIN = "rnnserve.dev"


class Reason(str, enum.Enum):
    """ErrorInfo.reason of every error the server answers; the value is the wire string."""

    # INVALID_ARGUMENT
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # a body that does not parse, or lacks a required field
    NO_TOKENS = "NO_TOKENS"  # a chunk, a Step or a prompt without token ids
    TOKEN_OUT_OF_VOCABULARY = "TOKEN_OUT_OF_VOCABULARY"  # a token id outside [0, vocab_size)
    INVALID_OPTION = "INVALID_OPTION"  # a prediction, sampling or generation option out of range
    INVALID_PROMPT = "INVALID_PROMPT"  # a prompt that is missing, doubled or cannot be encoded
    STREAM_OUT_OF_ORDER = "STREAM_OUT_OF_ORDER"  # a Stream request not valid at this point
    INVALID_SESSION_ID = "INVALID_SESSION_ID"  # a proposed session id not of the server's format
    SESSION_ID_MISMATCH = "SESSION_ID_MISMATCH"  # x-session-id metadata differs from the body's id
    SESSION_MODEL_MISMATCH = "SESSION_MODEL_MISMATCH"  # a session continued on another model/version
    # NOT_FOUND
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"  # the model exists, not this version (or it is retired)
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"  # never existed here (or is another caller's)
    SESSION_EXPIRED = "SESSION_EXPIRED"  # unused for longer than the idle timeout
    SESSION_EVICTED = "SESSION_EVICTED"  # ended to make room at the session limit
    SESSION_CLOSED = "SESSION_CLOSED"  # closed by CloseSession, CONTROL_END or its Stream's end
    SESSION_NOT_RESTORABLE = "SESSION_NOT_RESTORABLE"  # saved, on a version this server lacks
    # ALREADY_EXISTS
    SESSION_ID_IN_USE = "SESSION_ID_IN_USE"  # a proposed id that names an open or saved session
    # RESOURCE_EXHAUSTED
    TOO_MANY_TOKENS = "TOO_MANY_TOKENS"  # over --max-tokens-per-request
    MAX_NEW_TOKENS_EXCEEDED = "MAX_NEW_TOKENS_EXCEEDED"  # over --max-new-tokens
    SESSION_LIMIT = "SESSION_LIMIT"  # the server holds its most sessions, none evictable
    OWNER_SESSION_LIMIT = "OWNER_SESSION_LIMIT"  # the caller holds --max-sessions-per-token
    QUEUE_FULL = "QUEUE_FULL"  # the model's batch queue is at --max-queue-steps
    HEALTH_WATCH_LIMIT = "HEALTH_WATCH_LIMIT"  # the client address holds --max-health-watches-per-peer
    # DEADLINE_EXCEEDED
    STREAM_IDLE = "STREAM_IDLE"  # a Stream sent nothing for --stream-idle-timeout-s
    # UNAVAILABLE
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
    MODEL_UNLOADING = "MODEL_UNLOADING"
    # UNAUTHENTICATED
    BEARER_TOKEN_MISSING = "BEARER_TOKEN_MISSING"
    BEARER_TOKEN_INVALID = "BEARER_TOKEN_INVALID"
    # INTERNAL
    INFERENCE_FAILED = "INFERENCE_FAILED"


ECHO_CHARACTERS = 64  # most characters of a client's text that an error message repeats
METADATA_CHARACTERS = MAX_MODEL_NAME  # most characters of an ErrorInfo metadata value


def shown(text: str, limit: int = ECHO_CHARACTERS) -> str:
    """`text` quoted for a message: repr of at most `limit` characters, with its length when cut."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


class ServingError(Exception):
    """Base of every error a client can be told about.

    `reason` defaults to the class's own (each subclass has one); `metadata` (str values on the
    wire) names what the error concerns, e.g. model="tiny-lstm", limit=4096.
    """

    reason: Reason  # the subclasses' class attributes are the defaults

    def __init__(self, message: str, reason: Reason | None = None, **metadata: object) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        elif not hasattr(self, "reason"):
            raise TypeError(f"{type(self).__name__} has no default reason: pass one")
        # Cut like messages (see `shown`): a value may repeat the client's text (a model name).
        self.metadata: dict[str, str] = {
            key: str(value)[:METADATA_CHARACTERS] for key, value in metadata.items()
        }


class InvalidArgumentError(ServingError):
    """Token ids outside the vocabulary, empty chunks, nonsensical sampling options."""

    reason = Reason.INVALID_OPTION


class StreamOrderError(InvalidArgumentError):
    """A request that is valid in itself but not at this point of a Stream (chunk before open).

    The status codes clients handle are fixed (the table above); an out-of-order request is a bad
    request, so it answers INVALID_ARGUMENT with a message naming the expected order.
    """

    reason = Reason.STREAM_OUT_OF_ORDER


class NotFoundError(ServingError):
    """An unknown model or model version."""

    reason = Reason.MODEL_NOT_FOUND


class SessionNotFoundError(NotFoundError):
    """A session id that is unknown, or that expired, was evicted or was closed (the reason says)."""

    reason = Reason.SESSION_NOT_FOUND


class AlreadyExistsError(ServingError):
    """A session id proposed for a new session that names an open (or saved) session."""

    reason = Reason.SESSION_ID_IN_USE


class ResourceExhaustedError(ServingError):
    """A request over a limit: tokens per request, max_new_tokens, the session limit."""

    reason = Reason.SESSION_LIMIT


class StreamIdleError(ServingError):
    """A Stream that sent nothing for the idle timeout; its session stays open to be resumed.

    DEADLINE_EXCEEDED, not CANCELLED: a time limit passed, and CANCELLED reads as the client's
    own cancellation.
    """

    reason = Reason.STREAM_IDLE


class UnavailableError(ServingError):
    """The server (or a model version) is not taking new work, e.g. while draining."""

    reason = Reason.SERVER_SHUTTING_DOWN


class UnauthenticatedError(ServingError):
    """Auth is on and the call's token is missing or wrong."""

    reason = Reason.BEARER_TOKEN_MISSING


class InferenceFailedError(ServingError):
    """onnxruntime failed on a batch; the sessions in it keep their previous state."""

    reason = Reason.INFERENCE_FAILED


_STATUS_CODES: Mapping[type[ServingError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StreamIdleError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    InferenceFailedError: grpc.StatusCode.INTERNAL,
}


def status_code(error: ServingError) -> grpc.StatusCode:
    """The gRPC status for a domain error (its nearest class in the table above)."""
    for kind in type(error).__mro__:
        code = _STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def grpc_status(error: ServingError) -> grpc.Status:
    """The whole status of a domain error: code, message, and an ErrorInfo with its reason and
    metadata in the `grpc-status-details-bin` trailer (see `refuse`)."""
    code = status_code(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=str(error), details=[detail])
    return rpc_status.to_status(status)


def refuse(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    """End a call with the error's status (`grpc_status`) without raising: its code, message and
    ErrorInfo trailer, after the trailing metadata set before (the request id), which trailing
    metadata set alone would replace. The handler returns after this (grpc sends no reply message
    once the code is not OK).

    Not `context.abort`: an abort raises through grpc's own frames, which keep the exception, its
    traceback and so the handler's frame (the request, up to the receive limit in size) in a
    reference cycle until the garbage collector runs. Measured: a flood of refused requests held
    GiBs that way.
    """
    status = grpc_status(error)
    earlier = tuple(context.trailing_metadata() or ())
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata((*earlier, *status.trailing_metadata))
