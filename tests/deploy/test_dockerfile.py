"""The Dockerfile, checked without a Docker engine: its stages, users, health checks and installs.

Every image installs its packages from a lock file in requirements/ (tests/test_deploy_locks.py
checks those against pyproject.toml and constraints.txt, and that CI installs the same pins), so
here it is enough to check that each install line takes the right lock and pins whatever else
it names. The serving image's command, environment and HEALTHCHECK are also run for real, from
this environment, against a tiny model.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from tests.support.deploy import (
    ALL_TARGETS,
    DOCKERFILE,
    IMAGE_UID,
    REPO_ROOT,
    SERVING_TARGETS,
    Dockerfile,
    assert_flags_exist,
    default_setting,
    image_environment,
    server_settings,
    setting,
)

# The lock file each image installs from.
IMAGE_LOCKS = {
    "serve": "requirements/serve.txt",
    "serve-gpu": "requirements/serve-gpu.txt",
    "train": "requirements/train.txt",
}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SOURCE_STAGE = "source"  # the rnnserve source tree, for `pip install .`


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read(DOCKERFILE)


def pip_installs(dockerfile: Dockerfile, stage: str) -> list[list[str]]:
    """The arguments after `pip install` of every install command in STAGE's RUN lines."""
    installs = []
    for run in dockerfile.stage(stage).all("RUN"):
        for command in run.value.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def test_targets_build_on_separate_build_stages(dockerfile: Dockerfile) -> None:
    for target in ALL_TARGETS:
        assert [stage.name for stage in dockerfile.lineage(target)] == ["runtime", target]
        build_stage = f"{target}-build"
        assert [stage.name for stage in dockerfile.lineage(build_stage)] == ["base", build_stage]
        (copy,) = dockerfile.stage(target).all("COPY")
        assert copy.value == f"--from={build_stage} /opt/venv /opt/venv"


def test_base_image_is_an_exact_slim_python_release(dockerfile: Dockerfile) -> None:
    image = dockerfile.global_args["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(\w+)(@sha256:[0-9a-f]{64})?", image)
    assert match, f"PYTHON_IMAGE={image!r} is not an exact python:X.Y.Z-slim-<debian> tag"
    for stage in dockerfile.stages:
        if dockerfile.parent(stage) is None and stage.name != SOURCE_STAGE:
            assert dockerfile.resolved_base(stage) == image, stage.name
    assert dockerfile.stage(SOURCE_STAGE).base == "scratch"  # files only, copied by the build stages
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        python_version = tomllib.load(file)["tool"]["mypy"]["python_version"]
    assert f"{match.group(1)}.{match.group(2)}" == python_version
    # The lock files are compiled on, and CI runs, the image's Python release.
    assert sys.version_info[:2] == (int(match.group(1)), int(match.group(2))), (
        f"tests run on {sys.version.split()[0]}, the images on {image}"
    )


