"""The models being served: loaded versions, which one new sessions get, and when one unloads.

A LoadedModel is one model version ready to run: its validated manifest, tokenizer, engine
(onnxruntime session + state pool) and batcher (worker thread). The registry counts each
version's sessions, so a version can be retired while serving (hot reload): it takes no new
sessions, keeps answering the ones it has, and unloads when its last session ends.

All registry methods run on the event loop thread, except `load_version`, which is blocking
(reading, verifying, compiling and test-running the model) and may run anywhere, e.g. in an
executor (hot reload loads new versions that way, see serving.ops.reload).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from contract.model_name import MODEL_NAME_RULE, valid_model_name
from contract.ort_errors import ORT_ERRORS
from contract.tokenizer import Tokenizer
from serving.core.batcher import Batcher, BatchingOptions
from serving.core.engine import Engine, EngineError, EngineOptions, load_engine
from serving.core.errors import NotFoundError, Reason, shown
from serving.core.observers import ServerObserver
from serving.core.repository import (
    ModelManifest,
    RepositoryError,
    load_model_proto,
    scan_repository,
    serving_candidates,
)
from serving.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """One servable model version; shared by all of its sessions."""

    manifest: ModelManifest
    tokenizer: Tokenizer
    engine: Engine
    batcher: Batcher
    active_sessions: int = 0
    retired: bool = False  # no new sessions; unloads when active_sessions reaches 0
    loaded: bool = True  # False once unloaded

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def label(self) -> str:
        return self.manifest.label


def engine_options(settings: ServerSettings) -> EngineOptions:
    return EngineOptions(
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        capacity=settings.max_sessions,
    )


def batching_options(settings: ServerSettings) -> BatchingOptions:
    return BatchingOptions(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_s,
        piece_tokens=settings.prompt_piece_tokens,
    )


def load_version(
    manifest: ModelManifest,
    engines: EngineOptions,
    batching: BatchingOptions,
    observer: ServerObserver,
    state_on_device: bool | None = None,
) -> LoadedModel:
    """Verify, load and test-run one version (blocking). Raises RepositoryError or EngineError.

    Verification: model.onnx's sha256 against config.json, the graph's metadata, names, dtypes
    and shapes against the config (repository.load_model_proto), then one run of one token whose
    logits must have the vocabulary's size and be finite, so a model that loads but cannot serve
    is refused here rather than failing its first request.
    """
    model_proto = load_model_proto(manifest)
    engine = load_engine(manifest, model_proto, engines, state_on_device=state_on_device)
    trial_run(engine)
    return LoadedModel(manifest, manifest.make_tokenizer(), engine, Batcher(engine, batching, observer))


def trial_run(engine: Engine) -> None:
    """Run token 0 through a scratch slot; raise EngineError unless the logits are (1, vocab) and
    finite. Call before the version's worker starts (it uses the engine directly)."""
    manifest = engine.manifest
    slot = engine.acquire_slot()
    try:
        logits = engine.step(
            np.array([slot], np.int64), np.zeros((1, 1), np.int64), np.ones(1, np.int32)
        )  # (1, vocab)
    except ORT_ERRORS as error:
        raise EngineError(f"{manifest.label}: the test run failed: {error}") from None
    finally:
        engine.release_slot(slot)  # the next session to take it starts from the zero state
    if logits.shape != (1, manifest.vocab_size):
        raise EngineError(
            f"{manifest.label}: the test run gave logits of shape {logits.shape}, "
            f"expected (1, {manifest.vocab_size})"
        )
    if not np.isfinite(logits).all():
        raise EngineError(f"{manifest.label}: the test run gave non-finite logits (NaN or inf weights?)")


