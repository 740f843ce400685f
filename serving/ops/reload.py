"""Hot reload: new model versions in the repository are verified, loaded and served while serving.

The watcher looks at the repository every `--reload-interval-s` seconds and at once on SIGHUP
(`trigger`). For every model that is not pinned, a complete version newer than the one new
sessions get is loaded off the event loop (registry.load_version: sha256 of model.onnx against
config.json, the graph against the config, one test run), then takes the model's new sessions;
the versions before it are retired: each keeps answering its open sessions and unloads when the
last one ends. A model that appears in the repository for the first time is served the same way.

A version that fails is refused with one log line naming why (and the model_refused metric); the
version already serving goes on. A refused directory is remembered by the size and modification
time of its files and tried again only once they change (an export finished copying, a file was
replaced), so a broken version costs one log line, not one per poll. Exports made with
`rnnserve export` appear atomically (written under NAME/.tmp-*, then renamed) and are never seen
half-written; a version copied in by hand may be, and is then refused until its files stop
changing and check out.

Removing a version directory does not unload it (its sessions go on); to roll back, export the
good checkpoint again as a new version, or pin the version (--pin NAME=VERSION) and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract import signature as sig
from serving.core.engine import EngineError
from serving.core.registry import LoadedModel, ModelRegistry, batching_options, engine_options, load_version
from serving.core.repository import ModelManifest, RepositoryError, RepositoryScan, scan_repository
from serving.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fingerprint:
    """What a version directory holds, cheaply: (inode, size, mtime) of the directory's files."""

    entries: tuple[tuple[str, int, int, int], ...]

    @classmethod
    def of(cls, version_dir: Path) -> Fingerprint:
        entries = []
        for name in (sig.MODEL_FILE, sig.CONFIG_FILE):
            try:
                stat = os.stat(version_dir / name)
            except OSError:
                entries.append((name, -1, -1, -1))  # missing: appears as a change once it exists
                continue
            entries.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return cls(tuple(entries))


class RepositoryWatcher:
    """Finds, verifies and serves new model versions (see the module docstring).

    `on_change` runs on the event loop after versions were added (the server updates its health
    statuses). Construct it after the registry's first load: it remembers the versions that
    load refused, so they are not refused (and logged) again until they change.
    """

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        on_change: Callable[[], object] | None = None,
        state_on_device: bool | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_change = on_change
        self.state_on_device = state_on_device
        self.checks = 0  # scans done so far
        self._refused: dict[Path, Fingerprint] = {}
        self._scan_error: str | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._remember_startup_refusals()

    def _remember_startup_refusals(self) -> None:
        """The startup load logged its refusals: remember them as refused (blocking, cheap)."""
        try:
            scan = scan_repository(self.settings.repository)
        except RepositoryError:
            return
        for refused in scan.refused:
            self._refused[refused.path] = Fingerprint.of(refused.path)
        pinned = self.settings.pinned_versions
        for name, manifests in scan.versions.items():
            latest = self.registry.latest(name)
            if name in pinned:
                continue
            for manifest in manifests:
                # load_repository tries versions newest first: the ones above what it loaded failed.
                if latest is None or manifest.version > latest.version:
                    self._refused[manifest.path] = Fingerprint.of(manifest.path)

    def trigger(self) -> None:
        """Look at the repository now (SIGHUP)."""
        self._wake.set()

    async def run(self) -> None:
        """Check on every trigger and every interval (0: on triggers only), until cancelled."""
        interval = self.settings.reload_interval_s or None
        while True:
            # asyncio.TimeoutError: the same class as TimeoutError from Python 3.11.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # a bug here must not end hot reload for the server's lifetime
                log.exception("hot reload check failed; trying again at the next poll")

    async def check(self) -> list[LoadedModel]:
        """Scan once and serve every new version that checks out; returns the versions added."""
        async with self._lock:
            self.checks += 1
            loop = asyncio.get_running_loop()
            try:
                scan = await loop.run_in_executor(None, scan_repository, self.settings.repository)
            except RepositoryError as error:
                if str(error) != self._scan_error:  # once per distinct problem, not per poll
                    log.error("hot reload cannot scan the repository: %s; serving what is loaded", error)
                self._scan_error = str(error)
                return []
            self._scan_error = None
            self._note_refusals(scan)
            added = []
            for name, manifests in scan.versions.items():
                if name in self.settings.pinned_versions:
                    continue
                model = await self._serve_newest(name, manifests)
                if model is not None:
                    added.append(model)
            if added and self.on_change is not None:
                result = self.on_change()
                if asyncio.iscoroutine(result):
                    await result
            return added

    def _note_refusals(self, scan: RepositoryScan) -> None:
        """Log each malformed or incomplete version directory once per change of its files."""
        for refused in scan.refused:
            fingerprint = Fingerprint.of(refused.path)
            if self._refused.get(refused.path) == fingerprint:
                continue
            self._refused[refused.path] = fingerprint
            log.error("hot reload refused %s: %s", refused.path, refused.reason)
            self.registry.observer.model_refused(str(refused.path), refused.reason)

    async def _serve_newest(self, name: str, manifests: list[ModelManifest]) -> LoadedModel | None:
        """Load the newest version above the one new sessions get; older ones if it fails."""
        current = self.registry.latest(name)
        floor = current.version if current is not None else 0
        for manifest in sorted(manifests, key=lambda m: m.version, reverse=True):
            if manifest.version <= floor or self.registry.get(name, manifest.version) is not None:
                continue
            fingerprint = Fingerprint.of(manifest.path)  # before loading: a change meanwhile retries
            if self._refused.get(manifest.path) == fingerprint:
                continue
            started = time.perf_counter()
            try:
                model = await asyncio.get_running_loop().run_in_executor(None, self._load, manifest)
            except (RepositoryError, EngineError) as error:
                self._refused[manifest.path] = fingerprint
                log.error(
                    "hot reload refused %s: %s; %s", manifest.path, error, _still_serving(name, current)
                )
                self.registry.observer.model_refused(str(manifest.path), str(error))
                continue
            self._refused.pop(manifest.path, None)
            self._promote(model, time.perf_counter() - started)
            return model
        return None

    def _load(self, manifest: ModelManifest) -> LoadedModel:
        """Blocking: verify and load one version (an executor thread)."""
        return load_version(
            manifest,
            engine_options(self.settings),
            batching_options(self.settings),
            self.registry.observer,
            self.state_on_device,
        )

    def _promote(self, model: LoadedModel, seconds: float) -> None:
        """Serve `model` to new sessions and retire the versions before it (event loop)."""
        self.registry.add(model)
        log.info(
            "hot reload: %s (sha256 %s…) verified and loaded in %.3f s; it takes new sessions",
            model.label,
            model.manifest.model_sha256[:12],
            seconds,
        )
        for older in self.registry.versions(model.name):
            if older is not model and not older.retired:
                log.info(
                    "hot reload: %s retired; its %d open sessions stay on it, and it unloads after "
                    "the last one ends",
                    older.label,
                    older.active_sessions,
                )
                self.registry.retire(older.name, older.version)


def _still_serving(name: str, current: LoadedModel | None) -> str:
    if current is None:
        return f"model {name!r} is not served yet"
    return f"version {current.version} goes on serving {name!r}"
