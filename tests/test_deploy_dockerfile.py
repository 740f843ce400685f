"""The Dockerfile, checked without a Docker engine: its structure statically, its installs for real.

The static tests read the stages, users, health checks and install lines. The mirror tests run
the serving and training images' `pip install` lines (read from the Dockerfile by
deploy/mirror_docker_install.py, not copied) in a fresh venv on this machine's Python, so a
broken install line fails here as it would in `docker build`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
from deploy_support import (
    ALL_TARGETS,
    DOCKERFILE,
    IMAGE_UID,
    REPO_ROOT,
    SERVING_TARGETS,
    assert_flags_exist,
    default_setting,
    image_environment,
    load_deploy_module,
    server_settings,
    setting,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

mirror = load_deploy_module("mirror_docker_install")

# What each serving image must run on, and must never contain.
RUNTIME_PACKAGE = {"serve": "onnxruntime", "serve-gpu": "onnxruntime-gpu"}
# PyPI's onnxruntime-gpu 1.30 and later are CUDA 13 builds, the ones the GPU image is made for.
MIN_ONNXRUNTIME_GPU = (1, 30)


@pytest.fixture(scope="module")
def dockerfile() -> Any:
    return mirror.Dockerfile.read(DOCKERFILE)


def constraint_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def extra_requirements(extras: list[str]) -> list[Requirement]:
    """The core dependencies plus those of EXTRAS, from pyproject.toml."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        assert extra in project["optional-dependencies"], f"pyproject.toml has no extra {extra!r}"
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def requested_packages(install: Any) -> list[Requirement]:
    """Every requirement a `pip install` asks for, the project's extras expanded."""
    arguments = list(install.arguments)
    requirements = []
    skip_next = False
    for argument in arguments:
        if skip_next:
            skip_next = False
            continue
        if argument in ("-c", "--constraint", "--index-url", "-i", "--extra-index-url", "-r"):
            skip_next = True
            continue
        if argument.startswith("-"):
            continue
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", argument)
        if match:
            requirements += extra_requirements(match.group(1).split(",") if match.group(1) else [])
        else:
            requirements.append(Requirement(argument))
    return requirements


def test_targets_build_on_separate_build_stages(dockerfile: Any) -> None:
    for target in ALL_TARGETS:
        assert [stage.name for stage in dockerfile.lineage(target)] == ["runtime", target]
        build_stage = f"{target}-build"
        assert [stage.name for stage in dockerfile.lineage(build_stage)] == ["base", build_stage]
        assert [stage.name for stage in dockerfile.build_order(target)] == [
            "runtime",
            "base",
            build_stage,
            target,
        ]


def test_base_image_is_an_exact_slim_python_release(dockerfile: Any) -> None:
    image = dockerfile.global_args["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(\w+)(@sha256:[0-9a-f]{64})?", image)
    assert match, f"PYTHON_IMAGE={image!r} is not an exact python:X.Y.Z-slim-<debian> tag"
    for stage in dockerfile.stages:
        if dockerfile.parent(stage) is None:
            assert dockerfile.resolved_base(stage) == image, stage.name
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        python_version = tomllib.load(file)["tool"]["mypy"]["python_version"]
    assert f"{match.group(1)}.{match.group(2)}" == python_version


def test_final_images_run_as_the_unprivileged_user(dockerfile: Any) -> None:
    runtime = dockerfile.stage("runtime")
    (create_user,) = runtime.all("RUN")
    assert f"--uid {IMAGE_UID}" in create_user.value and f"--gid {IMAGE_UID}" in create_user.value
    for target in ALL_TARGETS:
        users = [item.value for stage in dockerfile.lineage(target) for item in stage.all("USER")]
        assert users and users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", f"{target} runs as {users[-1:] or 'root'}"


def test_final_images_hold_only_the_built_venv(dockerfile: Any) -> None:
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


def test_serving_images_probe_health_with_rnnserve_health(dockerfile: Any) -> None:
    for target in SERVING_TARGETS:
        (healthcheck,) = dockerfile.stage(target).all("HEALTHCHECK")
        options, command = healthcheck.value.split(" CMD ", 1)
        assert all(option in options for option in ("--interval=", "--timeout=", "--start-period="))
        match = re.fullmatch(
            r'rnnserve health --target "127\.0\.0\.1:\$\{RNNSERVE_PORT:-(\d+)\}"', command.strip()
        )
        assert match, f"{target}: HEALTHCHECK {command!r}"
        assert int(match.group(1)) == default_setting("port")
        assert dockerfile.stage(target).all("ENTRYPOINT")[0].exec_form() == ["rnnserve"]
        assert dockerfile.stage(target).all("CMD")[0].exec_form() == ["serve"]
        assert_flags_exist(command.split(), "serving.health")


def test_serving_image_environment_agrees_with_the_server_settings(dockerfile: Any) -> None:
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


