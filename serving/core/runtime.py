"""The serving domain: what each RPC does, without protobuf. The servicer is a thin layer on it.

Runtime ties the model registry, the session manager and the batchers together and validates
every request at this boundary, before anything changes, so a failed request never changes any
session's state. Its methods run on the event loop; inference runs on the batchers' threads.

What operations and the state stores use, in one place:
- `draining`: when True, new sessions are refused with UNAVAILABLE; open ones keep working.
- `sessions`: iterate open sessions (snapshots, metrics); `registry`: add/retire versions
  (hot reload); `owner` arguments: the authenticated identity (auth), checked on every lookup.
- `recovery`, a SessionStore (with --redis-url, serving.state.recovery.SessionRecovery): opening
  a session claims its id in the store, requests save the session's state as the save policy
  says, and a lookup of a session this replica does not hold restores it from the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from contract.sampling import Sampling
from contract.tokenizer import TEXT_TOKENIZERS, TokenizerError
from serving.core.batcher import (
    FinishReason,
    GenerateWork,
    PredictionRequest,
    StepResult,
    StepWork,
    TokenChannel,
    Work,
)
from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ResourceExhaustedError,
    SessionNotFoundError,
    UnavailableError,
    shown,
)
from serving.core.interface import GenerateRequestFields
from serving.core.registry import LoadedModel, ModelRegistry
from serving.core.sampling import Sampler, SamplingParams
from serving.core.sessions import Session, SessionLimits, SessionManager
from serving.settings import ServerSettings

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


def _settle(
    future: asyncio.Future[StepResult], result: StepResult | None, error: BaseException | None
) -> None:
    """Hand a step's outcome to its handler, unless the handler has gone (its future cancelled)."""
    if future.done():
        return
    if error is None:
        assert result is not None, "a completed StepWork has its result"
        future.set_result(result)
    elif isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)


class SessionStore(Protocol):
    """Where sessions are kept beyond this process, so that another replica can restore them.

    The runtime calls `opened`, `stepped`, `restore` and `flushed`; the server calls `start`,
    `save_all` (at shutdown, after the last request) and `close`. Implemented by
    serving.state.recovery.SessionRecovery (Redis); the core never imports it.
    """

    async def start(self) -> None:
        """Begin serving (the event loop is running)."""

    async def save_all(self) -> int:
        """Save every open session; returns how many were saved."""

    async def close(self) -> None:
        """Let pending operations finish and release the store."""

    async def opened(self, session: Session) -> None:
        """A session was opened here: record it (raises AlreadyExistsError for an id in use)."""

    def stepped(self, session: Session) -> Awaitable[Any] | None:
        """A request changed the session; returns the save to wait for, if the answer must."""

    async def restore(self, session_id: str, owner: str | None, missing: SessionNotFoundError) -> Session:
        """The session with this id from the store, opened here; raises `missing` (or a
        SessionNotFoundError saying why) when it cannot be restored."""

    async def flushed(self, session_id: str) -> None:
        """The session was closed: forget its saved state."""


# A Generate request's fields, as every front end hands them to the core.
GenerateParams = GenerateRequestFields


@dataclass(frozen=True)
class GenerationChunk:
    tokens: list[int]
    text: str
    finish_reason: FinishReason | None  # set on the last chunk only


