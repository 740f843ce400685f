"""`rnnserve models --target` as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import json

from tests.serving.test_cli import rnnserve, unused_port
from tests.support.models import TINY_MODELS
from tests.support.servers import ServerThread


def test_models_lists_every_version_with_its_sizes(server: ServerThread) -> None:
    listed = rnnserve("models", "--target", server.target)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == [
        "model",
        "version",
        "arch",
        "precision",
        "vocab",
        "embedding",
        "hidden",
        "layers",
        "sessions",
    ]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert sorted(by_name) == sorted(TINY_MODELS)
    lstm = server.registry.latest("tiny-lstm").manifest
    expected = [
        "tiny-lstm",
        "1*",
        "lstm",
        lstm.precision,
        str(lstm.vocab_size),
        str(lstm.embedding_size),
        str(lstm.hidden_size),
        str(lstm.num_layers),
        "0",
    ]
    assert by_name["tiny-lstm"] == expected
    assert by_name["tiny-gru"][2] == "gru"


def test_models_as_json(server: ServerThread) -> None:
    listed = rnnserve("models", "--target", server.target, "--json")
    assert listed.returncode == 0, listed.stderr
    models = {model["name"]: model for model in json.loads(listed.stdout)}
    [version] = models["tiny-gru"]["versions"]
    manifest = server.registry.latest("tiny-gru").manifest
    assert version["latest"] and version["version"] == models["tiny-gru"]["latest_version"] == 1
    assert (version["hidden_size"], version["num_layers"], version["model_sha256"]) == (
        manifest.hidden_size,
        manifest.num_layers,
        manifest.model_sha256,
    )


def test_models_without_a_server() -> None:
    result = rnnserve("models", "--target", f"127.0.0.1:{unused_port()}", "--timeout", "2")
    assert result.returncode == 1
    assert "cannot reach an rnnserve server" in result.stderr


def test_models_is_listed_in_the_usage() -> None:
    usage = rnnserve("--help")
    assert "models" in usage.stdout and "list a running server's models" in usage.stdout
