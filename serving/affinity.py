"""Session affinity through a load balancer: the `x-session-id` metadata every session call carries.

Behind nginx (deploy/nginx/nginx.conf: `hash $http_x_session_id consistent`) a session's calls
must all reach the replica that holds its state, so each call carries the session id as gRPC
metadata, where nginx can read it (the request body is opaque to it):

- calls on a session (Step, CloseSession, a Generate continuing `session_id`, a Stream that
  resumes one) send the session's id; the server refuses a call whose metadata names another
  session than its body, since nginx routed it by the metadata;
- calls that open a session (CreateSession, a Stream that opens one, a Generate with
  keep_session) may send an id the client made up (`new_session_id()`): the session then gets
  that id, so the call that opens it is routed exactly like the calls that follow. Without
  one, the server makes the id, the opening call lands on a random replica and later calls
  on the replica the id hashes to, which holds the session only if it recovers it from Redis.

The Python client (serving.client) does both by itself. A proposed id must look like the
server's own (32 lower-case hex characters of 128 random bits), so ids stay unguessable, and
must not belong to an open or saved session.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from serving.errors import InvalidArgumentError, Reason

SESSION_ID_KEY = "x-session-id"  # gRPC metadata keys are lower case
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A fresh session id in the server's format: 128 random bits as 32 hex characters."""
    return secrets.token_hex(16)


def routable(session_id: str) -> bool:
    """Whether the id can travel as metadata: 1-128 printable ASCII characters, no outer spaces.

    Anything else is no id the server made or accepted (it answers NOT_FOUND), and gRPC refuses
    to send control characters or non-ASCII text in a header at all.
    """
    return (
        0 < len(session_id) <= 128
        and session_id.isascii()
        and session_id.isprintable()
        and session_id.strip() == session_id
    )


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
    if not _SESSION_ID.fullmatch(proposed):
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
