"""What verification found: criteria per precision, failures, and the report config.json records.

Torch- and onnxruntime-free, so `rnnserve export --help` and readers of config.json need neither.

Tolerances, per precision (a tensor passes when max|ort - torch| <= atol + rtol * max|torch|):

    fp32  atol 1e-4             greedy: all 200 tokens identical
    int8  atol 0.1, rtol 0.05   greedy: top-1 agrees on >= 90 % of the 200 steps, and the mean
                                KL(fp32 || int8) of the next-token distributions <= 0.01 nats
    fp16  atol 0.05, rtol 0.005 greedy: as int8

Measured for calibration (char-level Shakespeare models trained with `--preset default` for
~2 minutes, peak |logit| ~10): int8 max errors 0.17 on logits, 0.04 on h, 0.06 on c (LSTM) and
0.06 on logits and h (GRU); greedy 200/200 agree, mean KL 2e-5, validation loss +0.0007 (LSTM)
and +0.00002 (GRU) nats/token. fp16 (verified on CPU): 0.004 and 0.002 on logits. The reduced-
precision tolerances catch broken graphs (wrong gates, lost state, ignored lengths give errors of
order 1) while the greedy and KL criteria judge what a user sees; when validation data is
available the loss may rise by at most 0.05 nats/token (fp32: 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Tolerance:
    """A tensor passes when max|actual - expected| <= atol + rtol * max|expected|."""

    atol: float
    rtol: float = 0.0

    def bound(self, expected: np.ndarray) -> float:
        peak = float(np.abs(expected).max()) if expected.size else 0.0
        return self.atol + self.rtol * peak


@dataclass(frozen=True)
class Criteria:
    """What a precision must meet to be published."""

    values: Tolerance  # every compared tensor (vs PyTorch, and ORT vs itself)
    greedy_identical: bool  # all greedy tokens identical to PyTorch's
    min_greedy_agreement: float  # else: fraction of steps whose top-1 matches PyTorch's
    max_mean_kl: float | None  # else: mean KL(p_torch || p_onnx) per step, nats
    max_val_loss_increase: float  # validation loss minus fp32's, nats/token


CRITERIA = {
    "fp32": Criteria(Tolerance(1e-4), True, 1.0, None, 1e-4),
    "int8": Criteria(Tolerance(0.1, 0.05), False, 0.9, 0.01, 0.05),
    "fp16": Criteria(Tolerance(0.05, 0.005), False, 0.9, 0.01, 0.05),
}


@dataclass(frozen=True)
class Failure:
    check: str  # e.g. "ragged", "structure", "full/seq=7/batch=3"
    tensor: str  # e.g. "hn", "logits", "graph", "(run)"
    message: str  # what differed, with the numbers

    def __str__(self) -> str:
        return f"[{self.check}] {self.tensor}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "tensor": self.tensor, "message": self.message}


@dataclass
class CheckResult:
    name: str
    passed: bool = True
    max_abs_error: dict[str, float] = field(default_factory=dict)  # tensor -> error


@dataclass
class VerificationReport:
    """Everything verification found; `to_dict()` is what config.json records."""

    precision: str
    criteria: Criteria
    provider: str = ""  # the onnxruntime execution provider the runs used
    onnxruntime: str = ""  # its version
    checks: list[CheckResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    greedy: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_error(self) -> float:
        """The largest error over every compared tensor (0.0 when nothing was compared)."""
        return max((e for c in self.checks for e in c.max_abs_error.values()), default=0.0)

    def max_abs_error_by_tensor(self) -> dict[str, float]:
        worst: dict[str, float] = {}
        for check in self.checks:
            for tensor, error in check.max_abs_error.items():
                worst[tensor] = max(worst.get(tensor, 0.0), error)
        return worst

    def add_check(self, name: str) -> CheckResult:
        result = CheckResult(name)
        self.checks.append(result)
        return result

    def fail(self, check: CheckResult, tensor: str, message: str) -> None:
        check.passed = False
        self.failures.append(Failure(check.name, tensor, message))

    def failed_checks(self) -> list[str]:
        return sorted({f.check for f in self.failures})

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "provider": self.provider,
            "onnxruntime": self.onnxruntime,
            "tolerance": {"atol": self.criteria.values.atol, "rtol": self.criteria.values.rtol},
            "max_abs_error": self.max_abs_error,
            "max_abs_error_by_tensor": self.max_abs_error_by_tensor(),
            "checks": {c.name: {"passed": c.passed, "max_abs_error": c.max_abs_error} for c in self.checks},
            "greedy": self.greedy,
            "validation": self.validation,
            "failures": [f.to_dict() for f in self.failures],
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """Human-readable lines for the command line."""
        lines = [f"{'check':<24} {'result':<6} max abs error"]
        for check in self.checks:
            errors = ", ".join(f"{t} {e:.2e}" for t, e in check.max_abs_error.items())
            lines.append(f"{check.name:<24} {'ok' if check.passed else 'FAIL':<6} {errors}")
        if self.greedy:
            lines.append(
                f"greedy: {self.greedy['agreement']:.1%} of {self.greedy['tokens']} steps agree, "
                f"first divergence {self.greedy['first_divergence']}, mean KL {self.greedy['mean_kl']:.2e}"
            )
        if self.validation:
            lines.append(
                f"validation loss: {self.validation['val_loss']:.4f} ({self.precision}) vs "
                f"{self.validation['val_loss_fp32']:.4f} (PyTorch) nats/token on {self.validation['data']}"
            )
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"FAILED {failure}" for failure in self.failures]
        lines.append(
            f"{'passed' if self.passed else 'FAILED'}: precision {self.precision} on {self.provider or '-'}, "
            f"largest parity error {self.max_abs_error:.3e}, {self.seconds:.2f} s"
        )
        return "\n".join(lines)
