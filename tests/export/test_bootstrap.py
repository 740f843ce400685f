"""`make serve`'s first half: the default models are made once, and only when missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract import signature as sig
from export import bootstrap


def _versions(repository: Path, name: str) -> list[str]:
    return sorted(p.name for p in (repository / name).iterdir() if p.name.isdigit())


def test_bootstrap_trains_exports_then_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repository, checkpoints = tmp_path / "repo", tmp_path / "ckpt"
    argv = ["--repository", str(repository), "--checkpoints", str(checkpoints), "--preset", "tiny"]
    assert bootstrap.main(argv) == 0
    for name, arch in bootstrap.DEFAULT_MODELS:
        assert _versions(repository, name) == ["1"]
        config = json.loads((repository / name / "1" / sig.CONFIG_FILE).read_text())
        assert config["arch"] == arch and config["tokenizer"]["type"] == "char"

    def no_training(*args: object) -> None:
        raise AssertionError("bootstrap must not train or export when the models are present")

    monkeypatch.setattr(bootstrap, "ensure_model", no_training)
    assert bootstrap.main(argv) == 0
    assert all(_versions(repository, name) == ["1"] for name, _ in bootstrap.DEFAULT_MODELS)


def test_bootstrap_refuses_a_repository_that_is_a_file(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.write_text("not a directory")
    assert bootstrap.main(["--repository", str(repository), "--checkpoints", str(tmp_path / "c")]) == 2


def test_has_complete_version_ignores_partial_and_odd_directories(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "0").mkdir(parents=True)
    (model / "abc").mkdir()
    (model / "2").mkdir()
    (model / "2" / sig.MODEL_FILE).write_bytes(b"")
    assert not bootstrap.has_complete_version(tmp_path, "m")
    (model / "2" / sig.CONFIG_FILE).write_text("{}")
    assert bootstrap.has_complete_version(tmp_path, "m")
