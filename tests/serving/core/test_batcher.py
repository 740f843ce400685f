"""The batcher's collect, form and bucket logic, and its run/finish bookkeeping, against a fake engine.

FakeEngine keeps one integer of state per slot (the sum of the tokens it has run) and predicts
token `state % vocab`, so every answer says which tokens reached which slot. The worker's steps
(_collect, _form, _execute) are called directly on the test thread where the order of events
matters; the last tests run the real worker thread on an event loop.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from serving.core.batcher import (
    Batcher,
    BatchingOptions,
    FinishReason,
    GenerateWork,
    PredictionRequest,
    StepResult,
    StepWork,
    TokenChannel,
    Work,
    _bucket,
)
from serving.core.errors import InferenceFailedError, UnavailableError
from serving.core.observers import ServerObserver
from serving.core.sampling import Sampler, SamplingParams

VOCAB = 8


class FakeEngine:
    """Slots hold the running sum of their tokens; the logits put 1.0 on `sum % VOCAB`."""

    def __init__(self, fail: bool = False) -> None:
        self.manifest = SimpleNamespace(name="fake", version=3, pad_id=0)
        self.state: dict[int, int] = {}
        self.calls: list[tuple[list[int], list[list[int]], list[int]]] = []  # (slots, tokens, lengths)
        self.fail = fail

    def _logits(self, slot: int) -> np.ndarray:
        row = np.zeros(VOCAB, np.float32)
        row[self.state.get(slot, 0) % VOCAB] = 1.0
        return row

    def step(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        self.calls.append((slots.tolist(), tokens.tolist(), lengths.tolist()))
        if self.fail:
            raise RuntimeError("fake onnxruntime failure")
        for slot, row, length in zip(slots.tolist(), tokens.tolist(), lengths.tolist(), strict=True):
            self.state[slot] = self.state.get(slot, 0) + sum(row[:length])
        return np.stack([self._logits(slot) for slot in slots.tolist()])  # (B, V)

    def last_logits(self, slot: int) -> np.ndarray:
        return self._logits(slot)

    def read_rows(self, slots: np.ndarray) -> dict[int, int]:
        return {slot: self.state.get(slot, 0) for slot in slots.tolist()}

    def write_rows(self, saved: dict[int, int]) -> None:
        self.state.update(saved)


class Finished:
    """Records each work's finish(error) call, as the runtime's on_finish would."""

    def __init__(self) -> None:
        self.calls: list[tuple[Work, BaseException | None]] = []

    def __call__(self, work: Work, error: BaseException | None) -> None:
        self.calls.append((work, error))


@pytest.fixture
def loop() -> Any:
    running = asyncio.new_event_loop()
    yield running
    running.close()


class Step:
    """A StepWork and the future its owner settles from on_finish, as Runtime.step does."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        slot: int,
        tokens: list[int],
        finished: Finished,
        piece_tokens: int,
    ) -> None:
        self.future: asyncio.Future[StepResult] = loop.create_future()
        self.finished = finished
        self.work = StepWork(
            slot, np.array(tokens, np.int64), PredictionRequest(top_k=2), piece_tokens, self.done
        )

    def done(self, work: Work, error: BaseException | None) -> None:
        self.finished(work, error)
        if error is None:
            self.future.set_result(self.work.result)  # type: ignore[arg-type]
        elif isinstance(error, asyncio.CancelledError):
            self.future.cancel()
        else:
            self.future.set_exception(error)


def step_work(
    loop: asyncio.AbstractEventLoop, slot: int, tokens: list[int], finished: Finished, piece_tokens: int = 64
) -> StepWork:
    """A StepWork whose on_finish records the call and settles `work.future` (a test attribute)."""
    step = Step(loop, slot, tokens, finished, piece_tokens)
    step.work.future = step.future  # type: ignore[attr-defined]
    return step.work


def generate_work(
    slot: int,
    prompt: list[int],
    finished: Finished,
    max_new_tokens: int = 3,
    stop: frozenset[int] = frozenset(),
) -> GenerateWork:
    greedy = Sampler(SamplingParams.validated(0.0, 0, None, None, VOCAB))
    return GenerateWork(
        slot,
        np.array(prompt, np.int64),
        greedy,
        max_new_tokens,
        stop,
        feed_final=False,
        channel=TokenChannel(capacity=64),
        rollback=False,
        on_finish=finished,
    )


