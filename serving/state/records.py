"""Session state outside the server's memory: one binary record per session, and the snapshot file.

A SessionRecord holds what it takes to bring a session back in another process or after a
restart: its id, the model version it runs on (name, version and the sha256 of model.onnx, so a
restore can refuse a different model published under the same number), how many tokens it has
consumed, who owns it, when it was last used, and its recurrent state rows. The same bytes go to
the `--state-snapshot` file and to Redis (serving.state.redis_store).

Record encoding, format version 1 (all integers little-endian):

    offset   size  field
    0        4     magic b"RNSR"
    4        2     format version (uint16) = 1
    6        4     header length N (uint32)
    10       N     header: a UTF-8 JSON object (session_id, model, version, model_sha256, position,
                   owner, last_used, states [[name, [num_layers, hidden]], ...], last_logits_size)
    10+N     P     payload: each state array, then last_logits when present; float32 LE, C order
    10+N+P   4     CRC-32 (zlib) of every byte before it

Decoding is strict: a truncated, corrupt or unknown record raises RecordCorruptError and yields
nothing, so a record is never partially applied.

Snapshot file, format version 1: b"RNNSSNAP", uint32 format version; then per session a uint32
length L (1..MAX_RECORD_BYTES) and L bytes of one record; then the trailer: uint32 0, uint64 the
number of records, b"SNAPEND\\0"; nothing after it. `write_snapshot` streams records into a
temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
directory, so a crash or a full disk leaves the previous snapshot whole. `open_snapshot` checks
the whole file before handing out the first record, so a restore is all or nothing.

    PersistenceError
    ├── RecordError
    │   ├── RecordCorruptError     bytes that are not a whole, valid record
    │   └── RecordMismatchError    a valid record for another model, version or shape
    ├── SnapshotWriteError         the snapshot cannot be written (disk full, read-only, ...)
    └── SnapshotReadError          the snapshot cannot be read, or is corrupt
        └── SnapshotNotFoundError  there is no snapshot file (a first start)

(serving.state.redis_store adds StateStoreError and StateStoreUnavailableError below PersistenceError.)
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, BinaryIO, Protocol

import numpy as np

from contract.session_id import is_storable_session_id

RECORD_MAGIC = b"RNSR"
RECORD_FORMAT = 1
SNAPSHOT_MAGIC = b"RNNSSNAP"
SNAPSHOT_FORMAT = 1
SNAPSHOT_END = b"SNAPEND\0"
# A bound on one record, so a corrupt length field cannot make a reader allocate gigabytes.
MAX_RECORD_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_BUFFER_BYTES = 1024 * 1024

_RECORD_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
_CRC = struct.Struct("<I")
_SNAPSHOT_PREFIX = struct.Struct("<8sI")  # magic, format version
_FRAME = struct.Struct("<I")  # record length; 0 starts the trailer
_TRAILER_REST = struct.Struct("<Q8s")  # record count, end marker
_FLOAT32_LE = np.dtype("<f4")

_STATE_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADER_KEYS = frozenset(
    ("session_id", "model", "version", "model_sha256", "position", "owner", "last_used", "states",
     "last_logits_size")
)  # fmt: skip


class PersistenceError(Exception):
    """Base of every error about session state kept outside the server's memory."""


class RecordError(PersistenceError):
    """A session record that cannot be used."""


class RecordCorruptError(RecordError):
    """Bytes that are not one whole, valid session record: truncated, damaged, or another format."""


class RecordMismatchError(RecordError):
    """A valid record that does not fit the model version it would be restored on."""


def describe_os_error(error: OSError) -> str:
    """A short cause for an OSError, e.g. "the disk is full (ENOSPC: No space left on device)"."""
    causes = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "the operation is not permitted",
        errno.ENOENT: "the directory or file does not exist",
        errno.ENOTDIR: "a parent of the path is not a directory",
        errno.EIO: "an I/O error occurred",
    }
    code = error.errno
    if code is None:
        return str(error)
    name = errno.errorcode.get(code, str(code))
    detail = f"{name}: {error.strerror or os.strerror(code)}"
    cause = causes.get(code)
    return f"{cause} ({detail})" if cause else detail


