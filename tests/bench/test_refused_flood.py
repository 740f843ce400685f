"""bench/refused_flood.py: a short run reaches its own targets (the figures are in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving.settings import ServerSettings


def test_the_refused_flood_benchmark_runs_and_checks_its_targets(tmp_path: Path) -> None:
    """A short run of bench/refused_flood.py (the full one: 8 clients x 20 s, see docs/reliability.md)."""
    script = Path(__file__).resolve().parents[2] / "bench" / "refused_flood.py"
    command = [
        sys.executable,
        str(script),
        "--clients",
        "2",
        "--duration",
        "1",
        "--idle",
        "0",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("refused-flood-*.json")
    figures = json.loads(result.read_text())
    assert figures["requests"] > 0 and set(figures["statuses"]) == {"RESOURCE_EXHAUSTED"}
    assert figures["receive_limit_bytes"] == ServerSettings().receive_message_bytes
    assert figures["legal_maximal_request_ok"] is True
