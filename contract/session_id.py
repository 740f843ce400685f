"""The session-id format, and the gRPC metadata key that carries it for load balancers.

The server makes every session id as 128 random bits written as 32 lower-case hex characters
(`new_session_id`); a client may propose an id of that form for a session it opens, so that the
opening call is routed like the calls that follow (nginx hashes the `x-session-id` metadata).
Stored session records accept a wider alphabet (`is_storable_session_id`), the characters that
are safe in a file name and a Redis key, so a record never needs escaping.
"""

from __future__ import annotations

import re
import secrets

SESSION_ID_KEY = "x-session-id"  # gRPC metadata keys are lower case
SESSION_ID_BYTES = 16  # 128 random bits: ids stay unguessable

_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_STORABLE_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def new_session_id() -> str:
    """A fresh session id in the server's format: 128 random bits as 32 hex characters."""
    return secrets.token_hex(SESSION_ID_BYTES)


def is_session_id(text: str) -> bool:
    """Whether `text` has the server's own format (32 lower-case hex characters)."""
    return bool(_SESSION_ID.fullmatch(text))


def is_storable_session_id(text: str) -> bool:
    """Whether a session record may carry `text` as its id: 1-128 of A-Z, a-z, 0-9, '_', '.', '-'."""
    return bool(_STORABLE_SESSION_ID.fullmatch(text))


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