class ModelRegistry:
    """Loaded versions by name; resolves (name, version) for new sessions; unloads retired ones."""

    def __init__(self, observer: ServerObserver | None = None) -> None:
        self.observer = observer or ServerObserver()
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every loaded version's worker thread on `loop`."""
        self._loop = loop
        for model in self:
            model.batcher.start(loop)

    def stop(self) -> None:
        """Stop every worker thread (their queued requests fail with UNAVAILABLE)."""
        for model in self:
            model.batcher.stop()
        self._loop = None

    def add(self, model: LoadedModel, retired: bool = False) -> None:
        """Serve a newly loaded version; new sessions of its name go to the highest live version.

        `retired` adds it closed to new sessions (restoring a snapshot's sessions on an older
        version); the caller retires it again once those sessions are in, so that it unloads.
        """
        versions = self._models.setdefault(model.name, {})
        if model.version in versions:
            raise ValueError(f"{model.label} is already loaded")
        model.retired = retired
        versions[model.version] = model
        if self._loop is not None:
            model.batcher.start(self._loop)
        self.observer.model_loaded(model.name, model.version, model.engine.providers)

    def retire(self, name: str, version: int) -> None:
        """Stop sending new sessions to a version; it unloads once its last session ends."""
        model = self._models[name][version]
        model.retired = True
        if model.active_sessions == 0:
            self._unload(model)

    def _unload(self, model: LoadedModel) -> None:
        model.loaded = False
        model.batcher.stop()
        versions = self._models[model.name]
        del versions[model.version]
        if not versions:
            del self._models[model.name]
        log.info("unloaded %s", model.label)
        self.observer.model_unloaded(model.name, model.version)

    def session_started(self, model: LoadedModel) -> None:
        model.active_sessions += 1

    def session_ended(self, model: LoadedModel) -> None:
        model.active_sessions -= 1
        if model.retired and model.active_sessions == 0 and model.loaded:
            self._unload(model)

    def __iter__(self) -> Iterator[LoadedModel]:
        """Every loaded version, by name, newest first."""
        for name in sorted(self._models):
            yield from self.versions(name)

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    def all_loaded(self) -> list[LoadedModel]:
        """Every loaded version, unordered; safe to call from another thread (metrics scrapes):
        each step copies a dict's values in one operation, atomic under the GIL."""
        return [model for versions in list(self._models.values()) for model in list(versions.values())]

    def get(self, name: str, version: int) -> LoadedModel | None:
        """The loaded version (retired or not), or None."""
        return self._models.get(name, {}).get(version)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[LoadedModel]:
        """Loaded versions of a model, newest first (retired ones included)."""
        return [self._models[name][v] for v in sorted(self._models.get(name, {}), reverse=True)]

    def latest(self, name: str) -> LoadedModel | None:
        """The version new sessions of `name` get: the highest one not retired."""
        return next((m for m in self.versions(name) if not m.retired), None)

    def _missing_model(self, name: str) -> NotFoundError:
        """NOT_FOUND for a name this registry does not serve, whatever its length (echoed cut)."""
        rule = "" if valid_model_name(name) else f" (model names are {MODEL_NAME_RULE})"
        return NotFoundError(
            f"model {shown(name)} is not served{rule}; models: {self.names() or 'none'}",
            Reason.MODEL_NOT_FOUND,
            model=name,
        )

    def describe(self, name: str, version: int = 0) -> LoadedModel:
        """A loaded version for the catalogue (retired ones too); 0 = the latest."""
        if name not in self._models:
            raise self._missing_model(name)
        if version == 0:
            found = self.latest(name) or self.versions(name)[0]
            return found
        model = self._models[name].get(version)
        if model is None:
            loaded = [m.version for m in self.versions(name)]
            raise NotFoundError(
                f"model {name!r} has no loaded version {version}; loaded versions: {loaded}",
                Reason.VERSION_NOT_FOUND,
                model=name,
                version=version,
            )
        return model

    def resolve(self, name: str, version: int = 0) -> LoadedModel:
        """The version a new session of (name, version) runs on; 0 = the latest live one."""
        if name not in self._models:
            raise self._missing_model(name)
        open_versions = [m.version for m in self.versions(name) if not m.retired]
        if version == 0:
            model = self.latest(name)
        else:
            model = self._models[name].get(version)
            if model is not None and model.retired:
                model = None
        if model is None:
            raise NotFoundError(
                f"model {name!r} has no version {version} open to new sessions; "
                f"versions open to new sessions: {open_versions or 'none'} (0 = latest)",
                Reason.VERSION_NOT_FOUND,
                model=name,
                version=version,
            )
        return model


def load_repository(
    settings: ServerSettings,
    observer: ServerObserver | None = None,
    state_on_device: bool | None = None,
    allow_empty: bool = False,
) -> ModelRegistry:
    """Scan the repository and load each model's pinned or newest loadable version.

    A version that fails validation or loading is refused with a log line naming why, and the
    next older version of that model is tried. Raises RepositoryError when the repository is not
    a directory, and when nothing can be served unless `allow_empty` (a server that waits for
    models to be exported into its repository).
    """
    registry = ModelRegistry(observer)
    scan = scan_repository(settings.repository)
    for refused in scan.refused:
        log.error("refused %s: %s", refused.path, refused.reason)
        registry.observer.model_refused(str(refused.path), refused.reason)
    engines, batching = engine_options(settings), batching_options(settings)
    for name, candidates in serving_candidates(scan, settings.pinned_versions).items():
        for manifest in candidates:
            try:
                registry.add(load_version(manifest, engines, batching, registry.observer, state_on_device))
            except (RepositoryError, EngineError) as error:
                log.error("refused %s: %s", manifest.path, error)
                registry.observer.model_refused(str(manifest.path), str(error))
                continue
            break
        else:
            log.error("model %r has no servable version", name)
    if len(registry) == 0 and not allow_empty:
        raise RepositoryError(
            f"no servable model in {settings.repository} (expected NAME/VERSION/model.onnx and "
            f"config.json; see the errors above)"
        )
    return registry
