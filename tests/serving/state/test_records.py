"""Session records and the snapshot file: exact round trips, strict decoding, atomic writes, and a
full or read-only disk (a real tiny tmpfs where mounting is allowed, and injected errors)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.state import records as persistence
from serving.state.records import (
    RecordCorruptError,
    RecordMismatchError,
    SessionRecord,
    SnapshotNotFoundError,
    SnapshotReadError,
    SnapshotWriteError,
    decode_record,
    encode_record,
    open_snapshot,
    read_snapshot,
    remove_stale_temp_files,
    write_snapshot,
)

SHA = "0123456789abcdef" * 4


def make_record(
    session_id: str = "5" * 32,
    arch: str = "lstm",
    num_layers: int = 2,
    hidden: int = 16,
    vocab: int | None = 32,
    seed: int = 0,
    owner: str | None = "owner-hash",
) -> SessionRecord:
    rng = np.random.default_rng(seed)
    names = ("h", "c") if arch == "lstm" else ("h",)
    return SessionRecord(
        session_id=session_id,
        model=f"tiny-{arch}",
        version=3,
        model_sha256=SHA,
        position=17 + seed,
        owner=owner,
        last_used=1_700_000_123.25 + seed,
        states={name: rng.standard_normal((num_layers, hidden), dtype=np.float32) for name in names},
        last_logits=None if vocab is None else rng.standard_normal(vocab, dtype=np.float32),
    )


def assert_same(loaded: SessionRecord, record: SessionRecord) -> None:
    for name in ("session_id", "model", "version", "model_sha256", "position", "owner", "last_used"):
        assert getattr(loaded, name) == getattr(record, name), name
    assert list(loaded.states) == list(record.states)
    for name, array in record.states.items():
        assert loaded.states[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.states[name], array)
    if record.last_logits is None:
        assert loaded.last_logits is None
    else:
        assert loaded.last_logits is not None
        np.testing.assert_array_equal(loaded.last_logits, record.last_logits)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ----- records ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "vocab", "owner"), [("lstm", 32, "owner-hash"), ("gru", None, None)])
def test_record_round_trip_is_exact(arch: str, vocab: int | None, owner: str | None) -> None:
    record = make_record(arch=arch, vocab=vocab, owner=owner)
    data = encode_record(record)
    expected_payload = 4 * (len(record.states) * 2 * 16 + (vocab or 0))
    assert len(data) > expected_payload
    loaded = decode_record(data)
    assert_same(loaded, record)
    assert loaded.row_shape == (2, 16)
    assert not loaded.states["h"].flags.writeable  # records never change after they are made


def test_a_record_does_not_share_writes_with_its_sources() -> None:
    h = np.zeros((1, 4), np.float32)
    record = make_record()
    record = SessionRecord(**{**record.__dict__, "states": {"h": h}, "last_logits": None})
    assert not record.states["h"].flags.writeable and h.flags.writeable  # the caller's array is untouched
    buffer = bytearray(encode_record(record))
    loaded = decode_record(buffer)
    buffer[:] = bytes(len(buffer))  # decoding copied a mutable buffer
    np.testing.assert_array_equal(loaded.states["h"], h)


@settings(max_examples=30, deadline=None)
@given(
    num_layers=st.integers(1, 4),
    hidden=st.integers(1, 64),
    vocab=st.one_of(st.none(), st.integers(1, 300)),
    lstm=st.booleans(),
    position=st.integers(0, 2**62),
    owner=st.one_of(st.none(), st.text(max_size=40)),
    model=st.text(min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_record_round_trip_property(
    num_layers: int,
    hidden: int,
    vocab: int | None,
    lstm: bool,
    position: int,
    owner: str | None,
    model: str,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    names = ("h", "c") if lstm else ("h",)
    record = SessionRecord(
        session_id="ab12-CD_34.x",
        model=model,
        version=1,
        model_sha256=SHA,
        position=position,
        owner=owner,
        last_used=rng.uniform(0, 2e9),
        states={name: rng.standard_normal((num_layers, hidden), dtype=np.float32) for name in names},
        last_logits=None if vocab is None else rng.standard_normal(vocab, dtype=np.float32),
    )
    assert_same(decode_record(encode_record(record)), record)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"session_id": ""}, "session id"),
        ({"session_id": "a b"}, "session id"),
        ({"model": ""}, "model name"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"model_sha256": "ABC"}, "model_sha256"),
        ({"position": -1}, "position"),
        ({"last_used": float("nan")}, "last_used"),
        ({"states": {}}, "at least one state"),
        ({"states": {"h": np.zeros((2, 16), np.float64)}}, "float32"),
        ({"states": {"h": np.zeros((2, 16, 1), np.float32)}}, "2 non-empty"),
        ({"states": {"h": np.zeros((2, 16), np.float32), "c": np.zeros((2, 8), np.float32)}}, "share one"),
        ({"states": {"h!": np.zeros((2, 16), np.float32)}}, "state name"),
        ({"last_logits": np.zeros((2, 16), np.float32)}, "last_logits"),
    ],
)
def test_invalid_records_are_refused(change: dict[str, object], message: str) -> None:
    fields = {**make_record().__dict__, **change}
    with pytest.raises(ValueError, match=message):
        SessionRecord(**fields)


def test_check_matches_names_every_difference() -> None:
    record = make_record()
    good = {
        "model": "tiny-lstm",
        "version": 3,
        "model_sha256": SHA,
        "state_names": ["h", "c"],
        "num_layers": 2,
        "hidden_size": 16,
        "vocab_size": 32,
    }
    record.check_matches(**good)  # type: ignore[arg-type]
    bad = {
        **good,
        "version": 4,
        "model_sha256": "f" * 64,
        "state_names": ["h"],
        "hidden_size": 32,
        "vocab_size": 33,
    }
    with pytest.raises(RecordMismatchError) as caught:
        record.check_matches(**bad)  # type: ignore[arg-type]
    message = str(caught.value)
    for expected in ("version 4", "sha256", "state tensors", "(2, 32)", "vocabulary 33"):
        assert expected in message


def test_every_truncation_is_refused() -> None:
    data = encode_record(make_record(arch="gru", hidden=4, vocab=8))
    for size in range(len(data)):
        with pytest.raises(RecordCorruptError):
            decode_record(data[:size])


def test_every_flipped_byte_is_refused() -> None:
    data = encode_record(make_record(arch="gru", hidden=4, vocab=8))
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x01
        with pytest.raises(RecordCorruptError):
            decode_record(bytes(damaged))


def reseal(body: bytes) -> bytes:
    """A record body with a correct checksum (to reach the checks behind the CRC)."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_wrong_magic_and_format_version_are_named() -> None:
    data = encode_record(make_record())
    with pytest.raises(RecordCorruptError, match="not a session record"):
        decode_record(b"XXXX" + data[4:])
    with pytest.raises(RecordCorruptError, match="format version 2 is not supported"):
        decode_record(reseal(data[:4] + struct.pack("<H", 2) + data[6:-4]))


