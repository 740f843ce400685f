"""Session recovery across replicas: session state spilled to Redis, and restored on a miss.

With `--redis-url`, a replica keeps a copy of each session's state (a serving.state.records.SessionRecord)
in Redis, so another replica can take the session over when this one dies or the load
balancer moves it. Redis is off the per-token path unless the policy says every step:

- a new session is recorded at once (SET NX: an id proposed by the client that another session
  already holds is refused, see serving.frontend.affinity);
- after a request, a session's state is saved when the save policy says so: every K steps
  (`--state-save-every-steps`) or once its oldest unsaved step is T seconds old
  (`--state-save-every-s`, checked after each request and by a periodic sweep). With K = 1 the
  request is answered only after its save, so a replica's death loses no answered step; with
  K > 1 or T, saves run in the background and a death loses the steps since the last save;
- an evicted session is saved on its way out (its rows are read before its slot is reused);
- at shutdown every session is saved, after the last answered request;
- a closed session's record is deleted; an expired one is left to Redis, whose TTL (the
  session idle timeout, from each save) forgets it.

On a miss (an id this replica does not hold, on Step, a Stream resume, a Generate continuing a
session or CloseSession), the replica looks the id up in Redis and restores the session when
the record's owner is the caller, it has not been idle past the timeout, and its model version
is loaded here with the same model.onnx sha256; otherwise the call answers NOT_FOUND, saying why.
Concurrent misses on one id share one restore. Every Redis operation on one session runs after
the previous one has finished, so a save never lands after a later save or after a delete.
Saves of many sessions at once share a pipeline (a group commit): 64 streams saving every step
cost about one round trip per batch of steps, not 64.

If Redis is down, serving goes on: saves and lookups fail fast (the store's circuit breaker,
with rate-limited warnings and the state_store_* metrics) and only recovery is lost.

What this does not solve: a replica that still holds a session which moved elsewhere (nginx's
ring changed while both replicas lived, e.g. a replica was added) keeps its stale copy until it
expires, and serves it if the ring moves the session back.

Threads: everything runs on the server's event loop. Rows of an idle session in a host (numpy)
pool are read and written on the loop: the state pool's contract is that only the worker
touches a slot while its session has a step in flight, and a held session has none. Device
pools are read and written on the model's worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from serving.core.errors import Reason, SessionNotFoundError, UnavailableError
from serving.core.observers import ServerObserver
from serving.core.registry import LoadedModel
from serving.core.sessions import Session, SessionIdInUseError, SessionManager
from serving.core.state_pool import SavedRows
from serving.settings import ServerSettings
from serving.state.capture import (
    capture_held,
    host_pool,
    on_worker,
    restored_rows,
    session_record,
    write_rows,
)
from serving.state.records import RecordError, RecordMismatchError, SessionRecord
from serving.state.redis_store import (
    RedisStateStore,
    RedisStoreOptions,
    SavePolicy,
    SaveTracker,
    StateStoreError,
    StateStoreUnavailableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SOURCE = "redis"  # the `source` of observer.session_restored
BUSY_WAIT_S = 1.0  # a background save waits this long for the session's next request to end
ERROR_LOG_INTERVAL_S = 30.0  # Redis refusing commands (not unreachable) is logged this often
STOP_WAIT_S = 5.0  # at shutdown, how long saves still in flight may take


class _RateLimitedLog:
    """One warning per interval, with the count of occurrences since the last one."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -math.inf
        self._count = 0

    def warning(self, message: str, *args: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            log.warning(message + " (%d time(s) since the last such warning)", *args, self._count)
            self._last = now
            self._count = 0


class _GroupCommit:
    """Saves to Redis, many sessions' records per round trip.

    A saved record waits in a queue; one flusher writes the queue in pipelines (save_many), and
    what queues up while a pipeline is in flight goes in the next. Sessions saving at once (64
    streams saving every step) then cost about one round trip and one connection, not 64 of
    each; a lone save still goes out at once. Records are written in the order they were
    queued, so a session's later state is never overwritten by an earlier one.
    """

    def __init__(
        self, store: RedisStateStore, ttl_s: float, failed: Callable[[StateStoreError], None]
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.failed = failed
        self.chunk = store.options.save_many_chunk
        self._waiting: list[tuple[SessionRecord, asyncio.Future[bool | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def save(self, record: SessionRecord) -> asyncio.Future[bool | None]:
        """Queue the record; the future says True once stored, None when Redis failed."""
        loop = asyncio.get_running_loop()
        saved: asyncio.Future[bool | None] = loop.create_future()
        self._waiting.append((record, saved))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name="rnnserve-state-group-commit")
        return saved

    def flushing(self) -> list[asyncio.Task[None]]:
        return [] if self._flusher is None else [self._flusher]

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.chunk], self._waiting[self.chunk :]
                outcome: bool | None = True
                try:
                    await self.store.save_many([record for record, _ in batch], self.ttl_s)
                except StateStoreError as error:
                    self.failed(error)
                    outcome = None
                for _, saved in batch:
                    if not saved.done():
                        saved.set_result(outcome)
        finally:
            self._flusher = None


class SessionRecovery:
    """Saves the sessions of one runtime to Redis and restores them from it (see the module doc).

    Create it on the server's event loop. The runtime calls `opened`, `stepped` and `restore`,
    the session manager `session_ending`; the server calls `start`, `save_all` (at shutdown,
    after the last request) and `close`.
    """

    def __init__(
        self,
        sessions: SessionManager,
        store: RedisStateStore,
        policy: SavePolicy,
        ttl_s: float,
        observer: ServerObserver,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.policy = policy
        self.ttl_s = ttl_s  # the session idle timeout
        self.observer = observer
        self.wall_clock = wall_clock
        self.tracker = SaveTracker(policy)
        # Saving every step means "no answered step is lost": the answer waits for the save.
        self.awaits_saves = policy.every_steps == 1
        self._unsaved: dict[str, Session] = {}  # with every_s: sessions with unsaved steps
        self._recorded: set[str] = set()  # open sessions that may have a record in Redis
        self._foreign: set[str] = set()  # sessions refused because Redis holds another of their id
        self._ops: dict[str, asyncio.Task[Any]] = {}  # each session's last Redis operation
        self._restoring: dict[str, asyncio.Future[Session]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._refusals = _RateLimitedLog(ERROR_LOG_INTERVAL_S)
        self._group_commit = _GroupCommit(store, ttl_s, self._store_failed)

    # ----- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Say whether Redis answers (serving starts either way), and start the sweep that saves
        sessions due by time (with --state-save-every-s)."""
        if await self.store.ping():
            log.info("session state is kept in Redis %s: %s", self.store.label, self.describe_policy())
        else:
            log.warning(
                "Redis %s does not answer; sessions are served without recovery until it does",
                self.store.label,
            )
        if self.policy.every_s > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="rnnserve-state-saves")

    def describe_policy(self) -> str:
        """When sessions are saved, in words, for the start-up log."""
        when = ["when opened, evicted and at shutdown"]
        if self.policy.every_steps == 1:
            when.append("after every request, before its answer")
        elif self.policy.every_steps > 1:
            when.append(f"every {self.policy.every_steps} requests")
        if self.policy.every_s > 0:
            when.append(f"at most {self.policy.every_s:g} s after a request")
        return "saved " + ", ".join(when) + f"; kept {self.ttl_s:g} s"

    async def save_all(self) -> int:
        """Save every open session (shutdown: the sessions are frozen and idle); returns how many."""
        await self._stop_sweeper()
        await self._settle()
        records = await self._capture_many([session for session in self.sessions if not session.closed])
        if not records:
            return 0
        if not self.store.available:
            await self.store.ping()  # it may be back: the last chance to hand these sessions over
        try:
            saved = await self.store.save_many(records, self.ttl_s)
        except StateStoreError as error:
            log.error("sessions not saved to Redis at shutdown: %s", error)
            return 0
        log.info("saved %d sessions to Redis (%s) at shutdown", saved, self.store.label)
        return saved

    async def close(self) -> None:
        """Let Redis operations in flight finish (briefly), then close the connections."""
        await self._stop_sweeper()
        await self._settle()
        await self.store.close()

    async def _stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _settle(self) -> None:
        pending = [*self._ops.values(), *self._group_commit.flushing()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=STOP_WAIT_S)
            if late:
                log.warning("%d Redis operations still running at shutdown are abandoned", len(late))

    # ----- hooks ----------------------------------------------------------------------------------

    async def opened(self, session: Session) -> None:
        """Record a new session (in the zero state), claiming its id in Redis.

        Raises SessionIdInUseError (ALREADY_EXISTS), after withdrawing the session here, when Redis
        holds a record under its id: a client proposed the id of another session. While Redis is
        down the session serves on, recoverable from its first save.
        """
        record = session_record(session.model, session, self.wall_clock())
        self._recorded.add(session.id)
        claimed = await self._enqueue(session.id, functools.partial(self._save_record, record, True))
        if claimed is False:
            self._foreign.add(session.id)
            self.sessions.withdraw(session)
            raise SessionIdInUseError(session.id)

    def stepped(self, session: Session) -> Awaitable[Any] | None:
        """A request on the session succeeded and released it. Returns the save to await before
        answering when the policy saves every step; other saves due run in the background."""
        if session.closed:
            return None
        if not self.tracker.stepped(session.id):
            if self.policy.every_s > 0:
                self._unsaved[session.id] = session
            return None
        save = self._enqueue(session.id, functools.partial(self._save_current, session))
        return save if self.awaits_saves else None

    def session_ending(self, session: Session, reason: str) -> None:
        """Called by the session manager as a session ends ("closed", "expired", "evicted"),
        before its slot is released."""
        self.tracker.forget(session.id)
        self._unsaved.pop(session.id, None)
        recorded = session.id in self._recorded
        self._recorded.discard(session.id)
        if session.id in self._foreign:
            self._foreign.discard(session.id)  # the record under its id is another session's
        elif reason == "closed" and recorded:
            self._enqueue(session.id, functools.partial(self._delete, session.id))
        elif reason == "evicted":
            # Its rows are read now, before its slot goes to the session that evicted it.
            record = self._capture_leaving(session)
            self._enqueue(session.id, functools.partial(self._save_record, record))
        # "expired": Redis forgets the record by its TTL. Deleting it here could remove the
        # record of a replica that took the session over meanwhile.

    async def restore(self, session_id: str, owner: str | None, missing: SessionNotFoundError) -> Session:
        """The session restored from Redis; raises `missing`, or a SessionNotFoundError saying
        why, when it cannot be. Concurrent calls for one id share one restore."""
        pending = self._restoring.get(session_id)
        if pending is not None:
            session = await asyncio.shield(pending)
            if session.owner != owner:
                raise missing
            return session
        pending = asyncio.get_running_loop().create_future()
        self._restoring[session_id] = pending
        try:
            session = await self._restore(session_id, owner, missing)
        except asyncio.CancelledError:
            pending.cancel()  # the waiters, if any, are cancelled with it
            raise
        except Exception as error:
            pending.set_exception(error)
            pending.exception()  # marked as retrieved: the waiters, if any, raise it themselves
            raise
        finally:
            del self._restoring[session_id]
        pending.set_result(session)
        return session

    # ----- restore ------------------------------------------------------------------------------

    async def _restore(self, session_id: str, owner: str | None, missing: SessionNotFoundError) -> Session:
        await self._after_pending(session_id)  # a spill or a delete of this id still in flight
        try:
            record = await self.store.load(session_id)
        except StateStoreError as error:
            raise SessionNotFoundError(
                f"{missing}; sessions saved by other replicas cannot be looked up now ({error})",
                missing.reason,
                **missing.metadata,
            ) from None
        except RecordError as error:
            self._refusals.warning("session %s cannot be restored: %s", session_id, error)
            raise missing from None
        if record is None or record.owner != owner:
            raise missing
        if self.wall_clock() - record.last_used > self.ttl_s:
            raise SessionNotFoundError(
                f"session {session_id} expired after {self.ttl_s:g} s without requests; open a new session",
                Reason.SESSION_EXPIRED,
                sessionId=session_id,
            )
        model = self._model_for(record)
        if self.sessions.frozen:
            raise UnavailableError(
                f"the server is shutting down; session {session_id} is saved and resumes on another replica"
            )
        try:
            session = self.sessions.create(model, owner, session_id=session_id)
        except SessionIdInUseError:
            # Opened here meanwhile, by a client proposing this id for a new session.
            return self.sessions.get(session_id, owner)
        # Held from here (at once: nobody else can have it yet) until its rows are written, so
        # no request runs on the zero state a new slot starts in.
        await self.sessions.hold(session, 0)
        self._recorded.add(session_id)
        try:
            await self._write_rows(model, session, record)
        except BaseException:
            self.sessions.unhold(session)
            self.sessions.close(session)
            raise
        session.position = record.position
        self.sessions.unhold(session)
        self.observer.session_restored(model.name, model.version, SOURCE)
        log.debug("restored session %s on %s at position %d", session_id, model.label, record.position)
        return session

    def _model_for(self, record: SessionRecord) -> LoadedModel:
        """The loaded version the record was saved on; NOT_FOUND when it is not served here."""
        registry = self.sessions.registry
        model = registry.get(record.model, record.version)
        if model is None:
            served = ", ".join(str(m.version) for m in registry.versions(record.model)) or "none"
            raise SessionNotFoundError(
                f"session {record.session_id} was saved on model {record.model!r} version "
                f"{record.version}, which this replica does not serve (its versions of "
                f"{record.model!r}: {served}); open a new session",
                Reason.SESSION_NOT_RESTORABLE,
                sessionId=record.session_id,
                model=record.model,
                version=record.version,
            )
        manifest = model.manifest
        try:
            record.check_fits(manifest)
        except RecordMismatchError as error:
            raise SessionNotFoundError(
                f"{error}; open a new session", Reason.SESSION_NOT_RESTORABLE, sessionId=record.session_id
            ) from None
        return model

    async def _write_rows(self, model: LoadedModel, session: Session, record: SessionRecord) -> None:
        await write_rows(model, restored_rows(model, [(session, record)]))

    # ----- capture and save ----------------------------------------------------------------------

    def _wall_time(self, session: Session) -> float:
        """The session's last use as wall-clock time (sessions keep monotonic time)."""
        return self.wall_clock() - (self.sessions.clock() - session.last_used)

    async def _save_current(self, session: Session) -> bool | None:
        """Save the session's state as of now, between two of its requests."""
        if session.closed or not await self.sessions.hold(session, BUSY_WAIT_S):
            return None  # closed, or busy for long: its next request counts and saves it
        try:
            self.tracker.saved(session.id)
            self._unsaved.pop(session.id, None)
            (record,) = await self._capture_held(session.model, [session])
        finally:
            self.sessions.unhold(session)
        return await self._save_record(record)

    async def _capture_held(self, model: LoadedModel, group: Sequence[Session]) -> list[SessionRecord]:
        """Records of held sessions of one model."""
        return await capture_held(model, group, self._wall_time)

    async def _capture_many(self, sessions: Iterable[Session]) -> list[SessionRecord]:
        held: list[Session] = []
        for session in sessions:
            if await self.sessions.hold(session, 0):
                held.append(session)
        try:
            by_model: dict[LoadedModel, list[Session]] = {}
            for session in held:
                by_model.setdefault(session.model, []).append(session)
            records: list[SessionRecord] = []
            for model, group in by_model.items():
                records.extend(await self._capture_held(model, group))
        finally:
            for session in held:
                self.sessions.unhold(session)
        return records

    def _capture_leaving(self, session: Session) -> asyncio.Future[SessionRecord]:
        """The record of a session whose slot is about to be released (eviction).

        Host pool: read now. Device pool: the last logits now (they live in host memory, and the
        slot's next session resets them), the state rows by a worker task queued now, so that it
        runs before any step of the slot's next session.
        """
        model = session.model
        last_used = self._wall_time(session)
        slots = np.array([session.slot], np.int64)
        record: asyncio.Future[SessionRecord] = asyncio.get_running_loop().create_future()
        if host_pool(model):
            rows = model.engine.read_rows(slots)
            states = [state[0] for state in rows.states]
            record.set_result(session_record(model, session, last_used, states, rows.logits[0]))
            return record
        logits = model.engine.last_logits(session.slot).copy()
        read = on_worker(model.batcher, functools.partial(model.engine.read_rows, slots))

        def finish(done: asyncio.Future[SavedRows]) -> None:
            error = None if done.cancelled() else done.exception()
            if done.cancelled():
                record.cancel()
            elif error is not None:
                record.set_exception(error)
            else:
                states = [state[0] for state in done.result().states]
                record.set_result(session_record(model, session, last_used, states, logits))

        read.add_done_callback(finish)
        return record

    async def _save_record(
        self, record: SessionRecord | Awaitable[SessionRecord], if_absent: bool = False
    ) -> bool | None:
        """Save; True when stored, False when `if_absent` found a record, None when Redis failed.

        Plain saves go through the group commit; a claim (`if_absent`, a new session) is one
        SET NX of its own.
        """
        if not isinstance(record, SessionRecord):
            record = await record
        if not if_absent:
            return await self._group_commit.save(record)
        try:
            return await self.store.save(record, self.ttl_s, if_absent=True)
        except StateStoreError as error:
            self._store_failed(error)
            return None

    async def _delete(self, session_id: str) -> None:
        try:
            await self.store.delete(session_id)
        except StateStoreError as error:
            self._store_failed(error)

    def _store_failed(self, error: StateStoreError) -> None:
        """Redis unreachable: the store logs that itself, rate-limited. A refused command (out
        of memory, a read-only replica) is logged here, rate-limited too."""
        if not isinstance(error, StateStoreUnavailableError):
            self._refusals.warning("session state not saved to Redis: %s", error)

    # ----- one operation at a time per session ---------------------------------------------------

    def _enqueue(self, session_id: str, operation: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """Run `operation` once the session's previous Redis operation has finished."""
        previous = self._ops.get(session_id)

        async def run() -> T:
            if previous is not None:
                await asyncio.wait([previous])
            return await operation()

        task = asyncio.get_running_loop().create_task(run(), name=f"rnnserve-state-{session_id[:8]}")
        self._ops[session_id] = task

        def forget(done: asyncio.Task[T]) -> None:
            if self._ops.get(session_id) is done:
                del self._ops[session_id]
            if not done.cancelled() and done.exception() is not None:
                log.error("a Redis operation on session %s failed", session_id, exc_info=done.exception())

        task.add_done_callback(forget)
        return task

    async def flushed(self, session_id: str) -> None:
        """Wait until the session's Redis operations so far have finished (e.g. a closed
        session's delete, so CloseSession answers once Redis has forgotten it)."""
        await self._after_pending(session_id)

    async def _after_pending(self, session_id: str) -> None:
        previous = self._ops.get(session_id)
        if previous is not None:
            await asyncio.wait([previous])

    # ----- saves due by time ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        interval = min(max(self.policy.every_s / 2, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            for session_id in self.tracker.overdue():
                session = self._unsaved.pop(session_id, None)
                if session is not None and not session.closed:
                    self._enqueue(session_id, functools.partial(self._save_current, session))


def recovery_for(
    settings: ServerSettings, sessions: SessionManager, observer: ServerObserver
) -> SessionRecovery | None:
    """The recovery `--redis-url` asks for (None without one), hooked into `sessions`.

    Call on the server's event loop: the Redis client belongs to it.
    """
    if not settings.redis_url:
        return None
    timeout = settings.redis_timeout_s
    options = RedisStoreOptions(
        url=settings.redis_url,
        namespace=settings.redis_namespace,
        connect_timeout_s=timeout,
        socket_timeout_s=timeout,
        operation_timeout_s=4 * timeout,  # a call waiting for a pooled connection, then its reply
    )
    store = RedisStateStore(options, observer)
    policy = SavePolicy(settings.state_save_every_steps, settings.state_save_every_s)
    recovery = SessionRecovery(sessions, store, policy, settings.session_idle_timeout_s, observer)
    sessions.ending = recovery.session_ending
    return recovery
