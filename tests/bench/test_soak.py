"""The soak benchmark runs end to end: a small version of `python bench/soak.py` (20 streams for 3 s
on tiny models) completes with no error, no wrong prediction and no session left behind, and
writes its JSON. The full soak (1,000 streams for 60 s) is a benchmark, not part of the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_small_soak_loses_nothing(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        *("--streams", "20", "--duration", "3", "--warmup", "1", "--interval-ms", "100"),
        *("--session-tokens", "10", "--sizes", "tiny", "--verify-every", "4", "--out", str(tmp_path)),
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "sessions left behind == 0: met" in finished.stdout
    document = json.loads((tmp_path / "soak-latest.json").read_text())
    figures = document["figures"]
    assert figures["error_total"] == 0 and figures["wrong_predictions"] == 0
    assert figures["counted_requests"] > 100  # 20 streams x 10 tokens/s x 3 s, less the client's lag
    assert figures["sessions"]["left_behind"] == 0
    assert figures["sessions"]["opened"] > 20  # sessions of about 10 tokens churn within the run
    assert figures["sessions"]["opened"] == figures["sessions"]["ended"]
    assert figures["verified"]["sessions"] > 0 and figures["verified"]["mismatches"] == 0
    assert figures["latency_ms"]["p50"] > 0 and figures["rss_bytes"]["after_warmup"] > 0
    assert document["config"]["streams"] == 20