def test_a_valid_checksum_over_invalid_contents_is_still_refused() -> None:
    record = make_record(arch="gru", vocab=None)
    data = encode_record(record)
    (header_size,) = struct.unpack_from("<I", data, 6)
    header = data[10 : 10 + header_size]
    payload = data[10 + header_size : -4]

    def with_header(text: bytes, body: bytes = payload) -> bytes:
        return reseal(b"RNSR" + struct.pack("<HI", 1, len(text)) + text + body)

    with pytest.raises(RecordCorruptError, match="payload is"):
        decode_record(with_header(header, payload[:-4]))
    with pytest.raises(RecordCorruptError, match="not valid JSON"):
        decode_record(with_header(b"{nope"))
    with pytest.raises(RecordCorruptError, match="header has fields"):
        decode_record(with_header(header.replace(b'"owner"', b'"ownr"')))
    with pytest.raises(RecordCorruptError, match="invalid"):
        decode_record(with_header(header.replace(b'"version":3', b'"version":-3')))
    with pytest.raises(RecordCorruptError, match="position"):
        decode_record(with_header(header.replace(b'"position":17', b'"position":"17"')))


# ----- snapshot file ---------------------------------------------------------------------------------


def test_snapshot_round_trip(tmp_path: Path) -> None:
    records = [make_record(f"{i:032x}", "lstm" if i % 2 else "gru", seed=i) for i in range(200)]
    path = tmp_path / "sessions.snapshot"
    info = write_snapshot(path, iter(records))
    assert (info.path, info.sessions, info.size_bytes) == (path, 200, path.stat().st_size)
    assert path.stat().st_mode & 0o777 == 0o600  # session state is private
    with open_snapshot(path) as snapshot:
        assert snapshot.count == 200
        for loaded, record in zip(snapshot, records, strict=True):
            assert_same(loaded, record)
    assert temp_files(tmp_path) == []


