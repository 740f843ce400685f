"""The model-name rule: what `rnnserve export` writes and the server's repository scan accepts.

A model name is 1 to 128 characters of A-Z a-z 0-9 `_` `.` `-`, starting with a letter or a
digit. The bound keeps every name short enough to repeat in an error message or a log line.
"""

from __future__ import annotations

import re

MAX_MODEL_NAME = 128
MODEL_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_MODEL_NAME - 1}}}")
MODEL_NAME_RULE = f"1-{MAX_MODEL_NAME} characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"


def valid_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None
