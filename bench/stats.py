"""Measurement records of the benchmark: latency percentiles and closed-loop load points.

Every figure the bench reports is one of these, so the table, the JSON and the targets read the
same numbers. Times are recorded as integer nanoseconds (time.perf_counter_ns) and reported in
microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of a set of latency samples, in microseconds."""

    count: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int] | np.ndarray) -> LatencyStats:
        if len(samples_ns) == 0:
            raise ValueError("no latency samples: the measurement window saw no completed request")
        samples_us = np.asarray(samples_ns, dtype=np.float64) / 1e3
        p50, p99 = np.percentile(samples_us, [50, 99])
        return cls(
            count=len(samples_us),
            p50_us=float(p50),
            p99_us=float(p99),
            mean_us=float(samples_us.mean()),
            max_us=float(samples_us.max()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadPoint:
    """One closed-loop measurement: `streams` clients, each with one request in flight.

    Counts cover the measurement window only (after warm-up): requests whose reply arrived
    inside it. For one-token messages, tokens equal messages.
    """

    streams: int  # concurrent clients (streams, generations or unary callers)
    seconds: float  # length of the measurement window
    messages: int  # replies received in the window
    tokens: int  # tokens those replies accounted for (sent for Stream, generated for Generate)
    latency: LatencyStats  # per reply (per message, per prompt, or between generated messages)

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "seconds": self.seconds,
            "messages": self.messages,
            "tokens": self.tokens,
            "messages_per_s": self.messages_per_s,
            "tokens_per_s": self.tokens_per_s,
            **self.latency.to_dict(),
        }
