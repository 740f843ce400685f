"""Redis as the spill and recovery store of session state, off the per-token path.

A replica saves a session's record (serving.state.records) when it evicts the session, on drain and
shutdown, and every K steps or T seconds (SavePolicy / SaveTracker below); on a lookup miss it
loads the record from Redis and restores the session. Keys are `NAMESPACE:session:ID`, values
the record bytes, and every save sets the TTL to the session idle timeout, so Redis forgets a
session when the server would have expired it.

Redis is optional to serving: when it is down, every call fails fast and raises
StateStoreUnavailableError, which the server treats as "recovery lost, keep serving". The store
trips after a failure: for `retry_after_s` calls fail at once without touching the network,
then one call probes Redis again; the first success closes the circuit (reconnection is
automatic: redis-py opens a new connection for the next command). Warnings are logged at most
once per `warn_interval_s`, with the count of calls that failed meanwhile; every failure is
reported to `events` for a metric.

Why redis.asyncio rather than the synchronous client in an executor: every caller is already on
the server's event loop (a lookup inside a handler, a save after a step or an eviction), so
an awaitable call needs no thread hop per call and no extra threads competing with onnxruntime
for the cores; a cancelled RPC cancels its lookup; periodic saves are plain tasks. The price:
a store belongs to the event loop it is first used on; create it, use it and `close()` it
there. Not thread-safe.

    PersistenceError (serving.state.records)
    └── StateStoreError               Redis refused a command (e.g. out of memory)
        └── StateStoreUnavailableError Redis cannot be reached, timed out, or is marked down
    (load() also raises records.RecordCorruptError for a value that is not a valid record)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract.session_id import is_storable_session_id
from serving.state.records import (
    PersistenceError,
    RecordCorruptError,
    SessionRecord,
    decode_record,
    encode_record,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Outcomes reported to StateStoreEvents.state_store_operation.
OK = "ok"
MISS = "miss"  # load: no record under the key (never saved, expired, or deleted)
CORRUPT = "corrupt"  # load: the value is not a valid record
FAILED = "failed"  # Redis was tried and failed (unreachable, timeout, an error reply)
SKIPPED = "skipped"  # Redis is marked down: failed at once, without I/O


class StateStoreError(PersistenceError):
    """Redis answered a command with an error (out of memory, read-only replica, ...)."""


class StateStoreUnavailableError(StateStoreError):
    """Redis cannot be reached, did not answer in time, or is marked down after a failure."""


class StateStoreEvents(Protocol):
    """What the store reports for metrics (serving.core.observers.ServerObserver has these hooks)."""

    def state_store_operation(self, operation: str, outcome: str, seconds: float) -> None:
        """One call finished: operation "save", "save_many", "load" or "delete"; outcome one of
        "ok", "miss", "corrupt", "failed", "skipped"; seconds it took (0 when skipped)."""

    def state_store_availability(self, available: bool) -> None:
        """True when the store is created and when Redis answers again; False at a failure."""


@dataclass(frozen=True)
class RedisStoreOptions:
    """How to reach Redis and how quickly to give up on it."""

    url: str  # redis://[:password@]host:port/db, rediss:// for TLS, unix:///path.sock
    namespace: str = "rnnserve"  # keys are NAMESPACE:session:ID
    connect_timeout_s: float = 0.25  # opening a connection (includes DNS)
    socket_timeout_s: float = 0.25  # one reply; a slower Redis counts as unavailable
    operation_timeout_s: float = 1.0  # the most one call may take, whatever the sockets do
    retry_after_s: float = 1.0  # after a failure, calls fail at once for this long, then one probes
    warn_interval_s: float = 30.0  # at most one "unavailable" warning per interval
    max_connections: int = 64  # connections to Redis from this process
    save_many_chunk: int = 256  # records per pipeline in save_many

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("a Redis URL is required, e.g. redis://127.0.0.1:6379/0")
        if not self.namespace or any(c in self.namespace for c in " \t\r\n"):
            raise ValueError(
                f"the Redis key namespace must be non-empty without spaces, got {self.namespace!r}"
            )
        for name in ("connect_timeout_s", "socket_timeout_s", "operation_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("retry_after_s", "warn_interval_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_connections < 1 or self.save_many_chunk < 1:
            raise ValueError("max_connections and save_many_chunk must be at least 1")


def redact_url(url: str) -> str:
    """The URL with its password replaced by "***", for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ttl_ms(ttl_s: float) -> int:
    if not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ValueError(f"a session record's TTL must be a finite number of seconds > 0, got {ttl_s}")
    return max(1, math.ceil(ttl_s * 1000.0))


