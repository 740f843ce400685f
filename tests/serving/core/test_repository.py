"""The model repository: complete versions load, malformed ones are refused with a clear reason
while every valid model still serves; pins; fp16 refused on CPU; CUDA asked for and absent."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from contract import signature as sig
from contract.hashing import sha256_file
from serving.core.engine import EngineError, EngineOptions, load_engine, resolve_providers
from serving.core.registry import load_repository
from serving.core.repository import (
    RepositoryError,
    load_model_proto,
    read_manifest,
    scan_repository,
)
from serving.settings import ServerSettings
from tests.support.servers import RecordingObserver


def copy_version(source: Path, repository: Path, name: str, version: int) -> Path:
    """Copy a published version under a new name/version, rewriting config.json to match."""
    target = repository / name / str(version)
    shutil.copytree(source, target)
    config = json.loads((target / sig.CONFIG_FILE).read_text())
    config.update(name=name, version=version)
    (target / sig.CONFIG_FILE).write_text(json.dumps(config))
    return target


def edit_config(version_dir: Path, **changes: object) -> None:
    config = json.loads((version_dir / sig.CONFIG_FILE).read_text())
    config.update(changes)
    (version_dir / sig.CONFIG_FILE).write_text(json.dumps(config))


def rewrite_model(version_dir: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Change model.onnx and record its new sha256, so only the edit itself is wrong."""
    model = onnx.load(str(version_dir / sig.MODEL_FILE))
    edit(model)
    onnx.save(model, str(version_dir / sig.MODEL_FILE))
    edit_config(version_dir, model_sha256=sha256_file(version_dir / sig.MODEL_FILE))


def set_metadata(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value

    return edit


@pytest.fixture
def repository(tmp_path: Path, model_repository: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("tiny-lstm", "tiny-gru"):
        copy_version(model_repository / name / "1", root, name, 1)
    return root


def settings(repository: Path, **overrides: object) -> ServerSettings:
    return dataclasses.replace(ServerSettings(repository=repository, port=0), **overrides)


def test_scan_finds_complete_versions_and_skips_exports_in_progress(repository: Path) -> None:
    (repository / "tiny-lstm" / ".tmp-abc123").mkdir()  # an export being written
    copy_version(repository / "tiny-lstm" / "1", repository, "tiny-lstm", 3)
    scan = scan_repository(repository)
    assert scan.refused == []
    assert [m.version for m in scan.versions["tiny-lstm"]] == [1, 3]
    latest = scan.latest("tiny-lstm")
    assert latest is not None and latest.version == 3 and latest.arch == "lstm" and latest.num_layers == 2


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda v: (v / sig.MODEL_FILE).unlink(), "incomplete version, model.onnx is missing"),
        (lambda v: (v / sig.CONFIG_FILE).unlink(), "incomplete version, config.json is missing"),
        (lambda v: (v / sig.CONFIG_FILE).write_text("{not json"), "not readable JSON"),
        (lambda v: edit_config(v, format="other/1"), "format must be 'rnnserve-model/1'"),
        (lambda v: edit_config(v, name="someone-else"), "name 'someone-else' disagrees with its directory"),
        (lambda v: edit_config(v, version=9), "version 9 disagrees with its directory '2'"),
        (lambda v: edit_config(v, arch="transformer"), "arch must be one of"),
        (lambda v: edit_config(v, hidden_size="16"), "'hidden_size' must be int"),
        (lambda v: edit_config(v, pad_id=999), "pad_id 999 is outside"),
        (lambda v: edit_config(v, precision="int4"), "precision must be one of"),
        (lambda v: edit_config(v, tokenizer={"type": "wordpiece"}), "bad tokenizer"),
        (lambda v: edit_config(v, vocab_size=4), "the tokenizer has 32 ids but the model only 4"),
    ],
)
def test_malformed_configs_are_refused_with_a_reason(
    repository: Path, damage: Callable[[Path], None], reason: str
) -> None:
    broken = copy_version(repository / "tiny-lstm" / "1", repository, "tiny-lstm", 2)
    damage(broken)
    scan = scan_repository(repository)
    assert [(r.path, reason in r.reason) for r in scan.refused] == [(broken, True)], scan.refused
    assert [m.version for m in scan.versions["tiny-lstm"]] == [1]


