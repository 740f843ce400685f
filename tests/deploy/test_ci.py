""".ci/run's verdict on a test run, with `make` replaced by a stand-in that reports a given run.

The stand-in writes the summary that tests/support/skip_summary.py would write (to the path .ci/run
hands over in RNNSERVE_TEST_SUMMARY) and exits as `make test` would after such a run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.deploy import REPO_ROOT
from tests.support.skip_summary import SUMMARY_ENV

FAKE_MAKE = """#!/usr/bin/env bash
# `make services` succeeds at once; `make test` reports the run in $FAKE_SUMMARY.
if [ "$1" = "test" ]; then
  if [ -n "$FAKE_SUMMARY" ]; then printf '%s' "$FAKE_SUMMARY" > "${SUMMARY_ENV}"; fi
  exit "$FAKE_STATUS"
fi
"""


def run_ci(
    tmp_path: Path, summary: dict[str, object] | None, make_status: int
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    make.write_text(FAKE_MAKE.replace("SUMMARY_ENV", SUMMARY_ENV))
    make.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SUMMARY": json.dumps(summary) if summary is not None else "",
        "FAKE_STATUS": str(make_status),
    }
    return subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "run")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def outcome(exit_status: int, passed: int, failed: int = 0, **skipped: int) -> dict[str, object]:
    return {"exit_status": exit_status, "passed": passed, "failed": failed, "skipped": skipped}


def test_only_cuda_skips_pass(tmp_path: Path) -> None:
    result = run_ci(tmp_path, outcome(0, 517, cuda=4), 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ci: 517 passed, 0 failed, 4 skipped"


@pytest.mark.parametrize(
    ("summary", "make_status", "message"),
    [
        (outcome(0, 481, cuda=4, services=36), 0, "tests skipped that CI must run: {'services': 36}"),
        (outcome(0, 516, other=1), 0, "tests skipped that CI must run: {'other': 1}"),
        (outcome(5, 0), 2, "pytest collected no tests (exit status 5)"),
        (outcome(1, 516, 1, cuda=4), 2, "make test failed (exit status 2)"),
        (None, 2, "pytest wrote no summary (make test exited 2 before the tests ran)"),
    ],
)
def test_anything_else_fails(
    tmp_path: Path, summary: dict[str, object] | None, make_status: int, message: str
) -> None:
    result = run_ci(tmp_path, summary, make_status)
    assert result.returncode != 0
    assert f".ci/run: {message}" in result.stderr
