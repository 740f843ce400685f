"""The batcher: one worker thread per model version gathers the steps of concurrent sessions
into one onnxruntime run.

Work arrives from the event loop (`submit`) as StepWork (a Stream chunk or a Step) or
GenerateWork (a whole generation). The worker loops:

1. Collect: take every submitted work into the ready queue; if fewer are ready than the previous
   batch had, wait up to `max_queue_delay` (from the oldest ready work) for more. A lone stream
   therefore never waits, while a busy server fills its batches. While a batch runs, new work
   queues up for the next one (continuous batching).
2. Form: take ready works oldest first, up to `max_batch_size`, whose next piece falls in the same
   length bucket as the oldest one (1, 2, 3-4, 5-8, ... tokens). onnxruntime's LSTM/GRU kernels
   run every row for the longest row's length (measured: a batch of 63 one-token rows and one
   16-token row costs as much as 64 rows of 16), so mixing lengths would make every single-token
   step pay for the longest prompt. Chunks longer than `piece_tokens` run in pieces, one piece per
   batch, so a long prompt cannot starve the single-token steps.
3. Run: `engine.step` on the right-padded rows (`lengths` = each row's real length). The state of
   a session changes only when its run succeeds; a failed run fails exactly that batch's works
   with INTERNAL, and works that had already run earlier pieces roll their rows back.
4. Finish: a StepWork whose last piece ran gets its prediction (top-k log-probabilities, logits,
   sampled token); a GenerateWork samples its next token (vectorised over the batch) and goes
   back to the ready queue, so many generations decode in one batch without touching the event
   loop per token. Results reach the event loop in one `call_soon_threadsafe` per batch.

Why one thread per model version: a batch can only hold one model, the thread releases the GIL
inside onnxruntime (so it overlaps with the event loop's gRPC work), and versions do not queue
behind each other. onnxruntime's own thread counts are set explicitly (engine.session_options).

A slow Generate reader: each generation has a bounded TokenChannel. Tokens the reader has not
taken yet are coalesced into its next response; when the channel is full the generation leaves
the batches (paused) until the reader drains it. A cancelled request leaves at the next batch and,
if it had already changed its session's state, rolls the state back.

Many generations at once: every reply costs the event loop and the client about the same CPU
whatever it carries, so a decode batch of G generations wakes a waiting reader only once it holds
ceil(G / replies_per_batch) tokens (the first token and the last always at once). Up to
replies_per_batch concurrent generations every token is sent as it is made; beyond, replies carry
a few tokens each and their number per batch stays bounded (measured with 64 generations and 16
replies per batch: about 4 tokens per reply, 1.8-2x the tokens/s, 40% less server CPU per token).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.core.engine import Engine
from serving.core.errors import InferenceFailedError, Reason, ServingError, UnavailableError
from serving.core.observers import ServerObserver
from serving.core.sampling import Sampler, log_softmax, sample, top_k
from serving.core.state_pool import SavedRows

log = logging.getLogger(__name__)

Delivery = Callable[[], None]  # run on the event loop

# The workers and the event loop share the GIL. At Python's default switch interval (5 ms), a
# worker whose onnxruntime run has ended waits up to 5 ms for the loop to let go while the loop
# sends the previous batch's answers; at 1 ms 64 concurrent generations made 11% more tokens/s
# with 10% less CPU per token (measured), and streamed steps were unchanged.
GIL_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    piece_tokens: int = 64  # longest piece of a chunk or prompt in one batch
    # Generate replies a decode batch wakes, about: a batch of G generations wakes each reader
    # once it holds ceil(G / replies_per_batch) tokens (see TokenChannel).
    replies_per_batch: int = 16


@dataclass(frozen=True)
class PredictionRequest:
    """What a Stream chunk or Step wants back besides advancing the state."""

    top_k: int = 5
    return_logits: bool = False
    sampler: Sampler | None = None


@dataclass(slots=True)
class StepResult:
    """A prediction, as plain Python values (converted on the worker, not the event loop).

    Not frozen: one is made per answered request on the worker's hot path, and a frozen
    dataclass costs three times as much to construct (1.3 against 0.4 us).
    """

    top_ids: list[int]  # k ids, most likely first
    top_logprobs: list[float]  # their log-probabilities
    logits: list[float] | None  # vocab_size next-token logits, when asked for
    sampled_token: int | None
    consumed: int  # tokens the session consumed in this request


class FinishReason(enum.IntEnum):
    """Why a generation ended (values match inference.proto's FinishReason)."""

    LENGTH = 1
    STOP = 2


class Emitted(enum.Enum):
    """What a generation does after a sampled token (GenerateWork.emit)."""

    CONTINUE = "continue"  # feed the token in the next batch
    PAUSED = "paused"  # the reader's buffer is full: the reader resumes it (TokenChannel.take)
    DONE = "done"  # it ended (stop token or max_new_tokens) and has nothing left to run


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


OnFinish = Callable[["Work", "BaseException | None"], None]
# ServerObserver.batch_completed's arguments: model, version, rows, tokens, padded tokens,
# queue waits (s), compute (s).
BatchObservation = tuple[str, int, int, int, int, list[float], float]


class Work(ABC):
    """Base of queued work on one session's slot.

    The worker lets go of every work exactly once, by delivering `finish(error)` to the event
    loop: error None when it completed, a CancelledError when it was dropped after `cancel()`,
    a ServingError when it failed. `finish` calls `on_finish(work, error)`, the owner's one
    completion path: it does the bookkeeping (release the session, advance its position) and
    hands the outcome to whoever waits for it (a StepWork's `result`, a generation's channel
    has its tokens). It runs even when nobody waits for the result any more.
    """

    def __init__(self, slot: int, rollback: bool, on_finish: OnFinish) -> None:
        self.slot = slot
        self.rollback = rollback  # save the rows before the first run, restore on failure/cancel
        self.on_finish = on_finish
        self.cancelled = False  # set on the event loop, read by the worker
        self.finished = False  # set on the event loop by finish()
        self.enqueued_at = time.perf_counter()
        self.ready_at = self.enqueued_at
        self.started = False
        self.saved: SavedRows | None = None
        self.consumed = 0  # tokens run through the session so far

    @abstractmethod
    def piece(self, limit: int) -> np.ndarray:
        """The next tokens to run, at most `limit` (never empty while the work is ready)."""

    def cancel(self) -> None:
        """Ask the worker to drop this work (event loop)."""
        self.cancelled = True

    def finish(self, error: BaseException | None) -> None:
        """Event loop: the worker has let go of this work."""
        self.finished = True
        self.on_finish(self, error)


class StepWork(Work):
    """Run `tokens` through the session, then predict after the last one."""

    def __init__(
        self,
        slot: int,
        tokens: np.ndarray,
        request: PredictionRequest,
        piece_tokens: int,
        on_finish: OnFinish,
    ) -> None:
        super().__init__(slot, len(tokens) > piece_tokens, on_finish)
        self.tokens = tokens  # (n,) int64, validated
        self.request = request
        self.offset = 0
        self.result: StepResult | None = None  # the prediction, set before a successful finish

    def piece(self, limit: int) -> np.ndarray:
        return self.tokens[self.offset : self.offset + limit]

    @property
    def done(self) -> bool:
        return self.offset >= len(self.tokens)


class TokenChannel:
    """A generation's bounded buffer between the worker (producer) and the RPC (reader).

    The worker pushes tokens; the reader takes everything buffered at once, so a slow reader gets
    fewer, larger responses. A waiting reader is woken once the tokens a push asks for are
    buffered (see `push`). When the buffer is full the worker stops scheduling the generation
    (`paused`); the reader's next take hands it back to the batcher (`resume`).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._paused = False
        self._cancelled = False  # set with the lock, so that a push never pauses a cancelled generation
        self._finish: FinishReason | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # the reader waiting in take()
        self.resume: Callable[[], None] = lambda: None

    def push(self, token: int, may_pause: bool, reply_tokens: int = 1) -> tuple[bool, bool]:
        """Worker: buffer a token. Returns (paused, wake): paused means the reader now owns
        resuming the generation; wake means the reader must be woken (deliver `wake`), which is
        once `reply_tokens` tokens are buffered (or the buffer is full)."""
        with self._lock:
            self._tokens.append(token)
            buffered = len(self._tokens)
            paused = may_pause and buffered >= self.capacity and not self._cancelled
            self._paused = paused
            return paused, paused or buffered >= reply_tokens

    def finish(self, reason: FinishReason | None, error: BaseException | None) -> None:
        """Worker: the generation ended (reason) or failed (error); deliver `wake` afterwards."""
        with self._lock:
            self._finish = reason
            self._error = error

    def wake(self) -> None:
        """Loop: there may be something to take (delivered after push or finish)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> bool:
        """Loop: no push pauses the generation from now on; returns True if it was paused (the
        caller then resumes it, so that the worker sees it cancelled and drops it).

        One lock orders this against the worker's push: a cancel that comes between the worker's
        last check of `cancelled` and a push that would fill the buffer must not leave the
        generation paused for ever, with nobody left to resume it."""
        with self._lock:
            self._cancelled = True
            paused, self._paused = self._paused, False
            return paused

    async def take(self) -> tuple[list[int], FinishReason | None]:
        """Loop: wait for tokens or the end; returns (tokens, finish reason or None).

        Raises the generation's error once its buffered tokens have been taken.
        """
        while True:
            with self._lock:
                tokens, self._tokens = self._tokens, []
                paused, self._paused = self._paused, False
                finish, error = self._finish, self._error
            if paused:
                self.resume()
            if tokens:
                return tokens, finish
            if error is not None:
                raise error
            if finish is not None:
                return [], finish
            # Nothing buffered: the next push finds the buffer empty and delivers wake().
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class GenerateWork(Work):
    """A whole generation: run the prompt (in pieces), then sample and feed one token per batch."""

    def __init__(
        self,
        slot: int,
        prompt: np.ndarray,
        sampler: Sampler,
        max_new_tokens: int,
        stop_tokens: frozenset[int],
        feed_final: bool,
        channel: TokenChannel,
        rollback: bool,
        on_finish: OnFinish,
    ) -> None:
        super().__init__(slot, rollback, on_finish)
        self.prompt = prompt  # (n,) int64; empty: continue from the session's last logits
        self.offset = 0
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.stop_tokens = stop_tokens
        # Feed the last generated token too, so a kept session ends after every token it produced.
        self.feed_final = feed_final
        self.channel = channel
        self.produced = 0
        self.pending = np.zeros(1, np.int64)  # (1,) the sampled token to feed next, reused
        self.finish_reason: FinishReason | None = None

    def piece(self, limit: int) -> np.ndarray:
        if self.offset < len(self.prompt):
            return self.prompt[self.offset : self.offset + limit]
        return self.pending

    @property
    def in_prompt(self) -> bool:
        return self.offset < len(self.prompt)

    @property
    def needs_first_sample(self) -> bool:
        """No prompt: the first token comes from the session's stored logits, without a run."""
        return len(self.prompt) == 0 and self.produced == 0

    def emit(self, token: int, deliveries: list[Delivery], reply_tokens: int = 1) -> Emitted:
        """Record a sampled token; wake the reader once `reply_tokens` are buffered (the first and
        the last token at once). Returns what the generation does next."""
        self.produced += 1
        if token in self.stop_tokens:
            self.finish_reason = FinishReason.STOP
        elif self.produced >= self.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        more_runs = self.finish_reason is None or self.feed_final
        first_or_last = self.produced == 1 or self.finish_reason is not None
        paused, wake = self.channel.push(
            token, may_pause=more_runs, reply_tokens=1 if first_or_last else reply_tokens
        )
        if wake:
            deliveries.append(self.channel.wake)
        if not more_runs:
            return Emitted.DONE
        self.pending[0] = token
        return Emitted.PAUSED if paused else Emitted.CONTINUE

    def cancel(self) -> None:
        super().cancel()
        # A paused generation is in no queue; hand it to the worker so it can be dropped.
        if self.channel.cancel():
            self.channel.resume()


def _bucket(length: int) -> int:
    """Length class of a piece: 1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ..."""
    return (length - 1).bit_length()


class Batcher:
    """One model version's queue and worker thread. `submit` is called on the event loop."""

    def __init__(self, engine: Engine, options: BatchingOptions, observer: ServerObserver) -> None:
        self.engine = engine
        self.options = options
        self.observer = observer
        self.name = engine.manifest.name
        self.version = engine.manifest.version
        self._pad_id = engine.manifest.pad_id
        # Submitted work, tasks, and the stop marker (None). SimpleQueue is C code: a submit costs
        # the event loop well under a microsecond, and a get wakes the worker.
        self._incoming: queue.SimpleQueue[Work | Callable[[], None] | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # orders submits against stop()
        self._ready: deque[Work] = deque()  # worker thread only
        self._stopping = False
        self._last_rows = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ----- event loop side -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide; see GIL_SWITCH_INTERVAL_S
        self._thread = threading.Thread(
            target=self._run, name=f"batcher-{self.name}-v{self.version}", daemon=True
        )
        self._thread.start()

    def submit(self, work: Work | Callable[[], None]) -> None:
        """Queue a work (or a task to run between batches on the worker thread)."""
        with self._submit_lock:
            if self._stopping:
                raise UnavailableError(
                    f"model {self.name!r} version {self.version} is unloading; retry",
                    Reason.MODEL_UNLOADING,
                    model=self.name,
                    version=self.version,
                )
            self._incoming.put(work)

    @property
    def backlog(self) -> int:
        """Works waiting for a batch, approximately (for admission control and metrics)."""
        return self._incoming.qsize() + len(self._ready)

    async def run_in_worker(self, task: Callable[[], Any]) -> Any:
        """Run `task()` on the worker thread between batches (e.g. to read state rows safely)."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        loop = self._loop

        def run() -> None:
            try:
                result = task()
            except Exception as error:  # handed to the awaiting caller, not swallowed
                loop.call_soon_threadsafe(_set_exception, future, error)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self.submit(run)
        return await future

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker after the batch in flight; works still queued fail with UNAVAILABLE
        and roll back. Blocks until the thread exits."""
        with self._submit_lock:
            if not self._stopping:
                self._stopping = True
                self._incoming.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            rows = self._collect()
            if rows is None:
                break
            deliveries: list[Delivery] = []
            batch = self._form(rows, deliveries)
            observation = self._execute(batch, deliveries) if batch else None
            self._deliver(deliveries)
            if observation is not None:
                # Reported once the answers are on their way: metrics are on no request's path.
                self._observe(self.observer.batch_completed, *observation)
        error = UnavailableError(f"model {self.name!r} version {self.version} was unloaded")
        deliveries = []
        for work in self._ready:
            self._end(work, deliveries, error=error)
        self._ready.clear()
        self._deliver(deliveries)

    def _accept(self, item: Work | Callable[[], None] | None) -> bool:
        """Take one submitted item: a work becomes ready, a task runs now. False at the stop marker."""
        if item is None:
            return False
        if isinstance(item, Work):
            item.ready_at = time.perf_counter()
            self._ready.append(item)
        else:
            item()
        return True

    def _drain(self) -> bool:
        """Accept everything submitted so far without waiting. False once the stop marker came."""
        incoming = self._incoming
        # empty() first: this thread is the only consumer, and a raised queue.Empty costs more
        # than the check (0.4 against 0.03 us) on every batch.
        while not incoming.empty():
            if not self._accept(incoming.get_nowait()):
                return False
        return True

    def _collect(self) -> deque[Work] | None:
        """Wait for work and let a batch fill; None once stopping (the batch in flight is done)."""
        if not self._drain():
            return None
        while not self._ready:
            if not self._accept(self._incoming.get()) or not self._drain():
                return None
        target = min(self.options.max_batch_size, self._last_rows)
        deadline = self._ready[0].ready_at + self.options.max_queue_delay_s
        while len(self._ready) < target:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = self._incoming.get(timeout=remaining)
            except queue.Empty:
                break
            if not self._accept(item) or not self._drain():
                return None
        return self._ready

    def _form(self, ready: deque[Work], deliveries: list[Delivery]) -> list[Work]:
        """Take up to max_batch_size ready works whose next piece is in the oldest one's bucket."""
        batch: list[Work] = []
        skipped: list[Work] = []
        bucket = -1
        limit = self.options.piece_tokens
        while ready and len(batch) < self.options.max_batch_size:
            work = ready.popleft()
            if work.cancelled:
                self._end(work, deliveries, cancelled=True)
                continue
            if (
                isinstance(work, GenerateWork)
                and work.needs_first_sample
                and not self._first_sample(work, deliveries)
            ):
                continue
            length_bucket = _bucket(len(work.piece(limit)))
            if bucket < 0:
                bucket = length_bucket
            if length_bucket != bucket:
                skipped.append(work)
                continue
            batch.append(work)
        ready.extendleft(reversed(skipped))
        return batch

    def _first_sample(self, work: GenerateWork, deliveries: list[Delivery]) -> bool:
        """Sample a continued generation's first token from stored logits; True if it goes on."""
        if work.rollback and work.saved is None:
            work.saved = self.engine.read_rows(np.array([work.slot], np.int64))
        logits = self.engine.last_logits(work.slot)[None, :]  # (1, V)
        token = int(sample(logits, [work.sampler])[0])
        outcome = work.emit(token, deliveries)
        if outcome is Emitted.DONE:
            self._end(work, deliveries)
        return outcome is Emitted.CONTINUE

    def _execute(self, batch: list[Work], deliveries: list[Delivery]) -> BatchObservation | None:
        """Run one batch and finish its works; returns batch_completed's arguments (None when
        the run failed)."""
        limit = self.options.piece_tokens
        pieces = [work.piece(limit) for work in batch]
        size = len(batch)
        piece_lengths = [len(piece) for piece in pieces]
        lengths = np.array(piece_lengths, np.int32)  # (B,)
        width = max(piece_lengths)
        if width == 1:  # the usual batch: one token per row (decode steps, streamed tokens)
            tokens = np.concatenate(pieces).reshape(size, 1)  # (B, 1)
        else:
            tokens = np.full((size, width), self._pad_id, np.int64)  # (B, T) right-padded
            for row, piece in zip(tokens, pieces, strict=True):
                row[: len(piece)] = piece
        slots = np.array([work.slot for work in batch], np.int64)  # (B,)
        started = time.perf_counter()
        queue_waits = []
        for work in batch:
            if not work.started:
                work.started = True
                queue_waits.append(started - work.enqueued_at)
                if work.rollback and work.saved is None:
                    work.saved = self.engine.read_rows(np.array([work.slot], np.int64))
        try:
            logits = self.engine.step(slots, tokens, lengths)  # (B, V)
        except Exception as error:  # any failure of the run fails this batch only, with INTERNAL
            log.exception(
                "inference failed for model %r version %d on a batch of %d rows",
                self.name,
                self.version,
                size,
            )
            self._observe(self.observer.batch_failed, self.name, self.version, size)
            failure = InferenceFailedError(
                f"inference failed for model {self.name!r} version {self.version} "
                f"({type(error).__name__}: {error}); the session's state is unchanged"
            )
            for work in batch:
                self._end(work, deliveries, error=failure)
            return None
        compute_s = time.perf_counter() - started
        self._last_rows = size
        self._finish_batch(batch, piece_lengths, logits, deliveries)
        return (self.name, self.version, size, sum(piece_lengths), size * width, queue_waits, compute_s)

    def _observe(self, hook: Callable[..., None], *args: Any) -> None:
        """Call an observer hook; a failing hook is logged, never allowed to stop the worker."""
        try:
            hook(*args)
        except Exception:
            log.exception("observer hook %s failed", getattr(hook, "__name__", hook))

    def _finish_batch(
        self, batch: list[Work], lengths: Sequence[int], logits: np.ndarray, deliveries: list[Delivery]
    ) -> None:
        answered: list[int] = []  # rows whose StepWork is complete
        answered_works: list[StepWork] = []
        to_sample: list[int] = []  # rows whose GenerateWork needs its next token
        sampling_works: list[GenerateWork] = []
        now = time.perf_counter()
        for i, (work, length) in enumerate(zip(batch, lengths, strict=True)):
            work.consumed += length
            if isinstance(work, StepWork):
                work.offset += length
                if work.done:
                    answered.append(i)
                    answered_works.append(work)
                else:
                    self._requeue(work, now)
            elif isinstance(work, GenerateWork):
                if work.in_prompt:
                    work.offset += length
                if work.in_prompt:
                    self._requeue(work, now)
                elif work.finish_reason is not None:
                    self._end(work, deliveries)  # the final token has been fed
                else:
                    to_sample.append(i)
                    sampling_works.append(work)
        if answered:
            self._answer(answered_works, logits[answered], deliveries)
        if to_sample:
            sampled = sample(logits[to_sample], [w.sampler for w in sampling_works])
            # Each reply costs the event loop and the client about the same whatever it carries
            # (measured: about 100 us of CPU together), so a batch of many generations wakes each
            # reader every few tokens: the replies per batch stay bounded while the batch grows.
            # Up to replies_per_batch generations, every token is sent at once.
            reply_tokens = -(-len(sampling_works) // self.options.replies_per_batch)
            for generation, token in zip(sampling_works, sampled.tolist(), strict=True):
                outcome = generation.emit(token, deliveries, reply_tokens)
                if outcome is Emitted.DONE:
                    self._end(generation, deliveries)
                elif outcome is Emitted.CONTINUE:
                    self._requeue(generation, now)
                # Emitted.PAUSED: the reader resumes it through TokenChannel.take

    def _answer(self, works: list[StepWork], logits: np.ndarray, deliveries: list[Delivery]) -> None:
        requests = [work.request for work in works]
        logprobs = log_softmax(logits)  # (R, V)
        sampled_rows = [i for i, r in enumerate(requests) if r.sampler is not None]
        sampled: dict[int, int] = {}
        if sampled_rows:
            samplers = [s for s in (r.sampler for r in requests) if s is not None]
            tokens = sample(logits[sampled_rows], samplers)
            sampled = dict(zip(sampled_rows, tokens.tolist(), strict=True))
        widest = max(r.top_k for r in requests)
        ranked = top_k(logprobs, widest)  # (R, k) ids, most likely first
        # Whole-batch conversions to Python lists: one numpy call each instead of two per row.
        ranked_ids = ranked.tolist()
        rows, vocab = logprobs.shape
        # Flat indexing: take_along_axis's values at a fraction of its cost on small batches.
        ranked_logprobs = logprobs.ravel()[ranked + (np.arange(rows) * vocab)[:, None]].tolist()
        for i, (work, request) in enumerate(zip(works, requests, strict=True)):
            ids, values = ranked_ids[i], ranked_logprobs[i]
            if request.top_k < widest:
                ids, values = ids[: request.top_k], values[: request.top_k]
            work.result = StepResult(
                top_ids=ids,
                top_logprobs=values,
                logits=logits[i].tolist() if request.return_logits else None,
                sampled_token=sampled.get(i),
                consumed=work.consumed,
            )
            deliveries.append(functools.partial(work.finish, None))

    def _requeue(self, work: Work, now: float) -> None:
        work.ready_at = now
        self._ready.append(work)

    def _end(
        self,
        work: Work,
        deliveries: list[Delivery],
        *,
        cancelled: bool = False,
        error: ServingError | None = None,
    ) -> None:
        """Let go of a work; roll its rows back unless it completed."""
        outcome: BaseException | None = asyncio.CancelledError() if cancelled else error
        if outcome is not None and work.saved is not None:
            self.engine.write_rows(work.saved)
        if isinstance(work, GenerateWork):
            work.channel.finish(work.finish_reason if outcome is None else None, outcome)
            deliveries.append(work.channel.wake)
        deliveries.append(functools.partial(work.finish, outcome))

    def _deliver(self, deliveries: list[Delivery]) -> None:
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_run_all, deliveries)


def _run_all(deliveries: list[Delivery]) -> None:
    for deliver in deliveries:
        deliver()