def test_final_images_run_as_the_unprivileged_user(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stage("runtime")
    (create_user,) = runtime.all("RUN")
    assert f"--uid {IMAGE_UID}" in create_user.value and f"--gid {IMAGE_UID}" in create_user.value
    for target in ALL_TARGETS:
        users = [item.value for stage in dockerfile.lineage(target) for item in stage.all("USER")]
        assert users and users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", f"{target} runs as {users[-1:] or 'root'}"


def test_final_images_hold_only_the_built_venv(dockerfile: Dockerfile) -> None:
    for target in ALL_TARGETS:
        for stage in dockerfile.lineage(target):
            keywords = {item.keyword for item in stage.instructions}
            assert "ADD" not in keywords
            for run in stage.all("RUN"):
                assert "pip" not in run.value and "apt-get" not in run.value, (
                    f"{stage.name}: installs belong in the build stages"
                )
            for copy in stage.all("COPY"):
                assert copy.value == f"--from={target}-build /opt/venv /opt/venv", (
                    f"{stage.name}: {copy.value}"
                )


def test_serving_images_probe_health_with_rnnserve_health(dockerfile: Dockerfile) -> None:
    for target in SERVING_TARGETS:
        (healthcheck,) = dockerfile.stage(target).all("HEALTHCHECK")
        options = healthcheck.value.split(" CMD ", 1)[0]
        assert all(option in options for option in ("--interval=", "--timeout=", "--start-period="))
        shell, flag, command = healthcheck.exec_form()
        assert (shell, flag) == ("sh", "-c"), "the port variable needs a shell to expand it"
        match = re.fullmatch(
            r'rnnserve health --target "127\.0\.0\.1:\$\{RNNSERVE_PORT:-(\d+)\}"', command.strip()
        )
        assert match, f"{target}: HEALTHCHECK {command!r}"
        assert int(match.group(1)) == default_setting("port")
        assert dockerfile.stage(target).all("ENTRYPOINT")[0].exec_form() == ["rnnserve"]
        assert dockerfile.stage(target).all("CMD")[0].exec_form() == ["serve"]
        assert_flags_exist(shlex.split(command)[1:], "serving.clients.health")


def test_serving_image_environment_agrees_with_the_server_settings(dockerfile: Dockerfile) -> None:
    for target in SERVING_TARGETS:
        environment = image_environment(target)
        settings = server_settings(environment)
        assert settings.host == "0.0.0.0"
        assert settings.device == ("cuda" if target == "serve-gpu" else "cpu")
        assert str(settings.repository) == "/models"
        metrics_port = setting(settings, environment, "metrics_port")
        (expose,) = dockerfile.stage(target).all("EXPOSE")
        http_port = setting(settings, environment, "http_port")
        exposed = sorted(int(port) for port in expose.value.split())
        assert exposed == sorted([settings.port, http_port, metrics_port])
    # The repository directory exists in the image, owned by its user, so that a named volume
    # mounted there starts writable by that user.
    (create_user,) = dockerfile.stage("runtime").all("RUN")
    assert "mkdir -p /models /checkpoints" in create_user.value
    assert "chown rnnserve:rnnserve /models /checkpoints" in create_user.value


def test_images_install_from_their_lock_file_and_pin_everything_else(dockerfile: Dockerfile) -> None:
    for target, lock in IMAGE_LOCKS.items():
        installs = pip_installs(dockerfile, f"{target}-build")
        assert installs, target
        locks = [args[args.index("-r") + 1] for args in installs if "-r" in args]
        assert locks == [lock], f"{target} installs from {locks}, not {lock}"
        assert (REPO_ROOT / lock).is_file()
        for args in installs:
            assert "--no-cache-dir" in args, f"{target}: pip install {shlex.join(args)}"
            if "-r" in args:
                continue
            # Beside the lock: rnnserve itself and single pinned packages, never their dependencies.
            assert "--no-deps" in args, f"{target}: pip install {shlex.join(args)} resolves unlocked packages"
            named = [arg for arg in args if not arg.startswith("-") and arg not in ("constraints.txt",)]
            named = [arg for arg in named if "${" not in arg]
            for name in named:
                constrained = "-c" in args and args[args.index("-c") + 1] == "constraints.txt"
                assert name == "." or "==" in name or constrained, f"{target}: {name} is not pinned"


def test_dependencies_install_before_the_source_is_copied(dockerfile: Dockerfile) -> None:
    """Editing the source must not invalidate the (large, slow) dependency layers."""
    for target, lock in IMAGE_LOCKS.items():
        steps = [
            ("lock" if f"-r {lock}" in item.value else "rnnserve" if item.value.endswith(" .") else "other")
            if item.keyword == "RUN"
            else ("source" if item.value == f"--from={SOURCE_STAGE} /src/ ./" else item.value)
            for item in dockerfile.stage(f"{target}-build").instructions
            if item.keyword in ("RUN", "COPY")
        ]
        assert steps == ["lock", "source", "rnnserve"], f"{target}-build: {steps}"


def test_serving_images_install_no_torch(dockerfile: Dockerfile) -> None:
    for target in SERVING_TARGETS:
        words = [word for args in pip_installs(dockerfile, f"{target}-build") for word in args]
        assert not any("torch" in word for word in words), target
        assert not any("extra-index-url" in word or "index-url" in word for word in words), target


def test_training_image_takes_torch_from_the_cpu_index(dockerfile: Dockerfile) -> None:
    first, *_ = pip_installs(dockerfile, "train-build")
    assert first[-1] == "torch" and "--no-deps" in first
    assert first[first.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    (argument,) = dockerfile.stage("train-build").all("ARG")
    assert argument.value == f"TORCH_INDEX_URL={CPU_TORCH_INDEX}"
    assert first[first.index("-c") + 1] == "constraints.txt"
    assert re.search(r"^torch==\d", (REPO_ROOT / "constraints.txt").read_text(), flags=re.MULTILINE)
    # The Makefile takes torch from the same index unless told otherwise.
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"TORCH_INDEX_URL ?= {CPU_TORCH_INDEX}" in makefile


def test_build_context_is_only_the_build_inputs(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must be an allowlist"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = set()
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            if copy.value.startswith("--from="):
                continue
            *sources, destination = shlex.split(copy.value)
            copied |= {source.rstrip("/") for source in sources}
            if stage.name == SOURCE_STAGE:
                assert destination.startswith("/src/"), f"{stage.name}: COPY {copy.value}"
    assert copied == allowed, f"COPY sends {sorted(copied)}, .dockerignore allows {sorted(allowed)}"
    for path in copied:
        assert (REPO_ROOT / path).exists(), f"COPY {path}: no such file"
    for excluded in ("**/__pycache__", "**/*.py[cod]"):
        assert excluded in patterns


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tiny_repository(root: Path) -> Path:
    """A model repository with one tiny GRU, trained and exported by the project's own CLIs."""
    from export.cli import main as export_main
    from models.train import main as train_main

    corpus = root / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 100)
    checkpoint, repository = root / "checkpoint", root / "repository"
    train_args = ["--arch", "gru", "--preset", "tiny", "--out", str(checkpoint), "--data", str(corpus)]
    assert train_main([*train_args, "--device", "cpu", "--no-progress"]) == 0
    assert export_main([str(checkpoint), "--repository", str(repository), "--name", "tiny"]) == 0
    return repository


@pytest.mark.slow
def test_serving_image_serves_and_passes_its_healthcheck(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The serve image's command, environment and HEALTHCHECK, run from this environment.

    Only the listening address differs from the container (loopback and a free port here).
    """
    port = free_port()
    environment = {**os.environ, **image_environment("serve")}
    environment.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        RNNSERVE_REPOSITORY=str(tiny_repository(tmp_path)),
        RNNSERVE_HOST="127.0.0.1",
        RNNSERVE_PORT=str(port),
        RNNSERVE_METRICS_PORT=str(free_port()),
    )
    environment.pop("VIRTUAL_ENV")
    serve = dockerfile.stage("serve")
    command = serve.all("ENTRYPOINT")[0].exec_form() + serve.all("CMD")[0].exec_form()
    healthcheck = serve.all("HEALTHCHECK")[0].exec_form()
    server = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                healthcheck, env=environment, capture_output=True, text=True, check=False, timeout=30
            )
            if probe.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert probe.returncode == 0, f"HEALTHCHECK failed: {probe.stderr}"
        assert "SERVING" in probe.stdout
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
