"""serving.ops.heap: freed heap memory is trimmed on a timer, and the server runs the trimmer."""

from __future__ import annotations

import asyncio
import sys

import pytest

from serving.ops.heap import HeapTrimmer, find_malloc_trim


def test_the_trimmer_calls_malloc_trim_on_its_interval() -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    async def run_briefly() -> None:
        task = asyncio.create_task(HeapTrimmer(0.01, trim).run())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_briefly())
    assert len(calls) >= 2
    assert set(calls) == {0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = find_malloc_trim()
    assert trim is not None
    trimmer = HeapTrimmer(1.0, trim)
    trimmer.trim_once()
    assert trimmer.trims == 1


def test_without_malloc_trim_the_trimmer_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serving.ops.heap.find_malloc_trim", lambda: None)
    trimmer = HeapTrimmer(0.01)
    assert not trimmer.available
    asyncio.run(asyncio.wait_for(trimmer.run(), timeout=1.0))
    assert trimmer.trims == 0
