"""The closing `skipped: ...` line of a test run, and the summary file that .ci/run checks.

Each case runs pytest in a subprocess on a small generated test module with the plugin loaded,
as `make test` does, and reads what it printed and wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.support.skip_summary import SUMMARY_ENV, group_of, summary_line

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.support.skip_summary"

MIXED_SKIPS = """
import pytest

def test_runs():
    pass

@pytest.mark.services
def test_scale_out():
    pytest.skip("needs nginx (apt-get install nginx)")

def test_redis_without_a_marker():
    pytest.skip("needs redis-server (apt-get install redis-server)")

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="needs a CUDA device and onnxruntime-gpu")
def test_gpu():
    pass

@pytest.mark.skip(reason="tmpfs needs root")
def test_other():
    pass
"""


def run_pytest(tmp_path: Path, module: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    services: x\n    cuda: x\n")
    (tmp_path / "test_generated.py").write_text(module)
    summary = tmp_path / "summary.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), SUMMARY_ENV: str(summary)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN, "."],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, json.loads(summary.read_text())


def test_the_run_ends_with_the_skipped_groups_and_their_remedies(tmp_path: Path) -> None:
    result, summary = run_pytest(tmp_path, MIXED_SKIPS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == (
        "skipped: 2 services tests (need nginx and redis-server: run `make services`), "
        "1 cuda test (need a CUDA device and onnxruntime-gpu), "
        "1 other test (the reasons are listed above)"
    )
    assert lines[-1].startswith("1 passed, 4 skipped")
    assert summary == {
        "exit_status": 0,
        "passed": 1,
        "failed": 0,
        "skipped": {"services": 2, "cuda": 1, "other": 1},
    }


def test_a_run_without_skips_prints_no_line_and_records_failures(tmp_path: Path) -> None:
    result, summary = run_pytest(tmp_path, "def test_a():\n    pass\n\ndef test_b():\n    assert False\n")
    assert result.returncode == 1
    assert "skipped:" not in result.stdout
    assert summary == {"exit_status": 1, "passed": 1, "failed": 1, "skipped": {}}


def test_a_run_that_collects_nothing_records_exit_status_5(tmp_path: Path) -> None:
    result, summary = run_pytest(tmp_path, "")
    assert result.returncode == 5
    assert summary["exit_status"] == 5 and summary["passed"] == 0


def test_groups_come_from_markers_then_reasons() -> None:
    assert group_of({"services"}, "anything") == "services"
    assert group_of(set(), "needs nginx and redis-server (apt-get install ...)") == "services"
    assert group_of({"cuda"}, "") == "cuda"
    assert group_of(set(), "needs a CUDA device and onnxruntime-gpu") == "cuda"
    assert group_of(set(), "needs the openssl command") == "other"
    assert summary_line(Counter()) == ""
    assert summary_line(Counter(cuda=1)) == "skipped: 1 cuda test (need a CUDA device and onnxruntime-gpu)"