def batcher(engine: FakeEngine, **options: Any) -> Batcher:
    return Batcher(engine, BatchingOptions(**options), ServerObserver())  # type: ignore[arg-type]


def run_deliveries(deliveries: list[Callable[[], None]]) -> None:
    for deliver in deliveries:
        deliver()


@pytest.mark.parametrize(
    ("length", "bucket"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (16, 4), (17, 5), (64, 6)]
)
def test_bucket_groups_lengths_by_powers_of_two(length: int, bucket: int) -> None:
    assert _bucket(length) == bucket


def test_form_takes_the_oldest_bucket_and_keeps_the_others_in_order(loop: asyncio.AbstractEventLoop) -> None:
    finished = Finished()
    b = batcher(FakeEngine(), max_batch_size=8)
    one_a, four, one_b, three, two = (
        step_work(loop, 0, [1], finished),
        step_work(loop, 1, [1, 2, 3, 4], finished),
        step_work(loop, 2, [5], finished),
        step_work(loop, 3, [1, 2, 3], finished),
        step_work(loop, 4, [1, 2], finished),
    )
    ready = b._ready
    ready.extend([one_a, four, one_b, three, two])
    deliveries: list[Callable[[], None]] = []
    assert b._form(ready, deliveries) == [one_a, one_b]
    assert list(ready) == [four, three, two]  # skipped works stay at the front, oldest first
    assert b._form(ready, deliveries) == [four, three]  # 3 and 4 tokens share a bucket
    assert b._form(ready, deliveries) == [two]
    assert not deliveries and not finished.calls


def test_form_stops_at_max_batch_size(loop: asyncio.AbstractEventLoop) -> None:
    b = batcher(FakeEngine(), max_batch_size=3)
    works = [step_work(loop, slot, [1], Finished()) for slot in range(5)]
    b._ready.extend(works)
    assert b._form(b._ready, []) == works[:3]
    assert list(b._ready) == works[3:]


def test_form_drops_cancelled_work_and_finishes_it_as_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    finished = Finished()
    b = batcher(FakeEngine())
    dropped, kept = step_work(loop, 0, [1], finished), step_work(loop, 1, [1], finished)
    dropped.cancel()
    b._ready.extend([dropped, kept])
    deliveries: list[Callable[[], None]] = []
    assert b._form(b._ready, deliveries) == [kept]
    run_deliveries(deliveries)
    assert [(work, type(error)) for work, error in finished.calls] == [(dropped, asyncio.CancelledError)]
    assert dropped.future.cancelled()


def test_collect_returns_at_once_after_a_batch_of_one(loop: asyncio.AbstractEventLoop) -> None:
    b = batcher(FakeEngine(), max_queue_delay_s=3600.0)
    work = step_work(loop, 0, [1], Finished())
    b._incoming.put(work)
    assert list(b._collect() or ()) == [work]  # the previous batch had one row: no waiting


def test_collect_takes_everything_already_submitted(loop: asyncio.AbstractEventLoop) -> None:
    b = batcher(FakeEngine(), max_queue_delay_s=3600.0)
    b._last_rows = 3
    works = [step_work(loop, slot, [1], Finished()) for slot in range(3)]
    for work in works:
        b._incoming.put(work)
    assert list(b._collect() or ()) == works  # the target of 3 is met without waiting


def test_collect_runs_tasks_between_batches_and_stops_at_the_marker(loop: asyncio.AbstractEventLoop) -> None:
    b = batcher(FakeEngine())
    ran: list[str] = []
    b._incoming.put(lambda: ran.append("task"))
    b._incoming.put(None)
    assert b._collect() is None
    assert ran == ["task"]


def test_long_chunks_run_in_pieces_one_per_batch(loop: asyncio.AbstractEventLoop) -> None:
    engine, finished = FakeEngine(), Finished()
    b = batcher(engine, piece_tokens=4)
    long = step_work(loop, 0, list(range(1, 11)), finished, piece_tokens=4)  # 10 tokens: 4 + 4 + 2
    b._ready.append(long)
    deliveries: list[Callable[[], None]] = []
    while b._ready:
        batch = b._form(b._ready, deliveries)
        b._execute(batch, deliveries)
    assert [lengths for _, _, lengths in engine.calls] == [[4], [4], [2]]
    run_deliveries(deliveries)
    assert finished.calls == [(long, None)]
    result = long.future.result()
    assert isinstance(result, StepResult)
    assert result.consumed == 10 and result.top_ids[0] == sum(range(1, 11)) % VOCAB


