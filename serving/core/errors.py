"""Domain errors of the server, and the one place that maps them to gRPC status codes.

Code under serving/ raises these; only the servicer turns them into a status (`status_code`), so
every RPC answers the same problem with the same code. Each message says what was wrong and what
is allowed, because it reaches the client verbatim.

    ServingError
    ├── InvalidArgumentError         INVALID_ARGUMENT     bad tokens or options
    │   └── StreamOrderError         INVALID_ARGUMENT     a request out of order on a Stream
    ├── NotFoundError                NOT_FOUND            unknown model or version
    │   └── SessionNotFoundError     NOT_FOUND            unknown, expired, evicted or closed session
    ├── ResourceExhaustedError       RESOURCE_EXHAUSTED   a limit (tokens, max_new_tokens, sessions)
    ├── UnavailableError             UNAVAILABLE          draining, or a model version unloading
    ├── UnauthenticatedError         UNAUTHENTICATED      auth on, token missing or wrong
    └── InferenceFailedError         INTERNAL             onnxruntime failed on a batch
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base of every error a client can be told about."""


class InvalidArgumentError(ServingError):
    """Token ids outside the vocabulary, empty chunks, nonsensical sampling options."""


class StreamOrderError(InvalidArgumentError):
    """A request that is valid in itself but not at this point of a Stream (chunk before open).

    The status codes clients handle are fixed (the table above); an out-of-order request is a bad
    request, so it answers INVALID_ARGUMENT with a message naming the expected order.
    """


class NotFoundError(ServingError):
    """An unknown model or model version."""


class SessionNotFoundError(NotFoundError):
    """A session id that is unknown, or that expired, was evicted or was closed (the message says)."""


class ResourceExhaustedError(ServingError):
    """A request over a limit: tokens per request, max_new_tokens, the session limit."""


class UnavailableError(ServingError):
    """The server (or a model version) is not taking new work, e.g. while draining."""


class UnauthenticatedError(ServingError):
    """Auth is on and the call's token is missing or wrong."""


class InferenceFailedError(ServingError):
    """onnxruntime failed on a batch; the sessions in it keep their previous state."""


_STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