def test_every_install_is_pinned_and_leaves_no_cache(dockerfile: Any) -> None:
    pins = constraint_pins()
    for target in ALL_TARGETS:
        plan = mirror.install_plan(dockerfile, target)
        assert plan.installs, target
        for install in plan.installs:
            assert "--no-cache-dir" in install.arguments, install.command()
            constrained = "-c" in install.arguments and install.arguments[
                install.arguments.index("-c") + 1
            ] == ("constraints.txt")
            inline = {
                canonicalize_name(requirement.name): requirement
                for requirement in requested_packages(install)
                if any(spec.operator == "==" for spec in requirement.specifier)
            }
            for requirement in requested_packages(install):
                name = canonicalize_name(requirement.name)
                assert name in inline or (constrained and name in pins), (
                    f"{target}: {requirement} in `{install.command()}` is not pinned"
                )


def test_serving_images_install_no_torch_and_one_onnxruntime(dockerfile: Any) -> None:
    for target in SERVING_TARGETS:
        requested = {
            canonicalize_name(requirement.name): requirement
            for install in mirror.install_plan(dockerfile, target).installs
            for requirement in requested_packages(install)
        }
        assert "torch" not in requested, target
        runtimes = {name for name in requested if name.startswith("onnxruntime")}
        assert runtimes == {RUNTIME_PACKAGE[target]}, f"{target} installs {sorted(runtimes)}"
        assert {"grpcio", "grpcio-health-checking"} <= set(requested)
    gpu = [
        requirement
        for install in mirror.install_plan(dockerfile, "serve-gpu").installs
        for requirement in requested_packages(install)
        if requirement.name == "onnxruntime-gpu"
        and any(spec.operator == "==" for spec in requirement.specifier)
    ]
    (pinned,) = gpu
    assert pinned.extras == {"cuda", "cudnn"}
    (specifier,) = pinned.specifier
    assert specifier.operator == "=="
    assert tuple(int(part) for part in specifier.version.split(".")[:2]) >= MIN_ONNXRUNTIME_GPU