def test_non_numeric_version_directories_are_refused(repository: Path) -> None:
    for bad in ("latest", "0", "007"):
        shutil.copytree(repository / "tiny-gru" / "1", repository / "tiny-gru" / bad)
    scan = scan_repository(repository)
    assert sorted(r.path.name for r in scan.refused) == ["0", "007", "latest"]
    assert all("must be positive integers" in r.reason for r in scan.refused)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda v: (v / sig.MODEL_FILE).write_bytes((v / sig.MODEL_FILE).read_bytes()[:200]),
            "does not match",
        ),
        (
            lambda v: rewrite_model(v, set_metadata("hidden_size", "64")),
            "metadata hidden_size='64' but config.json says 16",
        ),
        (
            lambda v: rewrite_model(v, set_metadata("arch", "gru")),
            "metadata arch='gru' but config.json says 'lstm'",
        ),
        (
            lambda v: edit_config(v, hidden_size=32),
            "'hn' has shape ['batch', 2, 16], expected [batch, 2, 32]",
        ),
        (lambda v: (v / sig.MODEL_FILE).write_bytes(b"garbage"), "does not match"),
    ],
)
def test_models_disagreeing_with_their_config_are_refused(
    repository: Path, damage: Callable[[Path], None], reason: str
) -> None:
    broken = copy_version(repository / "tiny-lstm" / "1", repository, "tiny-lstm", 2)
    damage(broken)
    with pytest.raises(RepositoryError) as refused:
        load_model_proto(read_manifest(broken))
    assert reason in str(refused.value)


def test_a_corrupt_latest_version_falls_back_and_other_models_serve(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = copy_version(repository / "tiny-lstm" / "1", repository, "tiny-lstm", 2)
    (corrupt / sig.MODEL_FILE).write_bytes(b"truncated")
    shutil.copytree(repository / "tiny-gru" / "1", repository / "tiny-gru" / "oops")
    observer = RecordingObserver()
    with caplog.at_level(logging.ERROR, logger="serving.core.registry"):
        registry = load_repository(settings(repository), observer)
    assert [(m.name, m.version) for m in registry] == [("tiny-gru", 1), ("tiny-lstm", 1)]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"refused {corrupt}" in messages and "sha256" in messages
    assert "oops: version directory names must be positive integers" in messages
    registry.stop()


def test_pinned_versions(repository: Path) -> None:
    copy_version(repository / "tiny-lstm" / "1", repository, "tiny-lstm", 2)
    registry = load_repository(settings(repository, pin=(("tiny-lstm", 1),)))
    assert registry.latest("tiny-lstm").version == 1  # type: ignore[union-attr]
    with pytest.raises(RepositoryError, match=r"--pin tiny-lstm=5: that version is not in the repository"):
        load_repository(settings(repository, pin=(("tiny-lstm", 5),)))


def test_an_empty_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no servable model in"):
        load_repository(settings(tmp_path))
    with pytest.raises(RepositoryError, match="does not exist or is not a directory"):
        load_repository(settings(tmp_path / "missing"))


def test_fp16_models_are_refused_on_cpu(repository: Path) -> None:
    fp16 = copy_version(repository / "tiny-gru" / "1", repository, "tiny-gru", 2)
    rewrite_model(fp16, set_metadata("precision", "fp16"))
    edit_config(fp16, precision="fp16")
    manifest = read_manifest(fp16)
    with pytest.raises(EngineError, match=r"is fp16, which is served on CUDA only .* use --device cuda"):
        load_engine(manifest, load_model_proto(manifest), EngineOptions(device="cpu", capacity=4))


def test_cuda_asked_for_and_absent_fails_clearly() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert resolve_providers("cuda")[0] == "CUDAExecutionProvider"
        return
    with pytest.raises(EngineError, match=r"--device cuda needs onnxruntime-gpu with CUDAExecutionProvider"):
        resolve_providers("cuda")
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_the_repository_refuses_model_names_outside_the_allowed_form(
    model_repository: Path, tmp_path: Path
) -> None:
    for name in ("tiny gru", "x" * 129, "-tiny", "tiny-gru"):
        shutil.copytree(model_repository / "tiny-gru", tmp_path / name)
    scan = scan_repository(tmp_path)
    assert sorted(scan.versions) == ["tiny-gru"]
    assert sorted(str(refused.path.parent.name) for refused in scan.refused) == sorted(
        ["tiny gru", "x" * 129, "-tiny"]
    )
    assert all(
        "model names are 1-128 characters of A-Z a-z 0-9" in refused.reason for refused in scan.refused
    )
