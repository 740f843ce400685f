"""Session affinity through a load balancer: the `x-session-id` metadata every session call carries.

Behind nginx (deploy/nginx/nginx.conf: `hash $http_x_session_id consistent`) a session's calls
must all reach the replica that holds its state, so each call carries the session id as gRPC
metadata, where nginx can read it (the request body is opaque to it):

- calls on a session (Step, CloseSession, a Generate continuing `session_id`, a Stream that
  resumes one) send the session's id; the server refuses a call whose metadata names another
  session than its body, since nginx routed it by the metadata;
- calls that open a session (CreateSession, a Stream that opens one, a Generate with
  keep_session) may send an id the client made up (`contract.session_id.new_session_id()`):
  the session then gets that id, so the call that opens it is routed exactly like the calls
  that follow. Without
  one, the server makes the id, the opening call lands on a random replica and later calls
  on the replica the id hashes to, which holds the session only if it recovers it from Redis.

The Python client (serving.clients.client) does both by itself. A proposed id must look like the
server's own (32 lower-case hex characters of 128 random bits), so ids stay unguessable, and
must not belong to an open or saved session.
"""

from __future__ import annotations

from collections.abc import Iterable

from contract.session_id import SESSION_ID_KEY, is_session_id
from serving.core.errors import InvalidArgumentError, Reason


def metadata_session_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `x-session-id` value of a call's metadata, or None when it has none."""
    for key, value in metadata or ():
        if key == SESSION_ID_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def proposed_session_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The id a call that opens a session proposes for it (None: the server makes one).

    Raises InvalidArgumentError when the id is not 32 lower-case hex characters.
    """
    proposed = metadata_session_id(metadata)
    if proposed is None:
        return None
    if not is_session_id(proposed):
        shown = proposed if len(proposed) <= 64 else proposed[:64] + "…"
        raise InvalidArgumentError(
            f"{SESSION_ID_KEY} metadata {shown!r} cannot be a new session's id: it must be 32 "
            f"lower-case hex characters (128 random bits), or left out to let the server choose",
            Reason.INVALID_SESSION_ID,
        )
    return proposed


def check_affinity(metadata: Iterable[tuple[str, str | bytes]] | None, session_id: str) -> None:
    """Refuse a call whose `x-session-id` metadata names another session than its body does.

    A load balancer routed the call by the metadata, so a mismatch would reach the wrong replica.
    """
    routed_by = metadata_session_id(metadata)
    if routed_by is not None and routed_by != session_id:
        raise InvalidArgumentError(
            f"{SESSION_ID_KEY} metadata {routed_by[:64]!r} differs from the request's session id "
            f"{session_id[:64]!r}; send the session's own id (load balancers route by the metadata)",
            Reason.SESSION_ID_MISMATCH,
        )
