"""The lock files in requirements/ agree with pyproject.toml and constraints.txt (no network).

`make lock` writes them with pip-compile; make, CI and the Dockerfile install from them. A
resolver run needs the package index, so these checks stay offline: every requirement of the
locked extras is pinned at a version it accepts, every pin agrees with constraints.txt, no pin
is left over from a requirement that went, and the serving locks hold no torch.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.deploy import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements"
PROJECT = "rnnserve (pyproject.toml)"
CONSTRAINTS = "-c constraints.txt"
# Where the locks are installed: the images' Python on Linux x86-64.
TARGET = {
    **default_environment(),
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
}


@dataclass
class Lock:
    """One pip-compile output: pins with the parents that pulled each in, and unpinned names."""

    pins: dict[str, str]  # canonical name -> version
    parents: dict[str, set[str]]  # canonical name -> what its `# via` names
    left_out: set[str]  # the "unsafe" packages, installed from elsewhere

    @classmethod
    def read(cls, path: Path) -> Lock:
        pins, parents, left_out = {}, {}, set()
        unsafe_section = False
        for line in path.read_text().splitlines():
            if line.startswith("# The following packages are considered to be unsafe"):
                unsafe_section = True
            elif unsafe_section and line.startswith("# "):
                left_out.add(canonicalize_name(line[2:].strip()))
            elif line and not line.startswith("#"):
                requirement_text, _, via = line.partition("# via ")
                name, _, version = requirement_text.strip().partition("==")
                assert version, f"{path.name}: {line!r} is not an exact pin"
                name = canonicalize_name(name)
                pins[name] = version
                parents[name] = {parent.strip() for parent in via.split(",") if parent.strip()}
        return cls(pins, parents, left_out)


def lock_commands() -> dict[str, list[str]]:
    """Output file -> the extras `make lock` compiles it from (read from the Makefile)."""
    text = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    commands = {}
    for line in recipe.splitlines()[1:]:
        words = shlex.split(line.strip())
        if words and words[0] == "$(LOCK)":
            extras = [words[i + 1] for i, word in enumerate(words) if word == "--extra"]
            commands[words[words.index("-o") + 1]] = extras
    return commands


def constraint_pins() -> dict[str, str]:
    pins = {}
    for raw in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def extra_requirements(extras: list[str]) -> list[Requirement]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET)]


@pytest.fixture(scope="module")
def commands() -> dict[str, list[str]]:
    found = lock_commands()
    assert set(found) == {f"requirements/{name}.txt" for name in ("serve", "serve-gpu", "train", "dev")}
    return found


def test_every_lock_file_is_made_by_make_lock(commands: dict[str, list[str]]) -> None:
    assert {f"requirements/{path.name}" for path in REQUIREMENTS.glob("*.txt")} == set(commands)


def test_locks_pin_every_requirement_of_their_extras(commands: dict[str, list[str]]) -> None:
    for path, extras in commands.items():
        lock = Lock.read(REPO_ROOT / path)
        direct = set()
        for requirement in extra_requirements(extras):
            name = canonicalize_name(requirement.name)
            direct.add(name)
            if name in lock.left_out:
                continue
            assert name in lock.pins, f"{path}: {requirement} is not locked; run `make lock`"
            assert requirement.specifier.contains(lock.pins[name], prereleases=True), (
                f"{path}: {name}=={lock.pins[name]} does not satisfy {requirement}; run `make lock`"
            )
        for name, parents in lock.parents.items():
            assert parents, f"{path}: nothing pulls in {name}"
            if PROJECT in parents:
                assert name in direct, f"{path}: {name} is no longer a requirement; run `make lock`"
            unknown = parents - {PROJECT, CONSTRAINTS} - set(lock.pins) - lock.left_out
            assert not unknown, f"{path}: {name} comes via {sorted(unknown)}, which are not locked"


def test_locks_agree_with_the_constraints(commands: dict[str, list[str]]) -> None:
    pins = constraint_pins()
    for path in commands:
        lock = Lock.read(REPO_ROOT / path)
        for name, version in lock.pins.items():
            if name in pins:
                assert version == pins[name], (
                    f"{path}: {name}=={version}, but constraints.txt pins {pins[name]}; run `make lock`"
                )
            else:
                assert CONSTRAINTS not in lock.parents[name], name


def test_torch_comes_from_its_index_and_never_into_a_serving_lock(commands: dict[str, list[str]]) -> None:
    for path in commands:
        lock = Lock.read(REPO_ROOT / path)
        assert "torch" not in lock.pins, f"{path} pins torch; it comes from TORCH_INDEX_URL"
        if "serve" in path:
            assert "torch" not in lock.left_out and not any("torch" in p for p in lock.parents), path
        else:
            assert lock.left_out == {"torch"}, path
    serve = Lock.read(REQUIREMENTS / "serve.txt").pins
    gpu = Lock.read(REQUIREMENTS / "serve-gpu.txt").pins
    assert {name for name in serve if name.startswith("onnxruntime")} == {"onnxruntime"}
    assert {name for name in gpu if name.startswith("onnxruntime")} == {"onnxruntime-gpu"}
    assert any(name.startswith("nvidia-cudnn") for name in gpu), "the GPU lock lacks cuDNN"


def test_the_lock_reader(tmp_path: Path) -> None:
    path = tmp_path / "lock.txt"
    path.write_text(
        "a==1.0                    # via -c constraints.txt, rnnserve (pyproject.toml)\n"
        "b-c==2                    # via a\n\n"
        "# The following packages are considered to be unsafe in a requirements file:\n# Torch\n"
    )
    lock = Lock.read(path)
    assert lock.pins == {"a": "1.0", "b-c": "2"}
    assert lock.parents == {"a": {CONSTRAINTS, PROJECT}, "b-c": {"a"}}
    assert lock.left_out == {"torch"}
    assert re.fullmatch(r"\d+\.\d+", TARGET["python_version"])


def test_ci_installs_the_versions_the_images_run(commands: dict[str, list[str]]) -> None:
    """`make test` installs dev.txt, a superset of the image locks with the same pins, so the
    tests run on what the serve and train images hold (serve-gpu differs only by onnxruntime-gpu
    and its CUDA wheels)."""
    dev = Lock.read(REQUIREMENTS / "dev.txt").pins
    for name in ("serve", "train", "serve-gpu"):
        lock = Lock.read(REQUIREMENTS / f"{name}.txt").pins
        shared = {package: version for package, version in lock.items() if package in dev}
        assert shared == {package: dev[package] for package in shared}, name
        missing = set(lock) - set(dev)
        if name == "serve-gpu":
            assert all(package == "onnxruntime-gpu" or package.startswith("nvidia-") for package in missing)
        else:
            assert not missing, f"dev.txt lacks {sorted(missing)} of {name}.txt"