class SnapshotWriteError(PersistenceError):
    """The snapshot could not be written; the previous snapshot at `path`, if any, is unchanged.

    `errno` is the failing OSError's errno (ENOSPC, EROFS, EACCES, ...), or None.
    """

    def __init__(self, path: Path, error: OSError, doing: str = "write") -> None:
        self.path = path
        self.errno = error.errno
        super().__init__(
            f"cannot {doing} the session snapshot {path}: {describe_os_error(error)}; "
            f"the previous snapshot, if any, is unchanged"
        )


class SnapshotReadError(PersistenceError):
    """The snapshot cannot be read, or its bytes are not a whole, valid snapshot."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"cannot restore sessions from the snapshot {path}: {message}")


class SnapshotNotFoundError(SnapshotReadError):
    """There is no snapshot file at the path (a first start, or it was removed)."""


def _frozen_array(array: np.ndarray, what: str, ndim: int) -> np.ndarray:
    """A read-only, C-contiguous view of a float32 array (copies only when not contiguous)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{what} must be a float32 numpy array, got {kind}")
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{what} must have {ndim} non-empty dimension(s), got shape {array.shape}")
    contiguous = np.ascontiguousarray(array)
    # A new view, so marking it read-only does not touch the caller's array.
    view = contiguous.view()
    view.flags.writeable = False
    return view


