"""What a front end may ask of the inference core: `InferenceApi`, with plain values in and out.

A front end (the gRPC servicers, the HTTP server) speaks a protocol and calls an InferenceApi; it
never holds a Session, a LoadedModel or the registry. Two implementations answer the same calls:

- `serving.core.local.LocalEngine`: the core in this process (tests, `--frontends 0`);
- `serving.engine.remote.RemoteRuntime`: the engine core in another process, over the IPC channel.

Everything here is plain data, so that it crosses a process boundary as it is (msgspec encodes
these dataclasses). Errors are the ServingError classes of serving.core.errors on both sides.

A Stream binds its prediction options once (at open or resume): the returned `SessionRef`
carries a `binding`, the core's handle of those options (a seeded sampler's draws continue from
chunk to chunk). `release(ref)` ends the binding when the stream ends, and closes the session when
the server closes sessions on disconnect and the stream did not end it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from contract.sampling import Sampling


@dataclass(frozen=True)
class StepOptions:
    """Prediction options of a Step or a Stream (PredictionOptions in inference.proto)."""

    top_k: int = 0  # 0: the server's default
    return_logits: bool = False
    sampling: Sampling | None = None  # None: no sampled token


@dataclass(frozen=True)
class SessionRef:
    """An open session as a front end sees it."""

    id: str
    model: str
    version: int
    binding: int = 0  # the core's handle of this stream's options; 0: none bound
    position: int = 0  # tokens consumed when the ref was made (open or resume)


@dataclass(frozen=True)
class Prediction:
    """The answer to one step: the next-token distribution after the last consumed token."""

    top_ids: list[int]  # k ids, most likely first
    top_logprobs: list[float]
    logits: list[float] | None  # vocab_size logits, when asked for
    sampled_token: int | None
    position: int  # tokens the session consumed since open or reset


@dataclass(frozen=True)
class StateTensorInfo:
    name: str
    shape: list[int]  # (num_layers, hidden_size) per session


@dataclass(frozen=True)
class ModelVersionInfo:
    """One loaded model version, described (ModelVersion in inference.proto)."""

    name: str
    version: int
    arch: str
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    pad_id: int
    precision: str
    tokenizer_json: str
    state: list[StateTensorInfo]
    model_sha256: str
    active_sessions: int
    metrics_json: str


@dataclass(frozen=True)
class ModelInfo:
    """A model name with its loaded versions, newest first."""

    name: str
    latest_version: int  # 0 when no version takes new sessions
    versions: list[ModelVersionInfo] = field(default_factory=list)


@dataclass(frozen=True)
class HealthReport:
    """What the health services report: serving at all, and the names that take new sessions."""

    draining: bool
    open_models: list[str]  # names with a version that takes new sessions
    models: list[str]  # every loaded name


@dataclass(frozen=True)
class GenerateRequestFields:
    """A Generate request's fields (GenerateRequest in inference.proto)."""

    model: str = ""
    version: int = 0
    session_id: str = ""
    prompt_tokens: Sequence[int] = ()
    prompt_text: str = ""
    max_new_tokens: int = 0
    sampling: Sampling = Sampling()
    stop_tokens: Sequence[int] = ()
    keep_session: bool = False
    new_session_id: str | None = None  # the id a kept new session takes


@dataclass(frozen=True)
class GeneratedChunk:
    tokens: list[int]
    text: str
    finish_reason: int  # 0 until the last chunk; then FinishReason (1 length, 2 stop)


class GenerationStream(Protocol):
    """A running generation: its session and model, its chunks, and a way to stop it."""

    session_id: str  # "" for a generation on a session that is not kept
    model: str
    version: int

    def chunks(self) -> AsyncIterator[GeneratedChunk]:
        """Tokens as they come; the last chunk has a finish_reason."""
        ...

    def cancel(self) -> None:
        """Stop the generation (a no-op once it finished)."""


class InferenceApi(Protocol):
    """The calls every front end makes; see the module docstring for the two implementations."""

    async def open_session(
        self,
        model: str,
        version: int = 0,
        owner: str | None = None,
        session_id: str | None = None,
        options: StepOptions | None = None,
    ) -> SessionRef:
        """Open a session; `session_id` is one the client proposed; `options` bind a stream's options
        (validated before the session opens)."""
        ...

    async def resume(self, session_id: str, owner: str | None, options: StepOptions) -> SessionRef:
        """Take an open session onto a stream with these options."""
        ...

    async def step(self, ref: SessionRef, tokens: Sequence[int]) -> Prediction:
        """Run tokens through a stream's session with its bound options."""
        ...

    async def step_once(
        self, session_id: str, owner: str | None, tokens: Sequence[int], options: StepOptions
    ) -> tuple[SessionRef, Prediction]:
        """A unary Step: find the session, run the tokens, answer."""
        ...

    async def reset(self, ref: SessionRef) -> None:
        """Put the session back at position 0 (zero state)."""
        ...

    async def close(self, session_id: str, owner: str | None) -> None:
        """Close the session (after any request in flight on it)."""
        ...

    async def release(self, ref: SessionRef, ended: bool) -> None:
        """The stream carrying `ref` ended (`ended`: by CONTROL_END); see the module docstring."""
        ...

    async def generate(self, fields: GenerateRequestFields, owner: str | None) -> GenerationStream:
        """Validate a Generate, open or take its session, and start generating."""
        ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def get_model(self, name: str, version: int = 0) -> ModelInfo:
        """One model with one version (`version` 0: the latest); NotFoundError when unknown."""
        ...

    async def health(self) -> HealthReport: ...
