"""`rnnserve serve`, `rnnserve generate` and `rnnserve health` as a user runs them: subprocesses."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import ALPHABET
from tests.support.servers import ServerThread

RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))


def rnnserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RNNSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served(model_repository: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`rnnserve serve --port 0` in a subprocess; yields (process, HOST:PORT) read from its log."""
    env = {**os.environ, "RNNSERVE_MAX_BATCH_SIZE": "8"}  # settings also come from the environment
    process = subprocess.Popen(
        [RNNSERVE, "serve", "--repository", str(model_repository), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    log = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        log.append(line)
        found = re.search(r"serving .* on 127\.0\.0\.1:(\d+) \(max_batch_size 8", line)
        if found:
            break
        if not line and process.poll() is not None:
            pytest.fail("rnnserve serve exited early:\n" + "".join(log))
    else:
        process.kill()
        pytest.fail("rnnserve serve did not start:\n" + "".join(log))
    try:
        yield process, f"127.0.0.1:{found.group(1)}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stderr.close()


def test_serve_answers_health_and_generate_then_stops_on_sigterm(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    process, target = served
    health = rnnserve("health", "--target", target)
    assert health.returncode == 0, health.stderr
    assert "SERVING" in health.stdout
    generated = rnnserve(
        "generate",
        "--target",
        target,
        "--model",
        "tiny-gru",
        "--prompt",
        "to be",
        "--max-new-tokens",
        "30",
        "--seed",
        "4",
    )
    assert generated.returncode == 0, generated.stderr
    text = generated.stdout.rstrip("\n")
    assert text.startswith("to be") and len(text) == len("to be") + 30
    assert set(text) <= set(ALPHABET)
    again = rnnserve(
        "generate",
        "--target",
        target,
        "--model",
        "tiny-gru",
        "--prompt",
        "to be",
        "--max-new-tokens",
        "30",
        "--seed",
        "4",
    )
    assert again.stdout == generated.stdout
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert process.stderr is not None
    assert "stopped" in process.stderr.read()


def test_serve_refuses_a_repository_without_models(tmp_path: Path) -> None:
    result = rnnserve("serve", "--repository", str(tmp_path / "missing"), "--port", "0")
    assert result.returncode == 2
    assert "does not exist or is not a directory" in result.stderr


def test_health_of_a_model_and_of_unknown_services(server: ServerThread) -> None:
    model = rnnserve("health", "--target", server.target, "--service", "tiny-lstm")
    assert model.returncode == 0 and "'tiny-lstm'" in model.stdout and "SERVING" in model.stdout
    unknown = rnnserve("health", "--target", server.target, "--service", "nope")
    assert unknown.returncode == 1 and "knows no health service 'nope'" in unknown.stderr


def test_health_without_a_server() -> None:
    result = rnnserve("health", "--target", f"127.0.0.1:{unused_port()}", "--timeout", "2")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


def test_generate_refuses_unknown_characters_and_models(server: ServerThread) -> None:
    bad_text = rnnserve("generate", "--target", server.target, "--model", "tiny-lstm", "--prompt", "ROMEO:")
    assert bad_text.returncode == 2
    assert "the prompt cannot be encoded for 'tiny-lstm': character 'R' is not in" in bad_text.stderr
    bad_model = rnnserve("generate", "--target", server.target, "--model", "nope", "--prompt", "a")
    assert bad_model.returncode == 1
    assert "NOT_FOUND: model 'nope' is not served" in bad_model.stderr


def test_generate_without_a_server() -> None:
    result = rnnserve(
        "generate",
        "--target",
        f"127.0.0.1:{unused_port()}",
        "--model",
        "m",
        "--prompt",
        "a",
        "--timeout",
        "3",
    )
    assert result.returncode == 1
    assert "cannot reach an rnnserve server at" in result.stderr


def test_a_subcommand_whose_package_is_not_installed_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving import cli

    real_import = cli.importlib.import_module

    def without_bench(name: str) -> object:
        if name.split(".", maxsplit=1)[0] == "bench":
            raise ModuleNotFoundError(f"No module named {name!r}", name="bench")
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", without_bench)
    assert cli.main(["bench", "--help"]) == 2
    assert "the 'bench' package is not installed here" in capsys.readouterr().err


def test_a_missing_dependency_of_an_installed_subcommand_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import cli

    def without_torch(name: str) -> object:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(cli.importlib, "import_module", without_torch)
    with pytest.raises(ModuleNotFoundError, match="torch"):
        cli.main(["train", "--help"])


def test_bench_is_reached_by_module_name(capsys: pytest.CaptureFixture[str]) -> None:
    from serving import cli

    assert cli.SUBCOMMANDS["bench"][0] == "bench.cli"
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--help"])
    assert exited.value.code == 0
    assert "--scenarios" in capsys.readouterr().out


def test_version_prints_the_package_version() -> None:
    import tomllib

    with (Path(__file__).resolve().parents[2] / "pyproject.toml").open("rb") as file:
        expected = tomllib.load(file)["project"]["version"]
    for flag in ("--version", "-V"):
        result = rnnserve(flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"rnnserve {expected}\n"
    assert "--version" in rnnserve("--help").stdout