class ModelVersionShape(Protocol):
    """What a record is checked against: a served model version's identity and sizes."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def model_sha256(self) -> str: ...
    @property
    def state_names(self) -> Sequence[str]: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True, eq=False)
class SessionRecord:
    """One session's state and the facts needed to restore it on the same model version.

    Arrays are kept as read-only views (no copy when the caller's array is C-contiguous float32),
    so the record never changes after it is made; the caller should hand over arrays it will not
    write again (e.g. a state pool's `read_rows` copies). Raises ValueError on invalid fields.
    """

    session_id: str  # the server's session id (32 hex characters for rnnserve's own ids)
    model: str  # model name
    version: int  # model version (>= 1)
    model_sha256: str  # sha256 hex of the version's model.onnx, to refuse a different model
    position: int  # tokens consumed since open or the last reset
    owner: str | None  # the owning identity as the server keeps it (a hash); None without auth
    last_used: float  # wall-clock time (time.time()) of the session's last request
    states: Mapping[str, np.ndarray]  # state name ("h", "c") -> (num_layers, hidden) float32
    last_logits: np.ndarray | None = None  # (vocab,) float32: logits after the last token

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, str) or not is_storable_session_id(self.session_id):
            raise ValueError(
                f"session id {self.session_id!r} must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-'"
            )
        if not isinstance(self.model, str) or not 1 <= len(self.model) <= 256:
            raise ValueError(f"model name must be a string of 1-256 characters, got {self.model!r}")
        if type(self.version) is not int or self.version < 1:
            raise ValueError(f"model version must be an integer >= 1, got {self.version!r}")
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise ValueError(f"model_sha256 must be 64 lower-case hex characters, got {self.model_sha256!r}")
        if type(self.position) is not int or self.position < 0:
            raise ValueError(f"position must be an integer >= 0, got {self.position!r}")
        if self.owner is not None and (not isinstance(self.owner, str) or len(self.owner) > 1024):
            raise ValueError("owner must be None or a string of at most 1024 characters")
        if isinstance(self.last_used, bool) or not isinstance(self.last_used, int | float):
            raise ValueError(f"last_used must be a number of seconds, got {self.last_used!r}")
        if not math.isfinite(self.last_used):
            raise ValueError(f"last_used must be finite, got {self.last_used!r}")
        object.__setattr__(self, "last_used", float(self.last_used))
        if not self.states:
            raise ValueError("a session record needs at least one state array")
        states: dict[str, np.ndarray] = {}
        for name, array in self.states.items():
            if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
                raise ValueError(f"state name {name!r} must be 1-32 characters of A-Z, a-z, 0-9, '_'")
            states[name] = _frozen_array(array, f"state {name!r}", ndim=2)
        shapes = {array.shape for array in states.values()}
        if len(shapes) != 1:
            raise ValueError(f"state arrays must share one (num_layers, hidden) shape, got {sorted(shapes)}")
        object.__setattr__(self, "states", MappingProxyType(states))
        if self.last_logits is not None:
            object.__setattr__(self, "last_logits", _frozen_array(self.last_logits, "last_logits", ndim=1))

    @property
    def row_shape(self) -> tuple[int, int]:
        """(num_layers, hidden) of every state array."""
        shape = next(iter(self.states.values())).shape
        return int(shape[0]), int(shape[1])

    def check_fits(self, manifest: ModelVersionShape) -> None:
        """check_matches against a served model version's manifest."""
        self.check_matches(
            model=manifest.name,
            version=manifest.version,
            model_sha256=manifest.model_sha256,
            state_names=manifest.state_names,
            num_layers=manifest.num_layers,
            hidden_size=manifest.hidden_size,
            vocab_size=manifest.vocab_size,
        )

    def check_matches(
        self,
        *,
        model: str,
        version: int,
        model_sha256: str,
        state_names: Sequence[str],
        num_layers: int,
        hidden_size: int,
        vocab_size: int,
    ) -> None:
        """Raise RecordMismatchError, naming every difference, unless the record fits this version.

        Pass the facts of the loaded version the session would be restored on (its manifest).
        """
        problems = []
        if (self.model, self.version) != (model, version):
            problems.append(
                f"it is for {self.model!r} version {self.version}, not {model!r} version {version}"
            )
        if self.model_sha256 != model_sha256:
            problems.append(
                f"its model.onnx sha256 is {self.model_sha256[:12]}…, the loaded one is {model_sha256[:12]}…"
            )
        if tuple(self.states) != tuple(state_names):
            problems.append(f"it has state tensors {list(self.states)}, the model has {list(state_names)}")
        if self.row_shape != (num_layers, hidden_size):
            problems.append(
                f"its state rows are {self.row_shape}, the model's are {(num_layers, hidden_size)} "
                f"(num_layers, hidden)"
            )
        if self.last_logits is not None and self.last_logits.shape[0] != vocab_size:
            problems.append(
                f"its last logits have {self.last_logits.shape[0]} entries, the vocabulary {vocab_size}"
            )
        if problems:
            raise RecordMismatchError(f"session {self.session_id} cannot be restored: " + "; ".join(problems))


def _header(record: SessionRecord) -> bytes:
    header = {
        "session_id": record.session_id,
        "model": record.model,
        "version": record.version,
        "model_sha256": record.model_sha256,
        "position": record.position,
        "owner": record.owner,
        "last_used": record.last_used,
        "states": [[name, list(array.shape)] for name, array in record.states.items()],
        "last_logits_size": None if record.last_logits is None else int(record.last_logits.shape[0]),
    }
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _le_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes as float32 little-endian (no copy on little-endian machines)."""
    return np.ascontiguousarray(array, dtype=_FLOAT32_LE).data.cast("B")


def record_parts(record: SessionRecord) -> list[bytes | memoryview]:
    """The record's encoding as buffers, in order (arrays are not copied); see encode_record."""
    header = _header(record)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"the record header is {len(header)} bytes, at most {MAX_HEADER_BYTES} are allowed")
    parts: list[bytes | memoryview] = [_RECORD_PREFIX.pack(RECORD_MAGIC, RECORD_FORMAT, len(header)), header]
    parts.extend(_le_bytes(array) for array in record.states.values())
    if record.last_logits is not None:
        parts.append(_le_bytes(record.last_logits))
    size = sum(len(part) for part in parts) + _CRC.size
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"the record is {size} bytes, at most {MAX_RECORD_BYTES} are allowed")
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return parts


def encode_record(record: SessionRecord) -> bytes:
    """The record as bytes (see the module docstring for the layout)."""
    return b"".join(record_parts(record))