def test_a_batch_is_right_padded_with_the_pad_id(loop: asyncio.AbstractEventLoop) -> None:
    engine = FakeEngine()
    b = batcher(engine)
    b._ready.extend([step_work(loop, 0, [1, 2, 3], Finished()), step_work(loop, 1, [4, 5, 6, 7], Finished())])
    b._execute(b._form(b._ready, []), [])
    assert engine.calls == [([0, 1], [[1, 2, 3, 0], [4, 5, 6, 7]], [3, 4])]


def test_a_failed_run_fails_its_batch_and_rolls_back_started_works(loop: asyncio.AbstractEventLoop) -> None:
    engine, finished = FakeEngine(), Finished()
    b = batcher(engine, piece_tokens=2)
    long = step_work(loop, 0, [1, 2, 3, 4], finished, piece_tokens=2)  # rolls back: more than one piece
    b._ready.append(long)
    deliveries: list[Callable[[], None]] = []
    b._execute(b._form(b._ready, deliveries), deliveries)  # first piece runs: slot 0 holds 3
    assert engine.state[0] == 3
    engine.fail = True
    assert b._execute(b._form(b._ready, deliveries), deliveries) is None
    run_deliveries(deliveries)
    assert engine.state[0] == 0  # rolled back to before the first piece
    ((work, error),) = finished.calls
    assert work is long and isinstance(error, InferenceFailedError)
    assert "fake onnxruntime failure" in str(error)
    with pytest.raises(InferenceFailedError):
        long.future.result()


def test_generations_sample_feed_and_stop(loop: asyncio.AbstractEventLoop) -> None:
    engine, finished = FakeEngine(), Finished()
    b = batcher(engine)
    by_length = generate_work(0, [1, 2], finished, max_new_tokens=3)
    by_stop = generate_work(1, [5], finished, max_new_tokens=10, stop=frozenset({4}))
    b._ready.extend([by_length, by_stop])
    deliveries: list[Callable[[], None]] = []
    while b._ready:
        b._execute(b._form(b._ready, deliveries), deliveries)
    run_deliveries(deliveries)
    # Greedy on the fake: each token is the slot's running sum mod VOCAB, then fed back in.
    assert by_length.finish_reason == FinishReason.LENGTH and by_length.produced == 3
    assert by_stop.finish_reason == FinishReason.STOP
    assert {work for work, error in finished.calls if error is None} == {by_length, by_stop}

    async def drain(channel: TokenChannel) -> tuple[list[int], FinishReason | None]:
        return await channel.take()

    assert loop.run_until_complete(drain(by_length.channel)) == ([3, 6, 4], FinishReason.LENGTH)
    assert loop.run_until_complete(drain(by_stop.channel)) == ([5, 2, 4], FinishReason.STOP)


def test_the_worker_thread_answers_submitted_steps(loop: asyncio.AbstractEventLoop) -> None:
    engine, finished = FakeEngine(), Finished()
    b = batcher(engine, max_queue_delay_s=0.0)

    async def scenario() -> list[StepResult]:
        b.start(asyncio.get_running_loop())
        works = [step_work(asyncio.get_running_loop(), slot, [slot + 1, 2], finished) for slot in range(4)]
        for work in works:
            b.submit(work)
        return await asyncio.gather(*(work.future for work in works))

    results = loop.run_until_complete(scenario())
    b.stop(timeout=10)
    assert [r.top_ids[0] for r in results] == [(slot + 3) % VOCAB for slot in range(4)]
    assert sum(len(slots) for slots, _, _ in engine.calls) == 4
    with pytest.raises(UnavailableError, match="unloading"):
        b.submit(step_work(loop, 9, [1], finished))


def test_stop_fails_queued_work_with_unavailable(loop: asyncio.AbstractEventLoop) -> None:
    finished = Finished()
    b = batcher(FakeEngine())
    queued = step_work(loop, 0, [1], finished)
    b._ready.append(queued)
    b._incoming = queue.SimpleQueue()
    b._incoming.put(None)
    b._loop = loop
    b._run()  # the stop marker first: the ready work is let go of without a run
    loop.run_until_complete(asyncio.sleep(0))  # the deliveries are on the loop
    ((work, error),) = finished.calls
    assert work is queued and isinstance(error, UnavailableError)
