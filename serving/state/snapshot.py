"""`--state-snapshot PATH`: every session's state saved at shutdown, and restored at the next start.

What is saved, per session (serving.state.records's SessionRecord): its id, owner, model name,
version and model.onnx sha256, position, last use, recurrent state rows and last logits. The
file is replaced atomically (a temporary file beside it, fsynced, renamed), so a crash during a
save leaves the previous snapshot whole; a temporary file a killed server left behind is removed
at the next start.

At shutdown the server first freezes its sessions (sessions.SessionManager.freeze: a request
that has not started is refused with UNAVAILABLE, those in flight finish), so the snapshot holds
exactly the state of the answered requests: a resumed session's next prediction equals what it
would have been without the restart. With `--snapshot-interval-s` the snapshot is also saved
while serving; sessions are then captured one chunk at a time, each held between its requests,
and a session busy for longer than BUSY_WAIT_S (a long Generate) is left out of that save.

At start, a session is restored only onto the same model name and version whose model.onnx has
the same sha256 (an older version still in the repository is loaded for it, retired, and unloads
when its last session ends). Sessions whose model changed or is gone, sessions that would have
expired while the server was down, and sessions over a limit are dropped with a log line that
counts them. A snapshot that cannot be read is logged and the server starts without sessions.

What a crash (SIGKILL, power loss) loses: every session's requests since the last save; with
`--snapshot-interval-s N`, at most the last N seconds. Without that setting a crash restores the
previous shutdown's sessions as they were then; a client notices from the `position` of its
next prediction. The snapshot file is not removed after a restore: a second start without a new
save restores the same state again.

A save that fails (disk full, read-only file system, permissions) is logged with its cause and
counted (snapshot_writes_total{outcome="failed"}); serving, and shutdown, go on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from serving.core.engine import EngineError
from serving.core.errors import ServingError
from serving.core.registry import LoadedModel, batching_options, engine_options, load_version
from serving.core.repository import RepositoryError, read_manifest
from serving.core.runtime import Runtime
from serving.core.sessions import Session, SessionIdInUseError
from serving.state.capture import capture_held, restored_rows, write_rows
from serving.state.records import (
    PersistenceError,
    RecordMismatchError,
    SessionRecord,
    SnapshotInfo,
    SnapshotNotFoundError,
    describe_os_error,
    open_snapshot,
    remove_stale_temp_files,
    write_snapshot,
)

log = logging.getLogger(__name__)

Restored = dict[LoadedModel, list[tuple[Session, SessionRecord]]]  # model -> (session, its record)

CHUNK_SESSIONS = 1024  # sessions captured (and held) at a time; bounds memory and step delays
BUSY_WAIT_S = 1.0  # how long a periodic save waits for a chunk's busy sessions


class SessionSnapshots:
    """Saves and restores the sessions of one runtime at one path."""

    def __init__(self, path: Path, runtime: Runtime, state_on_device: bool | None = None) -> None:
        self.path = path
        self.runtime = runtime
        self.state_on_device = state_on_device
        self.observer = runtime.observer
        self._lock = asyncio.Lock()  # one save at a time
        self._stop = asyncio.Event()

    # ----- start ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """At start: remove a killed writer's temporary files; warn if saving cannot work."""
        directory = self.path.parent
        if not directory.is_dir():
            log.error(
                "--state-snapshot %s: the directory %s does not exist; sessions will not be saved",
                self.path,
                directory,
            )
            return
        try:
            removed = remove_stale_temp_files(self.path)
        except OSError as error:
            log.error("--state-snapshot %s: cannot remove a stale temporary file: %s", self.path, error)
        else:
            if removed:
                log.info("removed %d temporary snapshot file(s) left by an interrupted save", removed)
        if not os.access(directory, os.W_OK):
            log.error(
                "--state-snapshot %s: %s",
                self.path,
                describe_os_error(OSError(errno.EACCES, "the directory is not writable")),
            )

    async def restore(self) -> int:
        """Restore the snapshot's sessions; returns how many. Call after runtime.start() (rows are
        written on the models' worker threads) and before the server takes calls."""
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(None, self._read)
        except SnapshotNotFoundError:
            log.info("no session snapshot at %s: starting without sessions", self.path)
            return 0
        except PersistenceError as error:
            log.error("%s; starting without sessions", error)
            return 0
        dropped: Counter[str] = Counter()
        restored: Restored = {}
        now = time.time()
        for record in records:
            reason = await self._restore_one(record, now, restored)
            if reason is not None:
                dropped[reason] += 1
                log.debug("session %s not restored: %s", record.session_id, reason)
        count = 0
        for model, opened in restored.items():
            # A lowered --max-sessions may have evicted sessions restored before the later ones.
            pairs = [(session, record) for session, record in opened if not session.closed]
            dropped["a session limit (--max-sessions) was reached"] += len(opened) - len(pairs)
            if not pairs:
                continue
            await write_rows(model, restored_rows(model, pairs))
            for _, record in pairs:
                self.observer.session_restored(record.model, record.version, "snapshot")
            count += len(pairs)
        for model in list(self.runtime.registry):
            if model.retired and model.active_sessions == 0 and model.loaded:
                self.runtime.registry.retire(model.name, model.version)  # loaded for nothing: unload
        dropped = +dropped  # without reasons that counted nothing
        log.info(
            "restored %d of %d sessions from %s%s",
            count,
            len(records),
            self.path,
            "".join(f"; {n} dropped: {why}" for why, n in sorted(dropped.items())),
        )
        return count

    def _read(self) -> list[SessionRecord]:
        with open_snapshot(self.path) as snapshot:
            return list(snapshot)

    async def _restore_one(self, record: SessionRecord, now: float, restored: Restored) -> str | None:
        """Open one record's session (its rows are written later, per model); None or why not."""
        idle_s = max(0.0, now - record.last_used)
        if idle_s > self.runtime.settings.session_idle_timeout_s:
            return "it would have expired while the server was down"
        model = await self._model_for(record)
        if model is None:
            return "its model version is not in the repository with the same sha256"
        manifest = model.manifest
        try:
            record.check_fits(manifest)
        except RecordMismatchError:
            return "its model version changed (another sha256 or shape)"
        sessions = self.runtime.sessions
        try:
            session = sessions.create(model, record.owner, session_id=record.session_id)
        except SessionIdInUseError:
            return "its id is already open"
        except ServingError:
            return "a session limit (--max-sessions or --max-sessions-per-token) was reached"
        session.position = record.position
        session.last_used = sessions.clock() - idle_s
        restored.setdefault(model, []).append((session, record))
        return None

    async def _model_for(self, record: SessionRecord) -> LoadedModel | None:
        """The loaded version of the record, or that version loaded from the repository (retired:
        it takes no new sessions) when it is still there with the same sha256."""
        registry = self.runtime.registry
        model = registry.get(record.model, record.version)
        if model is not None:
            return model if model.manifest.model_sha256 == record.model_sha256 else None
        version_dir = self.runtime.settings.repository / record.model / str(record.version)
        settings = self.runtime.settings
        try:
            manifest = read_manifest(version_dir)
            if manifest.model_sha256 != record.model_sha256:
                return None
            loaded = await asyncio.get_running_loop().run_in_executor(
                None,
                load_version,
                manifest,
                engine_options(settings),
                batching_options(settings),
                registry.observer,
                self.state_on_device,
            )
        except (RepositoryError, EngineError) as error:
            log.error("cannot load %s for its snapshot sessions: %s", version_dir, error)
            return None
        # Newer than what serves the name (e.g. the repository lost a version): serve it; older: retired.
        latest = registry.latest(record.model)
        registry.add(loaded, retired=latest is not None and latest.version > record.version)
        log.info("loaded %s for the sessions of the snapshot", loaded.label)
        return loaded

    # ----- save ------------------------------------------------------------------------------

    async def save(self, busy_wait_s: float = BUSY_WAIT_S) -> SnapshotInfo | None:
        """Write every open session to the snapshot now; None when the disk refused (logged).

        A session busy for longer than `busy_wait_s` is left out (0 at shutdown, when every
        session is idle and frozen).
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            sessions = list(self.runtime.sessions)  # least recently used first
            chunks = [sessions[i : i + CHUNK_SESSIONS] for i in range(0, len(sessions), CHUNK_SESSIONS)]
            left_out = [0]

            def records() -> Iterator[SessionRecord]:
                # Runs on the writer thread: each chunk is captured on the event loop, written,
                # then dropped, so a large snapshot never sits in memory whole.
                for chunk in chunks:
                    captured, skipped = asyncio.run_coroutine_threadsafe(
                        self._capture(chunk, busy_wait_s), loop
                    ).result()
                    left_out[0] += skipped
                    yield from captured

            try:
                info = await loop.run_in_executor(None, write_snapshot, self.path, records())
            except (PersistenceError, ValueError) as error:
                log.error("session snapshot not saved: %s", error)
                self.observer.snapshot_failed(str(self.path), str(error))
                return None
        self.observer.snapshot_written(str(self.path), info.sessions, info.size_bytes, info.seconds)
        log.info(
            "saved %d sessions to %s (%d bytes, %.3f s)%s",
            info.sessions,
            self.path,
            info.size_bytes,
            info.seconds,
            f"; {left_out[0]} busy sessions left out" if left_out[0] else "",
        )
        return info

    async def _capture(self, chunk: Sequence[Session], busy_wait_s: float) -> tuple[list[SessionRecord], int]:
        """Hold the chunk's sessions between requests, copy their rows, let go. (records, left out)"""
        deadline = time.monotonic() + busy_wait_s
        held: list[Session] = []
        skipped = 0
        for session in chunk:
            if session.closed:
                continue
            if await self.runtime.sessions.hold(session, max(0.0, deadline - time.monotonic())):
                held.append(session)
            elif not session.closed:
                skipped += 1
        try:
            by_model: dict[LoadedModel, list[Session]] = {}
            for session in held:
                by_model.setdefault(session.model, []).append(session)
            records: list[SessionRecord] = []
            clock_now, wall_now = self.runtime.sessions.clock(), time.time()
            for model, group in by_model.items():
                records.extend(
                    await capture_held(model, group, lambda s: wall_now - (clock_now - s.last_used))
                )
        finally:
            for session in held:
                self.runtime.sessions.unhold(session)
        return records, skipped

    # ----- periodic saves --------------------------------------------------------------------

    async def run_periodic(self, interval_s: float) -> None:
        """Save every `interval_s` until `stop_periodic`; a save in progress finishes first."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval_s)
            except asyncio.TimeoutError:  # the same class as TimeoutError from Python 3.11
                await self.save()

    def stop_periodic(self) -> None:
        self._stop.set()