def _field(header: Mapping[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RecordCorruptError(f"session record header field {name!r} is invalid: {value!r}")
    return value


def _shapes(header: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each array in payload order; last_logits last when present."""
    states = header.get("states")
    if not isinstance(states, list) or not states:
        raise RecordCorruptError(f"session record header field 'states' is invalid: {states!r}")
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for entry in states:
        valid = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and len(entry[1]) == 2
            and all(type(d) is int and d >= 1 for d in entry[1])
        )
        if not valid:
            raise RecordCorruptError(f"session record header has an invalid state entry: {entry!r}")
        shapes.append((entry[0], tuple(entry[1])))
    logits_size = header.get("last_logits_size")
    if logits_size is not None:
        if type(logits_size) is not int or logits_size < 1:
            raise RecordCorruptError(
                f"session record header field 'last_logits_size' is invalid: {logits_size!r}"
            )
        shapes.append(("last_logits", (logits_size,)))
    return shapes


def decode_record(data: bytes | bytearray | memoryview) -> SessionRecord:
    """Decode one record; raises RecordCorruptError (and returns nothing) unless it is whole and valid.

    The record's arrays are read-only views into `data` when it is `bytes` (no copy); any other
    buffer is copied first, so later writes to it cannot change the record.
    """
    blob = data if isinstance(data, bytes) else bytes(data)
    size = len(blob)
    smallest = _RECORD_PREFIX.size + _CRC.size
    if size < smallest:
        raise RecordCorruptError(
            f"session record is truncated: {size} bytes, a record has at least {smallest}"
        )
    magic, version, header_size = _RECORD_PREFIX.unpack_from(blob)
    if magic != RECORD_MAGIC:
        raise RecordCorruptError(f"not a session record: it starts with {magic!r}, not {RECORD_MAGIC!r}")
    if version != RECORD_FORMAT:
        raise RecordCorruptError(
            f"session record format version {version} is not supported (this server reads version "
            f"{RECORD_FORMAT})"
        )
    body_end = size - _CRC.size
    (stored_crc,) = _CRC.unpack_from(blob, body_end)
    if zlib.crc32(memoryview(blob)[:body_end]) != stored_crc:
        raise RecordCorruptError(
            f"session record checksum mismatch: the {size} bytes are corrupt or truncated"
        )
    header_end = _RECORD_PREFIX.size + header_size
    if header_size > MAX_HEADER_BYTES or header_end > body_end:
        raise RecordCorruptError(f"session record header length {header_size} does not fit the record")
    try:
        header = json.loads(blob[_RECORD_PREFIX.size : header_end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordCorruptError(f"session record header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise RecordCorruptError(f"session record header has fields {keys}, expected {sorted(_HEADER_KEYS)}")
    shapes = _shapes(header)
    payload_size = sum(4 * math.prod(shape) for _, shape in shapes)
    if header_end + payload_size != body_end:
        raise RecordCorruptError(
            f"session record payload is {body_end - header_end} bytes, its header declares {payload_size}"
        )
    arrays: list[np.ndarray] = []
    offset = header_end
    for _, shape in shapes:
        count = math.prod(shape)
        array = np.frombuffer(blob, dtype=_FLOAT32_LE, count=count, offset=offset).reshape(shape)
        arrays.append(array.astype(np.float32, copy=False))  # a no-op on little-endian machines
        offset += 4 * count
    has_logits = header["last_logits_size"] is not None
    state_arrays = arrays[:-1] if has_logits else arrays
    state_shapes = shapes[: len(state_arrays)]
    owner = header["owner"]
    if owner is not None and not isinstance(owner, str):
        raise RecordCorruptError(f"session record header field 'owner' is invalid: {owner!r}")
    try:
        return SessionRecord(
            session_id=_field(header, "session_id", str),
            model=_field(header, "model", str),
            version=_field(header, "version", int),
            model_sha256=_field(header, "model_sha256", str),
            position=_field(header, "position", int),
            owner=owner,
            last_used=_field(header, "last_used", (int, float)),
            states={name: array for (name, _), array in zip(state_shapes, state_arrays, strict=True)},
            last_logits=arrays[-1] if has_logits else None,
        )
    except ValueError as error:
        raise RecordCorruptError(f"session record is invalid: {error}") from None


# ----- snapshot file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """What write_snapshot wrote."""

    path: Path
    sessions: int
    size_bytes: int
    seconds: float


class _SnapshotWriter:
    """Buffered os.write calls to a temporary file; every OSError becomes a SnapshotWriteError.

    os.write (not a Python file object) so that every byte passes one seam that tests can fail
    with ENOSPC, and so that a short write is retried rather than lost.
    """

    def __init__(self, target: Path, fd: int, buffer_bytes: int) -> None:
        self.target = target
        self.fd: int | None = fd
        self.buffer = bytearray()
        self.buffer_bytes = buffer_bytes
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        if len(self.buffer) + len(data) > self.buffer_bytes:
            self.flush()
        if len(data) >= self.buffer_bytes:
            self._write_all(data)  # large arrays go straight to the file, uncopied
        else:
            self.buffer += data

    def flush(self) -> None:
        if self.buffer:
            self._write_all(self.buffer)
            self.buffer.clear()

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        assert self.fd is not None
        # Released views before returning, so the caller may resize a bytearray it passed.
        with memoryview(data) as view:
            offset = 0
            try:
                while offset < len(view):
                    with view[offset:] as rest:
                        offset += os.write(self.fd, rest)
            except OSError as error:
                raise SnapshotWriteError(self.target, error) from error
        self.written += offset

    def commit(self, temp: Path) -> None:
        """Flush, fsync and close the temporary file, then rename it over the target."""
        self.flush()
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            fd, self.fd = self.fd, None
            os.close(fd)
            os.replace(temp, self.target)
        except OSError as error:
            raise SnapshotWriteError(self.target, error) from error

    def discard(self, temp: Path) -> None:
        """Close and remove the temporary file after a failure (the target is untouched).

        Errors here are not raised: the failure being handled is the one the caller must see,
        and a leftover temporary file is removed by remove_stale_temp_files at the next start.
        """
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_directory(path: Path) -> None:
    """Make the rename durable. File systems that cannot fsync a directory answer EINVAL."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError as error:
        raise SnapshotWriteError(path, error, doing="sync the directory of") from error
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise SnapshotWriteError(path, error, doing="sync the directory of") from error
    finally:
        os.close(fd)


def write_snapshot(
    path: str | os.PathLike[str],
    records: Iterable[SessionRecord],
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> SnapshotInfo:
    """Write every record to the snapshot at `path`, atomically, streaming (one record in memory).

    Replaces a previous snapshot only once the new one is complete and fsynced. Raises
    SnapshotWriteError (path, errno, and the cause in words: disk full, read-only, permission
    denied, ...) when the disk refuses; then the previous snapshot is unchanged and no temporary
    file is left behind. An exception raised by `records` itself propagates unchanged, with the
    same guarantees. The file is created with mode 0600 (session state is private).
    """
    target = Path(path)
    started = time.perf_counter()
    try:
        fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise SnapshotWriteError(target, error, doing="create a temporary file for") from error
    temp = Path(temp_name)
    writer = _SnapshotWriter(target, fd, buffer_bytes)
    count = 0
    try:
        writer.write(_SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT))
        for record in records:
            parts = record_parts(record)
            writer.write(_FRAME.pack(sum(len(part) for part in parts)))
            for part in parts:
                writer.write(part)
            count += 1
        writer.write(_FRAME.pack(0) + _TRAILER_REST.pack(count, SNAPSHOT_END))
        writer.commit(temp)
    except BaseException:
        writer.discard(temp)
        raise
    _fsync_directory(target)
    return SnapshotInfo(target, count, writer.written, time.perf_counter() - started)


def remove_stale_temp_files(path: str | os.PathLike[str]) -> int:
    """Remove temporary files a killed writer left beside the snapshot at `path`; returns how many.

    Call at start-up, before any snapshot of `path` is being written. Raises OSError when a
    leftover file exists but cannot be removed.
    """
    target = Path(path)
    removed = 0
    for candidate in list(target.parent.glob(f"{glob.escape(_temp_prefix(target))}*.tmp")):
        try:
            candidate.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed


class SnapshotReader:
    """A snapshot checked whole on open; iterate to get its records (read again, one at a time).

        with open_snapshot(path) as snapshot:
            log.info("restoring %d sessions", snapshot.count)
            for record in snapshot:
                ...

    The file stays open until close(), so a newer snapshot renamed over the path meanwhile does
    not change what is read.
    """

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self._file = file
        self.count = self._check()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[SessionRecord]:
        return self._records()

    def _read(self, size: int, what: str) -> bytes:
        offset = self._file.tell()
        try:
            data = self._file.read(size)
        except OSError as error:
            raise SnapshotReadError(self.path, describe_os_error(error)) from error
        if len(data) != size:
            raise SnapshotReadError(
                self.path,
                f"the file is truncated: {what} at byte {offset} needs {size} bytes, {len(data)} remain",
            )
        return data

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset, record bytes) of each frame, then checks the trailer."""
        self._file.seek(0)
        magic, version = _SNAPSHOT_PREFIX.unpack(self._read(_SNAPSHOT_PREFIX.size, "the file header"))
        if magic != SNAPSHOT_MAGIC:
            raise SnapshotReadError(self.path, f"not an rnnserve session snapshot (it starts with {magic!r})")
        if version != SNAPSHOT_FORMAT:
            raise SnapshotReadError(
                self.path,
                f"snapshot format version {version} is not supported (this server reads {SNAPSHOT_FORMAT})",
            )
        index = 0
        while True:
            offset = self._file.tell()
            (size,) = _FRAME.unpack(self._read(_FRAME.size, f"the length of record {index}"))
            if size == 0:
                break
            if size > MAX_RECORD_BYTES:
                raise SnapshotReadError(
                    self.path,
                    f"record {index} at byte {offset} claims {size} bytes (at most {MAX_RECORD_BYTES})",
                )
            yield offset, self._read(size, f"record {index}")
            index += 1
        count, end = _TRAILER_REST.unpack(self._read(_TRAILER_REST.size, "the trailer"))
        if end != SNAPSHOT_END or count != index:
            raise SnapshotReadError(
                self.path, f"the trailer is damaged (it counts {count} records, the file holds {index})"
            )
        if self._file.read(1):
            raise SnapshotReadError(self.path, "unexpected bytes after the trailer")

    def _decode(self, index: int, offset: int, data: bytes) -> SessionRecord:
        try:
            return decode_record(data)
        except RecordCorruptError as error:
            raise SnapshotReadError(self.path, f"record {index} at byte {offset}: {error}") from error

    def _check(self) -> int:
        count = 0
        for index, (offset, data) in enumerate(self._frames()):
            self._decode(index, offset, data)
            count += 1
        return count

    def _records(self) -> Iterator[SessionRecord]:
        for index, (offset, data) in enumerate(self._frames()):
            yield self._decode(index, offset, data)


def open_snapshot(path: str | os.PathLike[str]) -> SnapshotReader:
    """Open and check a snapshot: every frame, record checksum and field, and the trailer.

    Raises SnapshotNotFoundError when there is no file, SnapshotReadError when it cannot be read or
    is not whole and valid (then nothing should be restored from it).
    """
    target = Path(path)
    try:
        file = target.open("rb")
    except FileNotFoundError as error:
        raise SnapshotNotFoundError(target, "there is no snapshot file") from error
    except OSError as error:
        raise SnapshotReadError(target, describe_os_error(error)) from error
    try:
        return SnapshotReader(target, file)
    except BaseException:
        file.close()
        raise


def read_snapshot(path: str | os.PathLike[str]) -> list[SessionRecord]:
    """Every record of a snapshot, checked (all in memory; see open_snapshot to stream them)."""
    with open_snapshot(path) as snapshot:
        return list(snapshot)
