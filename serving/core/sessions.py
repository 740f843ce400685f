"""Sessions: server-made ids for rows of a model version's state pool, with expiry and a limit.

A session id is 128 random bits from `secrets`, written as 32 hex characters. A session stays on
the model version it was opened on. Sessions unused for `idle_timeout_s` expire (checked on every
lookup and by a periodic sweep); at `max_sessions` a new session either evicts the least
recently used idle session or is refused, as configured. The ids of sessions that expired, were
evicted or were closed are remembered (a bounded number), so a late request for one is told what
happened instead of just "not found".

With authentication each session has an owner, and one rule holds for other identities'
sessions: every answer is exactly the one for an id that never existed. A request on another
identity's open, closed, expired or evicted session is told "not found" in the words used for an
unknown id (nothing says "closed" or "expired" to anyone but the owner). A closed, expired or
evicted id stays reserved for its owner for the idle timeout (while it is remembered): only the
owner may propose it again. A proposed id that is open, or reserved for someone else, gets one
answer whoever holds it (`SessionIdInUseError`): an id names one session at a time, since load
balancers route and Redis stores sessions by id alone.

One session never has two requests in flight: `acquire` / `release` serialise them (a Stream
chunk, a Step and a Generate on the same session take turns). A session in use is never expired
or evicted. All methods run on the event loop thread.

With authentication each session has an owner (the token's identity) and an owner may hold at
most `max_per_owner` sessions. At shutdown the manager is frozen: every later request on any
session is refused with UNAVAILABLE before it changes anything, so the state a snapshot saves
is exactly the state of the steps that were answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from contract.session_id import is_session_id, new_session_id
from serving.core.errors import (
    AlreadyExistsError,
    Reason,
    ResourceExhaustedError,
    SessionNotFoundError,
    UnavailableError,
)
from serving.core.observers import ServerObserver
from serving.core.registry import LoadedModel, ModelRegistry
from serving.core.state_pool import PoolFullError

# How a session ended (the metrics' label) -> what a later request for it is told.
_GONE_REASONS = {
    "closed": Reason.SESSION_CLOSED,
    "expired": Reason.SESSION_EXPIRED,
    "evicted": Reason.SESSION_EVICTED,
}


@dataclass(eq=False, slots=True)
class Session:
    """One sequence's state on one model version."""

    id: str
    model: LoadedModel
    slot: int  # row of the model version's state pool
    owner: str | None  # who created it (auth); None when auth is off
    last_used: float  # monotonic seconds
    position: int = 0  # tokens consumed since open or the last reset
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def busy(self) -> bool:
        return self.lock.locked()


@dataclass(frozen=True, slots=True)
class GoneSession:
    """What is remembered of a session that ended: for its owner's late requests and reservation."""

    owner: str | None
    reason: Reason  # SESSION_CLOSED, SESSION_EXPIRED or SESSION_EVICTED
    message: str  # why it is gone, told to its owner only
    ended_at: float  # monotonic seconds


