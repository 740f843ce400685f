"""The exceptions `export` raises, in one place.

    ExportError                  anything that stops an export or a re-verification
    ├── RepositoryError          a bad repository path, model name or version number
    │   └── VersionExistsError   the version directory is already taken (also by a concurrent export)
    ├── QuantizationError        onnxruntime's quantizer did not give the graph rnnserve needs
    └── VerificationError        onnxruntime disagreed with PyTorch; `.report` holds every failure

A missing or corrupted checkpoint raises models.checkpoint.CheckpointError, unchanged, so a caller
sees the same error whether it trains, exports or evaluates. Every message names what was wrong
and, where there is a choice, what is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.report import VerificationReport


class ExportError(Exception):
    """An export or verification that cannot go on; nothing was published."""


class RepositoryError(ExportError):
    """The model repository, model name or version cannot be used."""


class VersionExistsError(RepositoryError):
    """The requested (or next free) version directory already exists."""


class QuantizationError(ExportError):
    """Quantization produced a graph without the quantized operators rnnserve expects."""


class VerificationError(ExportError):
    """onnxruntime's outputs do not match PyTorch's; `report.failures` lists every mismatch."""

    def __init__(self, report: VerificationReport) -> None:
        self.report = report
        lines = [f"verification failed ({len(report.failures)} failure(s)):"]
        lines += [f"  {failure}" for failure in report.failures]
        super().__init__("\n".join(lines))
