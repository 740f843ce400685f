"""A closing line that names every group of skipped tests and what would run them.

Tests skip where this machine lacks something (nginx and redis-server, a CUDA device). pytest's
`-ra` lists each skip; this plugin adds one line at the end of the run that counts them by group,
e.g. `skipped: 36 services tests (need nginx and redis-server: run `make services`)`.

With RNNSERVE_TEST_SUMMARY=PATH in the environment it also writes the run's outcome as JSON
(`exit_status`, `passed`, `failed`, and `skipped`: tests per group), which .ci/run reads to
require that only the cuda group skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class SkipGroup:
    """Skipped tests that share a cause and a remedy."""

    name: str  # the pytest marker of the group's tests
    reason: re.Pattern[str]  # skip reasons of the group's tests that carry no marker
    needs: str  # what the tests need, for the closing line
    remedy: str  # how to provide it ("" when no command does)


GROUPS = (
    SkipGroup(
        "services",
        re.compile(r"\b(nginx|redis-server)\b"),
        "need nginx and redis-server",
        "run `make services`",
    ),
    SkipGroup(
        "cuda",
        re.compile(r"needs a CUDA device"),
        "need a CUDA device and onnxruntime-gpu",
        "",
    ),
)
OTHER = "other"
SUMMARY_ENV = "RNNSERVE_TEST_SUMMARY"


def group_of(markers: set[str], reason: str) -> str:
    """The group of a test skipped for REASON whose markers are MARKERS."""
    for group in GROUPS:
        if group.name in markers or group.reason.search(reason):
            return group.name
    return OTHER


def summary_line(skipped: Counter[str]) -> str:
    """`skipped: N GROUP tests (needs: remedy), ...`, or '' when nothing skipped."""
    parts = []
    for group in GROUPS:
        count = skipped.get(group.name, 0)
        if count:
            why = f"{group.needs}: {group.remedy}" if group.remedy else group.needs
            parts.append(f"{count} {group.name} test{'s' * (count != 1)} ({why})")
    others = skipped.get(OTHER, 0)
    if others:
        parts.append(f"{others} other test{'s' * (others != 1)} (the reasons are listed above)")
    return f"skipped: {', '.join(parts)}" if parts else ""


class SkipSummary:
    """Counts skips by group as reports arrive, and reports them at the end."""

    def __init__(self) -> None:
        self.markers: dict[str, set[str]] = {}
        self.skipped: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.markers = {item.nodeid: {mark.name for mark in item.iter_markers()} for item in items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and report.when in ("setup", "call"):
            reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
            self.skipped[group_of(self.markers.get(report.nodeid, set()), reason)] += 1
            self.outcomes["skipped"] += 1
        elif report.failed:
            self.outcomes["failed"] += 1
        elif report.passed and report.when == "call":
            self.outcomes["passed"] += 1

    # The outermost wrapper, so that the line follows pytest's own short test summary.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
        yield
        line = summary_line(self.skipped)
        if line:
            terminalreporter.write_line(line, yellow=True, bold=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        path = os.environ.get(SUMMARY_ENV)
        if path:
            outcome = {
                "exit_status": int(exitstatus),
                "passed": self.outcomes["passed"],
                "failed": self.outcomes["failed"],
                "skipped": dict(self.skipped),
            }
            Path(path).write_text(json.dumps(outcome, indent=2) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipSummary(), "rnnserve-skip-summary")