class Generation:
    """A running Generate: iterate `chunks()`; `cancel()` stops the work (it leaves the batch)."""

    def __init__(self, session: Session, work: GenerateWork, decode: Callable[[list[int]], str]) -> None:
        self.session = session
        self.model = session.model
        self.work = work
        self._decode = decode

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Tokens as they come, several per chunk when the reader is slower than the model."""
        while True:
            tokens, finish = await self.work.channel.take()
            yield GenerationChunk(tokens, self._decode(tokens), finish)
            if finish is not None:
                return

    def cancel(self) -> None:
        if not self.work.finished:
            self.work.cancel()


class Runtime:
    """Sessions, steps, resets and generations on the loaded models."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.observer = registry.observer
        self.sessions = SessionManager(
            registry,
            SessionLimits(
                max_sessions=settings.max_sessions,
                idle_timeout_s=settings.session_idle_timeout_s,
                overflow=settings.session_overflow,
                gone_memory=settings.gone_session_memory,
                max_per_owner=settings.max_sessions_per_token,
            ),
            self.observer,
        )
        self.draining = False
        # With --redis-url: sessions are saved to and restored from Redis (serving.state.recovery).
        self.recovery: SessionStore | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the model workers and the expiry sweep on the running event loop."""
        loop = asyncio.get_running_loop()
        self.registry.start(loop)
        self._sweeper = loop.create_task(self._sweep(), name="rnnserve-session-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        # Joining the worker threads blocks (at most one batch); keep the loop responsive.
        await asyncio.get_running_loop().run_in_executor(None, self.registry.stop)

    async def _sweep(self) -> None:
        interval = min(max(self.settings.session_idle_timeout_s / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval)
            expired = self.sessions.expire_idle()
            if expired:
                log.info("expired %d idle sessions", expired)

    # ----- validation -------------------------------------------------------------------------

    def check_tokens(self, model: LoadedModel, ids: Sequence[int], what: str = "a chunk") -> np.ndarray:
        """Token ids as (n,) int64; raises InvalidArgumentError / ResourceExhaustedError."""
        count = len(ids)
        if count == 0:
            raise InvalidArgumentError(f"{what} needs at least one token id", Reason.NO_TOKENS)
        if count > self.settings.max_tokens_per_request:
            raise ResourceExhaustedError(
                f"{what} has {count} tokens, over the limit of {self.settings.max_tokens_per_request} "
                f"tokens per request (--max-tokens-per-request); send them in several chunks",
                Reason.TOO_MANY_TOKENS,
                limit=self.settings.max_tokens_per_request,
            )
        # fromiter reads a protobuf repeated field 5x faster than np.array (measured: 1.3 vs 7 us).
        tokens = np.fromiter(ids, np.int64, count)
        vocab_size = model.vocab_size
        if count <= 16:  # the usual chunk: plain comparisons beat numpy's per-call overhead
            for token in ids:
                if token < 0 or token >= vocab_size:
                    raise self._outside(model, token)
        else:
            self._check_range(model, tokens)
        return tokens

    def _check_range(self, model: LoadedModel, tokens: np.ndarray) -> None:
        bad = (tokens < 0) | (tokens >= model.vocab_size)
        if bad.any():
            raise self._outside(model, int(tokens[np.argmax(bad)]))

    def _outside(self, model: LoadedModel, token: int) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"token id {token} is outside the vocabulary of model {model.name!r} version "
            f"{model.version} (ids 0..{model.vocab_size - 1})",
            Reason.TOKEN_OUT_OF_VOCABULARY,
            model=model.name,
            version=model.version,
            token=token,
            vocabSize=model.vocab_size,
        )

    def check_admission(self, model: LoadedModel) -> None:
        """Refuse new work on `model` while its batch queue is full (ResourceExhaustedError).

        Only new requests are refused: a generation already admitted, or a long chunk's later
        pieces, go back to the queue without this check. The bound keeps a saturated server's
        queueing delay (and memory) bounded, and a refused caller learns it at once: the check
        is one queue-length read, made before anything changes.
        """
        waiting = model.batcher.backlog
        if waiting >= self.settings.max_queue_steps:
            raise ResourceExhaustedError(
                f"{model.label} has {waiting} requests waiting for a batch, its limit "
                f"(--max-queue-steps {self.settings.max_queue_steps}); retry later or on another replica",
                Reason.QUEUE_FULL,
                model=model.name,
                version=model.version,
                limit=self.settings.max_queue_steps,
            )

    def sampling(self, model: LoadedModel, fields: Sampling) -> SamplingParams:
        return SamplingParams.validated(
            fields.temperature, fields.top_k, fields.top_p, fields.seed, model.vocab_size
        )

    def prediction_request(
        self, model: LoadedModel, top_k: int, return_logits: bool, sampling: Sampling | None
    ) -> PredictionRequest:
        """Validated prediction options; a Stream keeps one (its sampler's draws continue)."""
        if top_k > model.vocab_size:
            raise InvalidArgumentError(
                f"top_k must be at most the vocabulary size {model.vocab_size} of "
                f"{model.label} (0 means {DEFAULT_TOP_K}), got {top_k}",
                option="top_k",
            )
        sampler = Sampler(self.sampling(model, sampling)) if sampling is not None else None
        return PredictionRequest(top_k or min(DEFAULT_TOP_K, model.vocab_size), return_logits, sampler)

    # ----- sessions ---------------------------------------------------------------------------

    async def open_session(
        self, model_name: str, version: int = 0, owner: str | None = None, session_id: str | None = None
    ) -> Session:
        """Open a session; `session_id` is an id the client proposed (serving.frontend.affinity)."""
        session = self._open_here(model_name, version, owner, session_id)
        if self.recovery is not None:
            await self.recovery.opened(session)
        return session

    def _open_here(
        self, model_name: str, version: int, owner: str | None, session_id: str | None = None
    ) -> Session:
        if self.draining:
            raise UnavailableError(
                "the server is shutting down and takes no new sessions; retry on another replica"
            )
        if not model_name:
            raise InvalidArgumentError(
                "a model name is needed to open a session (see ListModels)", Reason.MALFORMED_REQUEST
            )
        model = self.registry.resolve(model_name, version)
        # SessionIdInUseError (ALREADY_EXISTS) for an open or reserved proposed id, whoever holds it.
        return self.sessions.create(model, owner, session_id)

    async def find_session(self, session_id: str, owner: str | None = None) -> Session:
        """The open session with this id and owner; with Redis, one this replica does not hold
        is restored from there. Raises SessionNotFoundError saying why there is none."""
        if not session_id:
            raise InvalidArgumentError("session_id is empty", Reason.MALFORMED_REQUEST)
        try:
            return self.sessions.get(session_id, owner)
        except SessionNotFoundError as missing:
            if self.recovery is None:
                raise
            return await self.recovery.restore(session_id, owner, missing)

    async def step(
        self, session: Session, tokens: np.ndarray, request: PredictionRequest
    ) -> tuple[StepResult, int]:
        """Run validated tokens through the session; returns the prediction and the new position."""
        await self.sessions.acquire(session)
        start_position = session.position
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

        def finished(work: Work, error: BaseException | None) -> None:
            self._step_finished(session, request, tokens, error)
            _settle(future, work.result if isinstance(work, StepWork) else None, error)

        work = StepWork(session.slot, tokens, request, self.settings.prompt_piece_tokens, finished)
        try:
            self.check_admission(session.model)
            session.model.batcher.submit(work)
        except BaseException:
            self.sessions.release(session)
            raise
        try:
            result = await future
        except asyncio.CancelledError:
            # The session stays held until the worker lets go of the work: it is dropped if it
            # has not run, rolled back if it ran some of its pieces.
            work.cancel()
            raise
        await self._saved(session)
        return result, start_position + result.consumed

    async def _saved(self, session: Session) -> None:
        """After a request changed the session: its save, when the policy wants the answer to
        wait for it (Redis, every step); other saves due run in the background."""
        if self.recovery is not None:
            save = self.recovery.stepped(session)
            if save is not None:
                await asyncio.shield(save)  # saved even if the caller goes away meanwhile

    def _step_finished(
        self, session: Session, request: PredictionRequest, tokens: np.ndarray, error: BaseException | None
    ) -> None:
        if error is None:
            session.position += len(tokens)
            sampled = 0 if request.sampler is None else 1
            self.observer.tokens_processed(session.model.name, session.model.version, len(tokens), sampled)
        self.sessions.release(session)

    async def reset(self, session: Session) -> None:
        await self.sessions.acquire(session)
        try:
            session.model.engine.reset_slot(session.slot)
            session.position = 0
        finally:
            self.sessions.release(session)
        await self._saved(session)

    async def close(self, session: Session) -> None:
        """Close after any request in flight on the session has finished."""
        await self.sessions.acquire(session)
        self.sessions.release(session)
        self.sessions.close(session)
        if self.recovery is not None:
            await self.recovery.flushed(session.id)  # its record is deleted before the answer

    # ----- generation ---------------------------------------------------------------------------

    async def generate(self, params: GenerateParams, owner: str | None = None) -> Generation:
        """Validate a Generate, open or take its session, and start the generation."""
        if params.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be at least 1", option="max_new_tokens")
        if params.max_new_tokens > self.settings.max_new_tokens:
            raise ResourceExhaustedError(
                f"max_new_tokens {params.max_new_tokens} is over the server's "
                f"limit of {self.settings.max_new_tokens} (--max-new-tokens)",
                Reason.MAX_NEW_TOKENS_EXCEEDED,
                limit=self.settings.max_new_tokens,
            )
        if params.prompt_tokens and params.prompt_text:
            raise InvalidArgumentError(
                "give the prompt as prompt_tokens or prompt_text, not both", Reason.INVALID_PROMPT
            )
        session: Session | None = None
        if params.session_id:
            session = await self.find_session(params.session_id, owner)
            model = session.model
            if params.model and params.model != model.name:
                raise InvalidArgumentError(
                    f"session {session.id} is on model {model.name!r}, "
                    f"not {shown(params.model)}; leave model empty to continue it",
                    Reason.SESSION_MODEL_MISMATCH,
                    sessionId=session.id,
                    model=model.name,
                )
            if params.version and params.version != model.version:
                raise InvalidArgumentError(
                    f"session {session.id} is on version {model.version}, "
                    f"not {params.version}; leave version 0 to continue it",
                    Reason.SESSION_MODEL_MISMATCH,
                    sessionId=session.id,
                    model=model.name,
                    version=model.version,
                )
        elif params.model:
            if self.draining:
                raise UnavailableError("the server is shutting down and takes no new sessions")
            model = self.registry.resolve(params.model, params.version)
        else:
            raise InvalidArgumentError(
                "give model (to start a new session) or session_id (to continue one)",
                Reason.MALFORMED_REQUEST,
            )
        sampler = Sampler(self.sampling(model, params.sampling))
        prompt = self._prompt(model, params)
        limit = self.settings.max_tokens_per_request
        if len(params.stop_tokens) > limit:
            # Checked before converting: a message full of stop tokens would otherwise hold the
            # event loop for a fraction of a second (measured: 0.6 s for 4 million ids).
            raise ResourceExhaustedError(
                f"{len(params.stop_tokens)} stop tokens are over the limit of {limit} tokens per "
                f"request (--max-tokens-per-request)",
                Reason.TOO_MANY_TOKENS,
                limit=limit,
            )
        stop_tokens = np.fromiter(params.stop_tokens, np.int64, len(params.stop_tokens))
        self._check_range(model, stop_tokens)
        if session is None and len(prompt) == 0:
            raise InvalidArgumentError(
                "a new session needs a prompt (prompt_tokens or prompt_text)", Reason.INVALID_PROMPT
            )
        if session is not None and len(prompt) == 0 and session.position == 0:
            raise InvalidArgumentError(
                f"session {session.id} has consumed no tokens yet, so there is no "
                f"prediction to continue from; give a prompt",
                Reason.INVALID_PROMPT,
                sessionId=session.id,
            )
        self.check_admission(model)  # before a session is opened for a request to be refused
        ephemeral = session is None and not params.keep_session
        opened = session is None
        if session is None:
            session = self._open_here(model.name, model.version, owner, params.new_session_id)
            if self.recovery is not None and not ephemeral:
                await self.recovery.opened(session)
        await self.sessions.acquire(session)  # immediate for a new session
        held = session
        channel = TokenChannel(self.settings.generate_buffer_tokens)
        work = GenerateWork(
            session.slot,
            prompt,
            sampler,
            params.max_new_tokens,
            frozenset(stop_tokens.tolist()),
            feed_final=not ephemeral,
            channel=channel,
            rollback=not ephemeral,
            on_finish=lambda done, error: self._generation_finished(held, ephemeral, done, error),
        )
        channel.resume = lambda: model.batcher.submit(work)
        try:
            self.check_admission(model)  # again: a continued session may have waited for its turn
            model.batcher.submit(work)
        except BaseException as error:
            work.finish(error)
            if opened and not session.closed:
                # The caller never learns the id of a kept session whose Generate failed here.
                self.sessions.withdraw(session)
            raise
        return Generation(session, work, self._decoder(model))

    def _prompt(self, model: LoadedModel, params: GenerateParams) -> np.ndarray:
        if params.prompt_text:
            if model.tokenizer.kind not in TEXT_TOKENIZERS:
                raise InvalidArgumentError(
                    f"{model.label} has a {model.tokenizer.kind!r} tokenizer without text; "
                    f"send prompt_tokens",
                    Reason.INVALID_PROMPT,
                    model=model.name,
                )
            limit = self.settings.max_tokens_per_request
            if len(params.prompt_text) > limit:
                # Both text tokenizers make at least one token per character, so this text is over
                # the limit; refusing before encoding spares the event loop (0.24 s for 4 MB).
                raise ResourceExhaustedError(
                    f"the prompt has {len(params.prompt_text)} characters, at least as many tokens, "
                    f"over the limit of {limit} tokens per request (--max-tokens-per-request)",
                    Reason.TOO_MANY_TOKENS,
                    limit=limit,
                )
            try:
                ids = model.tokenizer.encode(params.prompt_text)
            except TokenizerError as error:
                raise InvalidArgumentError(
                    f"prompt_text cannot be encoded for {model.label}: {error}",
                    Reason.INVALID_PROMPT,
                    model=model.name,
                ) from None
            return self.check_tokens(model, ids, "the prompt")
        if params.prompt_tokens:
            return self.check_tokens(model, params.prompt_tokens, "the prompt")
        return np.empty(0, np.int64)

    def _decoder(self, model: LoadedModel) -> Callable[[list[int]], str]:
        tokenizer = model.tokenizer
        if tokenizer.kind not in TEXT_TOKENIZERS:
            return lambda tokens: ""
        decode = tokenizer.stream_decoder()
        size = tokenizer.vocab_size
        # Ids beyond the tokenizer (a model vocabulary with extra ids, e.g. padding) have no text.
        return lambda tokens: decode([t for t in tokens if t < size])

    def _generation_finished(
        self, session: Session, ephemeral: bool, work: Work, error: BaseException | None
    ) -> None:
        if error is None:
            session.position += work.consumed
            assert isinstance(work, GenerateWork)
            self.observer.tokens_processed(
                session.model.name, session.model.version, len(work.prompt), work.produced
            )
        self.sessions.release(session)
        if ephemeral and not session.closed:
            self.sessions.close(session)
        elif error is None and self.recovery is not None:
            self.recovery.stepped(session)  # in the background: the answer has gone
