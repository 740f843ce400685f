"""Writing into a model repository: names, version numbers, and atomic publication.

    <repository>/<name>/<version>/model.onnx, config.json     a published version
    <repository>/<name>/.tmp-<random>/                         an export in progress

A version appears with one os.rename of a complete, fsynced staging directory, so a reader (the
server polling the repository) sees either nothing or the whole version. Two exports racing for
the same number cannot both win: renaming onto an existing, non-empty directory fails, and the
loser is told so (its config.json already names the number it chose, so it does not retry).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.model_name import MODEL_NAME_RULE, valid_model_name
from export.errors import RepositoryError, VersionExistsError

STAGING_PREFIX = ".tmp-"


def check_name(name: str) -> str:
    if not valid_model_name(name):
        raise RepositoryError(f"invalid model name {name[:200]!r}: a model name is {MODEL_NAME_RULE}")
    return name


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"invalid version {version!r}: versions are positive integers")
    return version


def check_repository(repository: Path, name: str) -> Path:
    """<repository>/<name>, checked but not created; RepositoryError when a path is not a directory."""
    check_name(name)
    for path in (repository, repository / name):
        if path.exists() and not path.is_dir():
            raise RepositoryError(f"{path} exists and is not a directory; a model repository must be one")
    return repository / name


def published_versions(model_dir: Path) -> list[int]:
    """Version numbers present under <repository>/<name> (directories named by a positive int)."""
    if not model_dir.is_dir():
        return []
    versions = []
    for entry in model_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
            versions.append(int(entry.name))
    return sorted(versions)


def choose_version(model_dir: Path, version: int | None) -> int:
    """The requested version if free, else the next free number (max existing + 1)."""
    if version is None:
        return max(published_versions(model_dir), default=0) + 1
    check_version(version)
    if (model_dir / str(version)).exists():
        raise VersionExistsError(
            f"version {version} of model {model_dir.name!r} already exists in {model_dir.parent}; "
            "choose another --version or omit it to take the next free number"
        )
    return version


@contextmanager
def staging_directory(model_dir: Path) -> Iterator[Path]:
    """A fresh <model_dir>/.tmp-<random>/, creating <model_dir> (and the repository) if needed.

    On exit the staging directory is removed unless `publish` renamed it; directories this call
    created are removed again when they are left empty, so a failed export leaves no trace.
    """
    created = []  # missing directories, deepest first
    path = model_dir
    while not path.exists():
        created.append(path)
        path = path.parent
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RepositoryError(f"cannot create {model_dir}: {error.strerror}") from None
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        # mkdtemp makes it private (0700); a published version must be readable by the server.
        staging.chmod(0o755)
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        for directory in created:
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync, so a published version never holds a file the disk has not got."""
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(staging: Path, model_dir: Path, version: int) -> Path:
    """Rename the complete staging directory to <model_dir>/<version>; fail if it is taken."""
    fsync_directory(staging)
    target = model_dir / str(version)
    taken = VersionExistsError(
        f"version {version} of model {model_dir.name!r} was taken by another export while this one "
        "ran; nothing was published, run the export again"
    )
    # The check gives the clear message in the usual case; the rename itself is what is race-safe:
    # it fails with ENOTEMPTY/EEXIST when a concurrent export renamed its version there first.
    if target.exists():
        raise taken
    try:
        os.rename(staging, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise taken from None
        raise RepositoryError(f"cannot publish {target}: {error.strerror}") from None
    fsync_directory(model_dir)
    return target
