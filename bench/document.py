"""Writes a run's report into a Markdown page, between two marker lines, so that the figures a
page shows are the ones the benchmark printed, never copied by hand.

The page keeps everything outside the markers; the section between them is replaced whole:

    <!-- rnnserve bench: begin -->
    ... the report of the latest run ...
    <!-- rnnserve bench: end -->
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BEGIN = "<!-- rnnserve bench: begin -->"
END = "<!-- rnnserve bench: end -->"


class DocumentError(ValueError):
    """The page lacks the marker lines, or has them out of order or more than once."""


def replace_section(page: str, report: str) -> str:
    """PAGE with the text between its markers replaced by REPORT; DocumentError without them."""
    lines = page.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise DocumentError(f"expected one {BEGIN!r} line followed by one {END!r} line")
    section = f"\n{report.strip()}\n\n"
    return "".join(lines[: begins[0] + 1]) + section + "".join(lines[ends[0] :])


def update_document(path: Path, report: str) -> None:
    """Replace PATH's marked section by REPORT, atomically (a reader never sees half a page)."""
    text = replace_section(path.read_text(), report)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
