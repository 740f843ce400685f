"""The IPC wire format between front ends and the engine core: msgspec MessagePack, in batches.

One ZeroMQ message carries every call a front end made during one event-loop iteration, and one
answer message every result the core had ready in one iteration, so under load there is no
syscall per token per side. A frame is a MessagePack array of entries:

    front end -> core   [call, method, args]      args: the method's arguments (METHODS)
    core -> front end   [call, kind, payload]     kind: RESULT, ERROR or CHUNK (a Generate's tokens)

`call` is the front end's number for the call (0: no answer wanted, e.g. a cancel). An ERROR's
payload is [error class name, message]: the ServingError class of serving.core.errors, rebuilt
on the front end, so the status code and the text are the same as in one process.

Measured on the 2-core development machine (bench/ipc.py, see docs/architecture.md): a round
trip through ZeroMQ ipc:// with msgspec costs about as much as multiprocessing's Pipe with
pickle for one call, and far less for a batch of 64 step calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from serving.core import errors
from serving.core.interface import (
    GeneratedChunk,
    GenerateRequestFields,
    HealthReport,
    ModelInfo,
    Prediction,
    SessionRef,
    StepOptions,
)

RESULT, ERROR, CHUNK = 0, 1, 2


class GenerationStart(msgspec.Struct, array_like=True):
    """The answer to `generate`: the session and model; CHUNK entries follow on the same call."""

    session_id: str
    model: str
    version: int


# method -> (argument types, result type); the engine core calls the InferenceApi method of that
# name, "cancel" stops the generation of another call, "ping" answers None (the heartbeat).
METHODS: dict[str, tuple[Any, Any]] = {
    "open_session": (tuple[str, int, str | None, str | None, StepOptions | None], SessionRef),
    "resume": (tuple[str, str | None, StepOptions], SessionRef),
    "step": (tuple[SessionRef, list[int]], Prediction),
    "step_once": (tuple[str, str | None, list[int], StepOptions], tuple[SessionRef, Prediction]),
    "reset": (tuple[SessionRef], None),
    "close": (tuple[str, str | None], None),
    "release": (tuple[SessionRef, bool], None),
    "generate": (tuple[GenerateRequestFields, str | None], GenerationStart),
    "cancel": (tuple[int], None),
    "list_models": (tuple[()], list[ModelInfo]),
    "get_model": (tuple[str, int], ModelInfo),
    "health": (tuple[()], HealthReport),
    "ping": (tuple[()], None),
}

Entry = tuple[int, Any, msgspec.Raw]

_encoder = msgspec.msgpack.Encoder()
_frame = msgspec.msgpack.Decoder(list[tuple[int, Any, msgspec.Raw]])
_args = {name: msgspec.msgpack.Decoder(types[0]) for name, types in METHODS.items()}
_results = {name: msgspec.msgpack.Decoder(types[1]) for name, types in METHODS.items()}
_chunk = msgspec.msgpack.Decoder(GeneratedChunk)
_error = msgspec.msgpack.Decoder(tuple[str, str])

encode: Callable[[Any], bytes] = _encoder.encode


def encode_frame(entries: list[tuple[int, Any, bytes]]) -> bytes:
    """One frame of entries whose payloads are already encoded (see `payload`)."""
    return _encoder.encode([(call, kind, msgspec.Raw(data)) for call, kind, data in entries])


def decode_frame(frame: bytes) -> list[Entry]:
    return _frame.decode(frame)


def decode_args(method: str, raw: msgspec.Raw) -> tuple[Any, ...]:
    decoder = _args.get(method)
    if decoder is None:
        raise errors.InvalidArgumentError(
            f"the engine core has no method {method!r}; methods: {sorted(METHODS)}"
        )
    return decoder.decode(raw)


def decode_result(method: str, raw: msgspec.Raw) -> Any:
    return _results[method].decode(raw)


def decode_chunk(raw: msgspec.Raw) -> GeneratedChunk:
    return _chunk.decode(raw)


def error_payload(error: errors.ServingError) -> bytes:
    return _encoder.encode((type(error).__name__, str(error)))


def decode_error(raw: msgspec.Raw) -> errors.ServingError:
    """The ServingError the core raised (an unknown class name comes back as a ServingError)."""
    name, message = _error.decode(raw)
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, errors.ServingError):
        return kind(message)
    return errors.ServingError(message)