def test_an_empty_snapshot_holds_no_sessions(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    assert write_snapshot(path, []).sessions == 0
    assert read_snapshot(path) == []


def test_a_new_snapshot_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    write_snapshot(path, [make_record(seed=1)])
    write_snapshot(path, [make_record(seed=2), make_record("6" * 32, seed=3)])
    assert [r.position for r in read_snapshot(path)] == [19, 20]


def test_a_missing_snapshot_is_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFoundError, match="no snapshot file"):
        open_snapshot(tmp_path / "absent")


def test_writing_streams_records(tmp_path: Path) -> None:
    """500 records of 64 KiB each (31 MiB) are written with far less than that in memory."""
    state = np.ones((4, 4096), np.float32)

    def records() -> Iterator[SessionRecord]:
        for i in range(500):
            yield SessionRecord(f"{i:032x}", "m", 1, SHA, i, None, 0.0, {"h": state})

    tracemalloc.start()
    try:
        info = write_snapshot(tmp_path / "big", records())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.sessions == 500 and info.size_bytes > 500 * 64 * 1024
    assert peak < 4 * 1024 * 1024, peak
    with open_snapshot(tmp_path / "big") as snapshot:
        assert snapshot.count == 500


def good_snapshot(tmp_path: Path, count: int = 3) -> tuple[Path, bytes]:
    path = tmp_path / "snap"
    write_snapshot(path, [make_record(f"{i:032x}", seed=i) for i in range(count)])
    return path, path.read_bytes()


def test_every_truncated_snapshot_is_refused_before_any_record(tmp_path: Path) -> None:
    path, data = good_snapshot(tmp_path)
    for size in sorted({*range(0, 40), *range(len(data) - 40, len(data)), len(data) // 2}):
        path.write_bytes(data[:size])
        with pytest.raises(SnapshotReadError) as caught:
            open_snapshot(path)
        assert str(path) in str(caught.value)


def test_a_damaged_record_is_named_and_nothing_is_restored(tmp_path: Path) -> None:
    path, data = good_snapshot(tmp_path)
    damaged = bytearray(data)
    damaged[-40] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(damaged))
    with pytest.raises(SnapshotReadError, match=r"record 2 at byte \d+: session record checksum mismatch"):
        open_snapshot(path)  # fails on open, before the first record is handed out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: b"NOTSNAPS" + d[8:], "not an rnnserve session snapshot"),
        (lambda d: d[:8] + struct.pack("<I", 9) + d[12:], "format version 9"),
        (lambda d: d + b"x", "after the trailer"),
        (lambda d: d[:-16] + struct.pack("<Q", 7) + d[-8:], "counts 7 records, the file holds 3"),
        (lambda d: d[:12] + struct.pack("<I", 2**31) + d[16:], "claims 2147483648 bytes"),
    ],
)
def test_damaged_snapshot_structure_is_named(tmp_path: Path, edit: object, message: str) -> None:
    path, data = good_snapshot(tmp_path)
    path.write_bytes(edit(data))  # type: ignore[operator]
    with pytest.raises(SnapshotReadError, match=message):
        read_snapshot(path)


