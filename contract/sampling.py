"""Sampling options as a request carries them, before the server validates them against a model.

The Python client builds them and the server reads them from the wire into the same type; None
leaves a field unset (the server's defaults: temperature 1, top_p 1; top_k 0 means no limit).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """temperature (0 is greedy), top_k (0: no limit), top_p (nucleus mass), seed (replayable draws)."""

    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