class SessionIdInUseError(AlreadyExistsError):
    """A proposed id names an open session, or one reserved for another identity: ALREADY_EXISTS
    with reason SESSION_ID_IN_USE, in the same words whoever holds the id."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session id {session_id} is in use; propose a fresh id or let the server choose one",
            Reason.SESSION_ID_IN_USE,
            sessionId=session_id,
        )


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 100_000
    idle_timeout_s: float = 600.0
    overflow: str = "evict"  # or "refuse"
    gone_memory: int = 65_536  # ids of gone sessions remembered for NOT_FOUND messages
    max_per_owner: int = 0  # open sessions one owner may hold; 0 = no limit of its own


class SessionManager:
    """Creates, finds, expires, evicts and closes sessions."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: SessionLimits,
        observer: ServerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.observer = observer or ServerObserver()
        self.clock = clock
        # Least recently used first: lookups move a session to the end.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._gone: OrderedDict[str, GoneSession] = OrderedDict()
        self._owned: dict[str, int] = {}  # owner -> open sessions
        self.frozen = False
        # Called as a session ends (closed, expired, evicted), before its slot is released, so
        # its state rows can still be read (serving.state.recovery saves evicted sessions this way).
        self.ending: Callable[[Session, str], None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        """Open sessions, least recently used first (for snapshots and metrics)."""
        return iter(list(self._sessions.values()))

    def create(self, model: LoadedModel, owner: str | None = None, session_id: str | None = None) -> Session:
        """Open a session in the zero state on `model`. `session_id`: a restored session's id, or
        an id the client proposed (serving.frontend.affinity); None makes a fresh one.

        Raises ResourceExhaustedError at the session limit when nothing can be evicted, and at the
        owner's limit; SessionIdInUseError when `session_id` is open or reserved for another owner.
        """
        if session_id is not None:
            self.check_free(session_id, owner)
        limit = self.limits.max_per_owner
        if owner is not None and limit and self._owned.get(owner, 0) >= limit:
            raise ResourceExhaustedError(
                f"{owner} holds its limit of {limit} open sessions (--max-sessions-per-token); "
                f"close one (CloseSession or CONTROL_END) or let one expire",
                Reason.OWNER_SESSION_LIMIT,
                limit=limit,
            )
        if len(self._sessions) >= self.limits.max_sessions:
            self._make_room()
        try:
            slot = model.engine.acquire_slot()
        except PoolFullError:
            raise ResourceExhaustedError(
                f"{model.label} has no free state slot ({self.limits.max_sessions} sessions)",
                Reason.SESSION_LIMIT,
                model=model.name,
                limit=self.limits.max_sessions,
            ) from None
        new_id = session_id or new_session_id()
        session = Session(new_id, model, slot, owner, self.clock())
        self._sessions[new_id] = session
        self._gone.pop(new_id, None)
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + 1
        self.registry.session_started(model)
        self.observer.session_opened(model.name, model.version)
        return session

    def check_free(self, session_id: str, owner: str | None) -> None:
        """Raise SessionIdInUseError unless `owner` may open a session under `session_id`: it is not
        open, and not the id of another owner's session that ended less than the idle timeout ago.
        """
        gone = self._gone.get(session_id)
        if session_id in self._sessions or (
            gone is not None
            and gone.owner != owner
            and self.clock() - gone.ended_at < self.limits.idle_timeout_s
        ):
            raise SessionIdInUseError(session_id)

    def _make_room(self) -> None:
        limit = self.limits.max_sessions
        if self.limits.overflow == "refuse":
            raise ResourceExhaustedError(
                f"the server holds its limit of {limit} sessions; close a session or retry later",
                Reason.SESSION_LIMIT,
                limit=limit,
            )
        for session in self._sessions.values():
            if not session.busy:
                self._end(
                    session,
                    "evicted",
                    f"session {session.id} was evicted (least recently used) when the server "
                    f"reached its limit of {limit} sessions; open a new session",
                )
                return
        raise ResourceExhaustedError(
            f"the server holds its limit of {limit} sessions and all are in use",
            Reason.SESSION_LIMIT,
            limit=limit,
        )

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The open session with this id (and owner); raises SessionNotFoundError saying why not."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise self._why_missing(session_id, owner)
        now = self.clock()
        if not session.busy and now - session.last_used > self.limits.idle_timeout_s:
            self._expire(session)
            raise self._why_missing(session_id, owner)
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def _unknown(self, session_id: str) -> SessionNotFoundError:
        shown = session_id if len(session_id) <= 64 else session_id[:64] + "…"
        if not is_session_id(session_id):
            return SessionNotFoundError(
                f"session {shown!r} not found: session ids are 32 lower-case hex characters, "
                f"as returned by CreateSession, a Stream's open or Generate"
            )
        return SessionNotFoundError(f"session {shown!r} not found", sessionId=session_id)

    def _why_missing(self, session_id: str, owner: str | None) -> SessionNotFoundError:
        """Why `owner` finds no session under this id: how it ended (with that reason) if it was
        the owner's, else the answer for an id that never existed."""
        gone = self._gone.get(session_id)
        if gone is not None and gone.owner == owner:
            return SessionNotFoundError(gone.message, gone.reason, sessionId=session_id)
        return self._unknown(session_id)

    async def acquire(self, session: Session) -> None:
        """Wait until no other request uses the session, then hold it. Raises SessionNotFoundError
        if the session was closed meanwhile, UnavailableError once the manager is frozen."""
        await session.lock.acquire()
        if session.closed:
            session.lock.release()
            raise self._why_missing(session.id, session.owner)
        if self.frozen:
            session.lock.release()
            raise UnavailableError(
                f"the server is shutting down; session {session.id} keeps its state as of its last "
                f"answered request (resume it after the restart when the server saves sessions)"
            )

    def freeze(self) -> None:
        """Refuse every later request on any session (shutdown); requests in flight finish."""
        self.frozen = True

    @property
    def busy(self) -> int:
        """Sessions with a request in flight."""
        return sum(1 for session in self._sessions.values() if session.busy)

    async def hold(self, session: Session, timeout: float) -> bool:
        """Hold an open session for a snapshot, waiting at most `timeout` s for its request in
        flight; frozen or not. False when it closed or stayed busy. Let go with `unhold`."""
        if not session.lock.locked():
            await session.lock.acquire()  # at once (or after a request already handed the lock)
        elif timeout <= 0:
            return False
        else:
            try:
                await asyncio.wait_for(session.lock.acquire(), timeout)
            except asyncio.TimeoutError:  # the same class as TimeoutError from Python 3.11
                return False
        if session.closed:
            session.lock.release()
            return False
        return True

    def unhold(self, session: Session) -> None:
        session.lock.release()

    def release(self, session: Session) -> None:
        session.last_used = self.clock()
        if not session.closed:
            self._sessions.move_to_end(session.id)
        session.lock.release()

    def close(self, session: Session) -> None:
        """End a session now (CloseSession, CONTROL_END, an ephemeral Generate's end)."""
        self._end(session, "closed", f"session {session.id} was closed")

    def withdraw(self, session: Session) -> None:
        """End a session whose opening failed (no caller learned of it): closed, and its id is
        not remembered, so it is neither explained nor reserved afterwards."""
        self._end(session, "closed", "", remember=False)

    def expire_idle(self) -> int:
        """Expire every idle session past the timeout; returns how many expired."""
        cutoff = self.clock() - self.limits.idle_timeout_s
        expired = []
        for session in self._sessions.values():  # least recently used first
            if session.last_used >= cutoff:
                break
            if not session.busy:
                expired.append(session)
        for session in expired:
            self._expire(session)
        return len(expired)

    def _expire(self, session: Session) -> None:
        self._end(
            session,
            "expired",
            f"session {session.id} expired after {self.limits.idle_timeout_s:g} s without "
            f"requests; open a new session",
        )

    def _end(self, session: Session, reason: str, message: str, remember: bool = True) -> None:
        if session.closed:
            return
        session.closed = True
        del self._sessions[session.id]
        if remember and self.limits.gone_memory > 0:
            self._gone[session.id] = GoneSession(session.owner, _GONE_REASONS[reason], message, self.clock())
            while len(self._gone) > self.limits.gone_memory:
                self._gone.popitem(last=False)
        if session.owner is not None:
            left = self._owned[session.owner] - 1
            if left:
                self._owned[session.owner] = left
            else:
                del self._owned[session.owner]
        if self.ending is not None:
            self.ending(session, reason)
        session.model.engine.release_slot(session.slot)
        self.registry.session_ended(session.model)
        self.observer.session_ended(session.model.name, session.model.version, reason)
