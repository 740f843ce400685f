"""`LocalEngine`: the InferenceApi answered by the core in this process (serving.core.interface).

It is what `--frontends 0` and the tests serve through, and what the engine core process runs
behind its IPC channel (serving.engine.core_process), so both paths share every rule of Runtime.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from serving.core.batcher import PredictionRequest, StepResult
from serving.core.errors import InvalidArgumentError, UnavailableError
from serving.core.interface import (
    GeneratedChunk,
    GenerateRequestFields,
    HealthReport,
    ModelInfo,
    ModelVersionInfo,
    Prediction,
    SessionRef,
    StateTensorInfo,
    StepOptions,
)
from serving.core.registry import LoadedModel
from serving.core.runtime import Generation, Runtime
from serving.core.sessions import Session


def prediction(result: StepResult, position: int) -> Prediction:
    return Prediction(result.top_ids, result.top_logprobs, result.logits, result.sampled_token, position)


def version_info(model: LoadedModel) -> ModelVersionInfo:
    manifest = model.manifest
    return ModelVersionInfo(
        name=manifest.name,
        version=manifest.version,
        arch=manifest.arch,
        vocab_size=manifest.vocab_size,
        embedding_size=manifest.embedding_size,
        hidden_size=manifest.hidden_size,
        num_layers=manifest.num_layers,
        pad_id=manifest.pad_id,
        precision=manifest.precision,
        tokenizer_json=model.tokenizer.to_json(),
        state=[
            StateTensorInfo(name, [manifest.num_layers, manifest.hidden_size])
            for name in manifest.state_names
        ],
        model_sha256=manifest.model_sha256,
        active_sessions=model.active_sessions,
        metrics_json=json.dumps(dict(manifest.metrics), sort_keys=True),
    )


@dataclass
class _Binding:
    """A stream's session and its prediction options (a seeded sampler continues its draws)."""

    session: Session
    request: PredictionRequest


class LocalGeneration:
    """A GenerationStream over a Runtime Generation."""

    def __init__(self, generation: Generation, kept: bool) -> None:
        self._generation = generation
        self.session_id = generation.session.id if kept else ""
        self.model = generation.model.name
        self.version = generation.model.version

    async def chunks(self) -> AsyncIterator[GeneratedChunk]:
        async for chunk in self._generation.chunks():
            yield GeneratedChunk(chunk.tokens, chunk.text, int(chunk.finish_reason or 0))

    def cancel(self) -> None:
        self._generation.cancel()


class LocalEngine:
    """InferenceApi on a Runtime in this process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._bindings: dict[int, _Binding] = {}
        self._binding_ids = itertools.count(1)

    def _options(self, model: LoadedModel, options: StepOptions) -> PredictionRequest:
        return self.runtime.prediction_request(model, options.top_k, options.return_logits, options.sampling)

    def _bind(self, session: Session, request: PredictionRequest) -> SessionRef:
        binding = next(self._binding_ids)
        self._bindings[binding] = _Binding(session, request)
        return SessionRef(session.id, session.model.name, session.model.version, binding, session.position)

    async def open_session(
        self,
        model: str,
        version: int = 0,
        owner: str | None = None,
        session_id: str | None = None,
        options: StepOptions | None = None,
    ) -> SessionRef:
        runtime = self.runtime
        if options is None:
            session = await runtime.open_session(model, version, owner, session_id)
            return SessionRef(session.id, session.model.name, session.model.version)
        if not model:
            raise InvalidArgumentError("a model name is needed to open a session (see ListModels)")
        loaded = runtime.registry.resolve(model, version)
        request = self._options(loaded, options)  # validated before the session opens
        session = await runtime.open_session(loaded.name, loaded.version, owner, session_id)
        return self._bind(session, request)

    async def resume(self, session_id: str, owner: str | None, options: StepOptions) -> SessionRef:
        session = await self.runtime.find_session(session_id, owner)
        return self._bind(session, self._options(session.model, options))

    def _bound(self, ref: SessionRef) -> _Binding:
        bound = self._bindings.get(ref.binding)
        if bound is None:
            raise UnavailableError(
                f"the engine core no longer knows this stream of session {ref.id} (it restarted); "
                f"resume the session on a new stream"
            )
        return bound

    async def step(self, ref: SessionRef, tokens: Sequence[int]) -> Prediction:
        bound = self._bound(ref)
        runtime = self.runtime
        ids = runtime.check_tokens(bound.session.model, tokens)
        result, position = await runtime.step(bound.session, ids, bound.request)
        return prediction(result, position)

    async def step_once(
        self, session_id: str, owner: str | None, tokens: Sequence[int], options: StepOptions
    ) -> tuple[SessionRef, Prediction]:
        runtime = self.runtime
        session = await runtime.find_session(session_id, owner)
        request = self._options(session.model, options)
        ids = runtime.check_tokens(session.model, tokens, "a Step")
        result, position = await runtime.step(session, ids, request)
        return SessionRef(session.id, session.model.name, session.model.version), prediction(result, position)

    async def reset(self, ref: SessionRef) -> None:
        await self.runtime.reset(self._bound(ref).session)

    async def close(self, session_id: str, owner: str | None) -> None:
        session = await self.runtime.find_session(session_id, owner)
        await self.runtime.close(session)

    async def release(self, ref: SessionRef, ended: bool) -> None:
        bound = self._bindings.pop(ref.binding, None)
        if bound is None or ended:
            return
        session = bound.session
        if session.closed:
            return
        if self.runtime.settings.close_on_disconnect:
            await self.runtime.close(session)

    async def generate(self, fields: GenerateRequestFields, owner: str | None) -> LocalGeneration:
        generation = await self.runtime.generate(fields, owner)
        return LocalGeneration(generation, kept=bool(fields.session_id) or fields.keep_session)

    def _model_info(self, name: str, versions: list[LoadedModel]) -> ModelInfo:
        latest = self.runtime.registry.latest(name)
        return ModelInfo(name, latest.version if latest else 0, [version_info(m) for m in versions])

    async def list_models(self) -> list[ModelInfo]:
        registry = self.runtime.registry
        return [self._model_info(name, registry.versions(name)) for name in registry.names()]

    async def get_model(self, name: str, version: int = 0) -> ModelInfo:
        model = self.runtime.registry.describe(name, version)
        return self._model_info(model.name, [model])

    async def health(self) -> HealthReport:
        registry = self.runtime.registry
        names = registry.names()
        open_names = [name for name in names if registry.latest(name) is not None]
        return HealthReport(self.runtime.draining, open_names, names)
