"""The IPC wire format between front ends and the engine core: pickled frames on a Unix socket.

One frame carries every call a front end made during one event-loop iteration, and one answer
frame every result the core had ready in one iteration, so under load there is no syscall per
token per side. A frame is a 4-byte little-endian length and a pickled list of entries:

    front end -> core   (call, method, args)      args: the InferenceApi method's arguments
    core -> front end   (call, kind, payload)     kind: RESULT, ERROR or CHUNK (a Generate's tokens)

`call` is the front end's number for the call (0: no answer wanted, e.g. a cancel; PING_CALL:
the heartbeat). An ERROR's payload is (error class name, message, reason, metadata): the
ServingError of serving.core.errors, rebuilt on the front end, so the status, its ErrorInfo and
the text are the same as in one process. Only the plain values of serving.core.interface cross.
The socket lives in a directory only the server's user can open, so the peers trust each other's
pickles as much as their own.

Chosen by measurement (`python -m bench.ipc`, figures in docs/architecture.md): on the 2-core
development machine a Unix-socket round trip with pickle took about 95 µs for one call and
2 µs per call in a frame of 64; ZeroMQ ipc:// with msgspec took 160 µs and 9 µs.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

from serving.core import errors

RESULT, ERROR, CHUNK = 0, 1, 2
PING_CALL = -1  # the heartbeat's call number: answered, and no caller waits for it


@dataclass(frozen=True)
class GenerationStart:
    """The answer to `generate`: the session and model; CHUNK entries follow on the same call."""

    session_id: str
    model: str
    version: int


# The engine core answers these InferenceApi methods; "cancel" stops the generation of another
# call of the same front end; "ping" answers None (the heartbeat).
METHODS = frozenset(
    {
        "open_session",
        "resume",
        "step",
        "step_once",
        "reset",
        "close",
        "release",
        "generate",
        "cancel",
        "list_models",
        "get_model",
        "health",
        "ping",
    }
)

_LENGTH = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 30


def encode_frame(entries: list[tuple[int, Any, Any]]) -> bytes:
    body = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into decoded frames (a frame may arrive in pieces, or several at once)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[tuple[int, Any, Any]]]:
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"an IPC frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
            end = offset + 4 + length
            if len(buffer) < end:
                break
            frames.append(pickle.loads(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


ErrorPayload = tuple[str, str, str, dict[str, str]]


def error_payload(error: errors.ServingError) -> ErrorPayload:
    return (type(error).__name__, str(error), error.reason.value, error.metadata)


def decode_error(payload: ErrorPayload) -> errors.ServingError:
    """The ServingError the core raised: its class (the status code), message, reason and metadata."""
    name, message, reason, metadata = payload
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.ServingError)):
        kind = errors.ServingError
    return kind(message, errors.Reason(reason), **metadata)