class RedisStateStore:
    """Session records in Redis: save / load / delete by session id, failing fast when Redis is down.

    Every method raises StateStoreUnavailableError when Redis cannot be used now (and
    StateStoreError when it refuses a command); the server logs nothing itself for these (the
    store rate-limits its own warnings) and carries on without recovery for that session.
    """

    def __init__(
        self,
        options: RedisStoreOptions,
        events: StateStoreEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.events = events
        self.clock = clock
        self.label = redact_url(options.url)
        # A blocking pool: a burst of more calls than connections waits for a free connection
        # (within the operation deadline) instead of failing as if Redis were down.
        pool = aioredis.BlockingConnectionPool.from_url(
            options.url,
            max_connections=options.max_connections,
            timeout=options.operation_timeout_s,
            socket_timeout=options.socket_timeout_s,
            socket_connect_timeout=options.connect_timeout_s,
            # One retry, on a broken connection only: a pooled connection whose Redis restarted
            # fails its next command ("Connection closed by server") before Redis sees it, and
            # the retry on a new connection succeeds. No retry after a timeout: it would
            # multiply the time a failing call takes (the circuit below retries Redis once per
            # retry_after_s), and the timed-out command may have run (a SET NX would then
            # report its own write as another session's).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name="rnnserve",
        )
        self._client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
        self._down_since: float | None = None  # clock() of the first failure of this outage
        self._retry_at = 0.0  # while down: no I/O before this clock() value
        self._probing = False  # while down: one call is trying Redis
        self._last_warning = -math.inf
        self._unreported = 0  # failures since the last warning
        self.failures = 0  # calls that failed or were skipped, since creation
        if events is not None:
            events.state_store_availability(True)  # optimistic: the first failing call says otherwise

    @property
    def available(self) -> bool:
        """False from a failure until a call succeeds again."""
        return self._down_since is None

    def key(self, session_id: str) -> str:
        return f"{self.options.namespace}:session:{session_id}"

    async def save(self, record: SessionRecord, ttl_s: float, *, if_absent: bool = False) -> bool:
        """Store the record under its session id, replacing any older one; it expires after ttl_s.

        With `if_absent`, store it only when the id has no record yet (a new session claiming
        its id): False when one exists, and nothing is written. True when stored.
        """
        value = encode_record(record)
        ttl = _ttl_ms(ttl_s)
        key = self.key(record.session_id)
        stored = await self._call("save", lambda: self._client.set(key, value, px=ttl, nx=if_absent))
        return bool(stored)

    async def save_many(self, records: Iterable[SessionRecord], ttl_s: float) -> int:
        """Store many records in pipelines of `save_many_chunk` (drain, shutdown); returns how many.

        On a failure the records of earlier pipelines stay saved; the error says how many.
        """
        ttl = _ttl_ms(ttl_s)
        saved = 0
        for chunk in _chunks(records, self.options.save_many_chunk):
            async with self._client.pipeline(transaction=False) as pipeline:
                for record in chunk:
                    pipeline.set(self.key(record.session_id), encode_record(record), px=ttl)
                try:
                    await self._call("save_many", pipeline.execute)
                except StateStoreError as error:
                    raise type(error)(f"{error} (after saving {saved} sessions)") from error
            saved += len(chunk)
        return saved

    async def load(self, session_id: str) -> SessionRecord | None:
        """The record saved for the session, or None when there is none (never saved, or expired).

        Raises RecordCorruptError when the stored value is not a valid record for this id. An id no
        record can have (see contract.session_id.is_storable_session_id) is a miss without a call to Redis.
        """
        if not is_storable_session_id(session_id):
            self._report("load", MISS, 0.0)
            return None
        key = self.key(session_id)
        started = self.clock()
        value = await self._call("load", lambda: self._client.get(key), report=False)
        elapsed = self.clock() - started
        if value is None:
            self._report("load", MISS, elapsed)
            return None
        try:
            if not isinstance(value, bytes):
                raise RecordCorruptError(f"Redis returned a {type(value).__name__}, not bytes")
            record = decode_record(value)
            if record.session_id != session_id:
                raise RecordCorruptError(f"the record stored under {key} is for session {record.session_id}")
        except RecordCorruptError as error:
            self._report("load", CORRUPT, elapsed)
            raise RecordCorruptError(f"session {session_id} in Redis ({self.label}): {error}") from error
        self._report("load", OK, elapsed)
        return record

    async def delete(self, session_id: str) -> bool:
        """Forget the session's record (it was closed); True when there was one."""
        removed = await self._call("delete", lambda: self._client.delete(self.key(session_id)))
        return bool(removed)

    async def ping(self) -> bool:
        """Whether Redis answers now; never raises. Ignores the circuit, and closes it on success."""
        try:
            await asyncio.wait_for(self._client.ping(), self.options.operation_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError):
            return False
        self._succeeded()
        return True

    async def close(self) -> None:
        """Close the connections (on the event loop the store was used on)."""
        await self._client.aclose()

    # ----- the circuit -------------------------------------------------------------------------

    async def _call(self, operation: str, command: Callable[[], Awaitable[T]], report: bool = True) -> T:
        """Run one Redis command under the circuit and the operation deadline."""
        if not self._admit():
            self._failed(operation, SKIPPED, 0.0, None)
            down_s = self.clock() - (self._down_since if self._down_since is not None else self.clock())
            raise StateStoreUnavailableError(
                f"Redis ({self.label}) has been unavailable for {down_s:.1f} s; session state is not "
                f"saved or recovered until it answers again"
            )
        started = self.clock()
        try:
            result = await asyncio.wait_for(command(), self.options.operation_timeout_s)
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as error:
            self._failed(operation, FAILED, self.clock() - started, error)
            raise StateStoreUnavailableError(
                f"Redis ({self.label}) is unavailable: {_describe(error)}; session state is not saved "
                f"or recovered until it answers again"
            ) from error
        except RedisError as error:
            # An error reply (OOM, READONLY, ...): Redis is reachable, so the circuit closes.
            self._succeeded()
            self.failures += 1
            self._report(operation, FAILED, self.clock() - started)
            raise StateStoreError(f"Redis ({self.label}) refused {operation}: {_describe(error)}") from error
        finally:
            self._probing = False
        self._succeeded()
        if report:
            self._report(operation, OK, self.clock() - started)
        return result

    def _admit(self) -> bool:
        """Whether a call may use the network now: always while up; while down, one probe per interval."""
        if self._down_since is None:
            return True
        if self._probing or self.clock() < self._retry_at:
            return False
        self._probing = True
        return True

    def _failed(self, operation: str, outcome: str, seconds: float, error: BaseException | None) -> None:
        now = self.clock()
        self.failures += 1
        self._unreported += 1
        self._report(operation, outcome, seconds)
        if error is None:
            return  # skipped: the outage is already known
        first = self._down_since is None
        if first:
            self._down_since = now
            if self.events is not None:
                self.events.state_store_availability(False)
        self._retry_at = now + self.options.retry_after_s
        if first or now - self._last_warning >= self.options.warn_interval_s:
            log.warning(
                "Redis state store %s is unavailable (%s: %s); serving continues without session "
                "recovery; %d call(s) failed since the last warning",
                self.label,
                operation,
                _describe(error),
                self._unreported,
            )
            self._last_warning = now
            self._unreported = 0

    def _succeeded(self) -> None:
        if self._down_since is None:
            return
        log.warning(
            "Redis state store %s is available again after %.1f s; session recovery resumes",
            self.label,
            self.clock() - self._down_since,
        )
        self._down_since = None
        self._unreported = 0
        if self.events is not None:
            self.events.state_store_availability(True)

    def _report(self, operation: str, outcome: str, seconds: float) -> None:
        if self.events is not None:
            self.events.state_store_operation(operation, outcome, seconds)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "no answer in time"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _chunks(records: Iterable[SessionRecord], size: int) -> Iterator[list[SessionRecord]]:
    chunk: list[SessionRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----- when to save ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavePolicy:
    """When a session's state is saved besides eviction, drain and shutdown.

    every_steps: save once this many steps ran since the last save (1 = every step; 0 = not by
    count). every_s: save once the oldest unsaved step is this old (0 = not by time); checked at
    each step and by the server's periodic sweep (SaveTracker.overdue). A session with no step
    since its last save is never due.
    """

    every_steps: int = 0
    every_s: float = 0.0

    def __post_init__(self) -> None:
        if type(self.every_steps) is not int or self.every_steps < 0:
            raise ValueError(f"every_steps must be an integer >= 0, got {self.every_steps!r}")
        if not math.isfinite(self.every_s) or self.every_s < 0:
            raise ValueError(f"every_s must be a finite number >= 0, got {self.every_s!r}")

    @property
    def periodic(self) -> bool:
        """Whether any periodic save happens at all."""
        return self.every_steps > 0 or self.every_s > 0

    def due(self, unsaved_steps: int, unsaved_age_s: float) -> bool:
        """Whether a session with `unsaved_steps` steps, the oldest `unsaved_age_s` old, is due."""
        if unsaved_steps <= 0:
            return False
        by_count = self.every_steps > 0 and unsaved_steps >= self.every_steps
        by_time = self.every_s > 0 and unsaved_age_s >= self.every_s
        return by_count or by_time


class SaveTracker:
    """Per-session unsaved steps, for SavePolicy; O(1) per step. Event loop only.

    Holds an entry only for sessions with unsaved steps:
        due = tracker.stepped(session.id)   # after each successful step
        if due: capture the record, tracker.saved(session.id), then save it in the background
        tracker.forget(session.id)          # when the session ends (closed/expired/evicted)
        tracker.overdue()                   # from a periodic sweep: ids due by time
    """

    def __init__(self, policy: SavePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._unsaved: dict[str, list[float]] = {}  # id -> [unsaved steps, clock() of the oldest]

    def __len__(self) -> int:
        return len(self._unsaved)

    def stepped(self, session_id: str) -> bool:
        """Count one step of the session; True when its state should be saved now."""
        if not self.policy.periodic:
            return False
        now = self.clock()
        entry = self._unsaved.get(session_id)
        if entry is None:
            entry = self._unsaved[session_id] = [0, now]
        entry[0] += 1
        return self.policy.due(int(entry[0]), now - entry[1])

    def saved(self, session_id: str) -> None:
        """The session's current state was captured for saving: nothing of it is unsaved now."""
        self._unsaved.pop(session_id, None)

    def forget(self, session_id: str) -> None:
        """The session ended."""
        self._unsaved.pop(session_id, None)

    def overdue(self) -> list[str]:
        """Ids of sessions whose oldest unsaved step is at least every_s old (none if every_s is 0)."""
        if self.policy.every_s <= 0:
            return []
        cutoff = self.clock() - self.policy.every_s
        return [session_id for session_id, (_, oldest) in self._unsaved.items() if oldest <= cutoff]
