"""File hashing shared by checkpoints (weights) and the model repository (model.onnx)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK_SIZE = 1 << 20  # read 1 MiB at a time: model files can be larger than memory allows twice


def sha256_file(path: Path) -> str:
    """The SHA-256 of the file at `path`, as 64 lower-case hex characters. Raises OSError."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()
