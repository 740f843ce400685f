"""Model names, and how text a client sent is echoed in an error message or a log line.

A model name is 1 to 128 characters of A-Z a-z 0-9 `_` `.` `-`, starting with a letter or a
digit (the form `rnnserve export` writes and the repository scan accepts). A request may carry any
string as a model name; the server answers NOT_FOUND for every name it does not serve, whatever
its length, and echoes at most ECHO_CHARACTERS of it. Unbounded echoes were a real failure: a
100 KB name copied into the status message made the answer's metadata too large for gRPC, and
the client saw RESOURCE_EXHAUSTED instead of NOT_FOUND.
"""

from __future__ import annotations

import re

MAX_MODEL_NAME = 128
MODEL_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_MODEL_NAME - 1}}}")
MODEL_NAME_RULE = f"1-{MAX_MODEL_NAME} characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
ECHO_CHARACTERS = 64  # most characters of a client's text that an error message repeats


def valid_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def shown(text: str, limit: int = ECHO_CHARACTERS) -> str:
    """`text` quoted for a message: repr of at most `limit` characters, with its length when cut."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