def test_an_error_from_the_records_leaves_the_old_snapshot(tmp_path: Path) -> None:
    path, data = good_snapshot(tmp_path)

    def records() -> Iterator[SessionRecord]:
        yield make_record()
        raise RuntimeError("a state read failed")

    with pytest.raises(RuntimeError, match="a state read failed"):
        write_snapshot(path, records())
    assert path.read_bytes() == data
    assert temp_files(tmp_path) == []


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "snap[1]"
    (tmp_path / ".snap[1].abc123.tmp").write_bytes(b"half")
    (tmp_path / ".other.abc123.tmp").write_bytes(b"someone else's")
    assert remove_stale_temp_files(path) == 1
    assert temp_files(tmp_path) == [".other.abc123.tmp"]


# ----- a full or read-only disk: injected errors (always run) ---------------------------------------


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = good_snapshot(tmp_path)
    real_write = os.write
    budget = [5000]  # bytes the "disk" still takes

    def write(fd: int, chunk: bytes | memoryview) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, bytes(chunk)[: budget[0]])  # a short write, then ENOSPC
        budget[0] -= written
        return written

    monkeypatch.setattr(persistence.os, "write", write)
    records = [make_record(f"{i:032x}", seed=i) for i in range(50)]
    with pytest.raises(SnapshotWriteError) as caught:
        write_snapshot(path, records, buffer_bytes=1024)
    error = caught.value
    assert error.errno == errno.ENOSPC and error.path == path
    assert str(path) in str(error) and "the disk is full (ENOSPC" in str(error)
    assert "previous snapshot" in str(error)
    monkeypatch.undo()
    assert path.read_bytes() == data  # the good snapshot is untouched
    assert temp_files(tmp_path) == []


def test_fsync_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = good_snapshot(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(persistence.os, "fsync", fsync)
    with pytest.raises(SnapshotWriteError, match="an I/O error occurred") as caught:
        write_snapshot(path, [make_record()])
    assert caught.value.errno == errno.EIO
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EACCES, "permission denied"), (errno.EROFS, "the file system is read-only")],
)
def test_no_permission_or_read_only_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """Injected: root ignores file permissions, so chmod cannot show EACCES in this test run."""
    path, data = good_snapshot(tmp_path)

    def mkstemp(**_: object) -> tuple[int, str]:
        raise OSError(code, os.strerror(code), str(tmp_path))

    monkeypatch.setattr(persistence.tempfile, "mkstemp", mkstemp)
    with pytest.raises(SnapshotWriteError, match=words) as caught:
        write_snapshot(path, [make_record()])
    assert caught.value.errno == code and str(path) in str(caught.value)
    monkeypatch.undo()
    assert path.read_bytes() == data


# ----- a full or read-only disk: a real 64 KiB tmpfs (where mount is permitted) -----------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted on a fresh directory; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests cover the disk-full path")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
            f"the injected-ENOSPC tests cover the disk-full path"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, capture_output=True)


def test_a_real_full_disk(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "snap"
    write_snapshot(path, [make_record(seed=1)])
    before = path.read_bytes()
    big = [make_record(f"{i:032x}", hidden=512, seed=i) for i in range(40)]  # ~330 KiB: cannot fit
    started = time.monotonic()
    with pytest.raises(SnapshotWriteError, match="the disk is full") as caught:
        write_snapshot(path, big)
    assert caught.value.errno == errno.ENOSPC
    assert time.monotonic() - started < 5
    assert path.read_bytes() == before
    assert temp_files(tiny_tmpfs) == []
    assert_same(read_snapshot(path)[0], make_record(seed=1))
    write_snapshot(path, big[:2])  # space came back once the partial file was removed
    assert len(read_snapshot(path)) == 2


def test_a_real_read_only_file_system(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "snap"
    write_snapshot(path, [make_record()])
    before = path.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True, capture_output=True)
    with pytest.raises(SnapshotWriteError, match="the file system is read-only") as caught:
        write_snapshot(path, [make_record(seed=5)])
    assert caught.value.errno == errno.EROFS
    assert path.read_bytes() == before
    assert len(read_snapshot(path)) == 1  # restoring from a read-only disk still works