def test_training_image_takes_torch_from_the_cpu_index(dockerfile: Any) -> None:
    installs = mirror.install_plan(dockerfile, "train").installs
    first = installs[0].arguments
    assert first[-1] == "torch" and "--no-deps" in first
    assert first[first.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "torch" in constraint_pins()
    # CI swaps the index (it cannot reach it); the override must reach exactly that argument.
    overridden = mirror.install_plan(dockerfile, "train", {"TORCH_INDEX_URL": "https://pypi.org/simple"})
    assert overridden.installs[0].arguments[first.index("--index-url") + 1] == "https://pypi.org/simple"
    assert [install.arguments for install in overridden.installs[1:]] == [
        install.arguments for install in installs[1:]
    ]


def test_build_context_is_only_the_build_inputs() -> None:
    sent = mirror.DockerIgnore.read(REPO_ROOT).context_files(REPO_ROOT)
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= set(sent)
    for package in ("models", "export", "serving", "protos"):
        assert f"{package}/__init__.py" in sent
    assert {path.split("/")[0] for path in sent} == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "models",
        "export",
        "serving",
        "protos",
    }
    assert not [path for path in sent if "__pycache__" in path or path.endswith(".pyc")]


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("*\n!models/", "models/model.py", False),
        ("*\n!models/", "tests/test_x.py", True),
        ("*\n!models/", ".venv/bin/python", True),
        ("*\n!models/\n**/__pycache__", "models/__pycache__/model.cpython-311.pyc", True),
        ("**/*.py[cod]", "a/b/c.pyc", True),
        ("**/*.py[cod]", "c.pyc", True),
        ("build", "build/lib/x.py", True),
        ("build", "src/build", False),
        ("/dist", "dist/x.whl", True),
        ("docs/*.md\n!docs/README.md", "docs/README.md", False),
        ("docs/*.md\n!docs/README.md", "docs/guide.md", True),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
    ],
)
def test_dockerignore_matches_like_docker(patterns: str, path: str, excluded: bool) -> None:
    assert mirror.DockerIgnore.parse(patterns).excludes(path) is excluded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM python:3.11 AS a\nRUN pip install x && useradd y\n", "mixes `pip install`"),
        ("FROM python:3.11 AS a\nRUN pip install ${NOWHERE}\n", "$NOWHERE is neither"),
        ("FROM python:3.11 AS a\nCOPY --from=b /x /x\nRUN pip install x\n", None),
        ("RUN echo\nFROM python:3.11 AS a\n", "only ARG may come before"),
        ("FROM python:3.11 AS a\nADD x.tar /x\n", "only `COPY SRC... DEST`"),
    ],
)
def test_mirror_refuses_what_it_cannot_reproduce(text: str, message: str | None, tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    if message is None:
        plan = mirror.install_plan(mirror.Dockerfile.read(path), "a")
        assert [install.command() for install in plan.installs] == ["pip install x"]
        return
    with pytest.raises(mirror.MirrorError, match=re.escape(message)):
        mirror.install_plan(mirror.Dockerfile.read(path), "a")


def test_mirror_refuses_an_unknown_build_argument(dockerfile: Any) -> None:
    with pytest.raises(mirror.MirrorError, match="TORCH_INDEX are not ARGs"):
        mirror.install_plan(dockerfile, "train", {"TORCH_INDEX": "x"})


def test_mirror_fails_when_dockerignore_keeps_out_a_copied_file(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM python:3.11 AS a\nWORKDIR /src\nCOPY app.txt ./\nRUN pip install x\n"
    )
    (tmp_path / "app.txt").write_text("x")
    (tmp_path / ".dockerignore").write_text("*.txt\n")
    plan = mirror.install_plan(mirror.Dockerfile.read(tmp_path / "Dockerfile"), "a")
    with pytest.raises(mirror.MirrorError, match=r"left out by \.dockerignore"):
        mirror.stage_context(plan, tmp_path, tmp_path / "rootfs")
    (tmp_path / ".dockerignore").write_text("*.txt\n!app.txt\n")
    mirror.stage_context(plan, tmp_path, tmp_path / "rootfs")
    assert (tmp_path / "rootfs" / "src" / "app.txt").read_text() == "x"


def run_in(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False, timeout=120)


def installed_version(python: Path, distribution: str) -> str:
    result = run_in(python, f"import importlib.metadata as m; print(m.version({distribution!r}))")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The python of a venv made by the serve image's install lines (30 to 50 s here)."""
    result = mirror.mirror("serve", tmp_path_factory.mktemp("serve") / "venv")
    yield Path(result.python)
    shutil.rmtree(result.venv)  # 240 MB; pytest keeps the last runs' temporary directories


@pytest.mark.slow
def test_serving_image_install_mirror(serve_venv: Path) -> None:
    """The serve image's installs, run for real: onnxruntime and grpc import, torch does not."""
    imported = run_in(
        serve_venv, "import onnxruntime, grpc, grpc_health.v1; import serving.server, serving.health"
    )
    assert imported.returncode == 0, imported.stderr
    no_torch = run_in(serve_venv, "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    pins = constraint_pins()
    for distribution in ("onnxruntime", "grpcio", "grpcio-health-checking", "numpy", "protobuf"):
        assert installed_version(serve_venv, distribution) == pins[distribution]


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
    assert train_main([*train_args, "--device", "cpu"]) == 0
    assert export_main([str(checkpoint), "--repository", str(repository), "--name", "tiny"]) == 0
    return repository


@pytest.mark.slow
def test_serving_image_serves_and_passes_its_healthcheck(
    serve_venv: Path, dockerfile: Any, tmp_path: Path
) -> None:
    """The serve image's command, environment and HEALTHCHECK, run from the mirrored venv.

    Only the listening address differs from the container (loopback and a free port here).
    """
    port = free_port()
    environment = {**os.environ, **image_environment("serve")}
    environment.update(
        PATH=f"{serve_venv.parent}{os.pathsep}{os.environ['PATH']}",
        VIRTUAL_ENV=str(serve_venv.parent.parent),
        RNNSERVE_REPOSITORY=str(tiny_repository(tmp_path)),
        RNNSERVE_HOST="127.0.0.1",
        RNNSERVE_PORT=str(port),
        RNNSERVE_METRICS_PORT=str(free_port()),
    )
    serve = dockerfile.stage("serve")
    command = serve.all("ENTRYPOINT")[0].exec_form() + serve.all("CMD")[0].exec_form()
    healthcheck = serve.all("HEALTHCHECK")[0].value.split(" CMD ", 1)[1]
    server = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                ["sh", "-c", healthcheck],
                env=environment,
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
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


@pytest.mark.slow
def test_training_image_install_mirror(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The train image's installs, run for real, with CI's index override: a CPU build of torch."""
    # CI reaches PyPI but not the PyTorch index. pip picks the CPU wheel of torch 2.13.0 from this
    # machine's local wheel directory (2.13.0+cpu outranks PyPI's CUDA 2.13.0); the check below
    # makes sure the mirror did install a CPU build, as the real index would.
    result = mirror.mirror(
        "train", tmp_path / "venv", build_args={"TORCH_INDEX_URL": "https://pypi.org/simple"}
    )
    request.addfinalizer(lambda: shutil.rmtree(result.venv))  # 1.2 GB
    python = result.python
    probe = run_in(
        python, "import torch, onnx, onnxruntime, shakespeare; print(torch.__version__, torch.version.cuda)"
    )
    assert probe.returncode == 0, probe.stderr
    version, cuda = probe.stdout.split()
    assert version.split("+")[0] == constraint_pins()["torch"] and cuda == "None", probe.stdout
    bootstrap = subprocess.run(
        [str(python), "-m", "export.bootstrap", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert bootstrap.returncode == 0 and "--repository" in bootstrap.stdout, bootstrap.stderr


def test_mirror_uses_the_image_python_release(dockerfile: Any) -> None:
    """The mirror's venv must match the image's CPython, or it would resolve other wheels."""
    image = dockerfile.global_args["PYTHON_IMAGE"]
    major, minor, _ = (int(part) for part in re.findall(r"python:(\d+)\.(\d+)\.(\d+)", image)[0])
    assert sys.version_info[:2] == (major, minor), (
        f"tests run on {sys.version.split()[0]}, the image on {image}"
    )
