"""export_checkpoint: config.json and metadata, atomic publication, precisions, validation loss, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from contract import signature as sig
from contract.tokenizer import CharTokenizer, IdTokenizer
from export import evaluate, publish, quantize, verify
from export.errors import QuantizationError, RepositoryError, VerificationError, VersionExistsError
from export.exporter import export_checkpoint
from models import data
from models.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.model import RNNLanguageModel

RECORDED_VAL_LOSS = 3.2


def save_tiny_checkpoint(
    directory: Path,
    arch: str,
    num_layers: int = 1,
    vocab_size: int = 24,
    tokenizer: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, vocab_size=vocab_size, embedding_size=8, hidden_size=16, num_layers=num_layers
    )
    model = RNNLanguageModel(config)
    tokenizer = tokenizer or IdTokenizer(vocab_size).to_dict()
    return save_checkpoint(directory, model, tokenizer, 0, {"val_loss": RECORDED_VAL_LOSS}, training)


def save_corpus_checkpoint(tmp_path: Path, arch: str = "lstm") -> Path:
    """A checkpoint whose checkpoint.json points at a small text corpus, as `rnnserve train` writes."""
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("to be or not to be, that is the question.\n" * 40, encoding="utf-8")
    spec = data.DataSpec(format="text", paths=(str(corpus_file),), eval_seq_len=16, eval_batch_size=2)
    corpus = data.load_corpus(spec)
    assert isinstance(corpus.tokenizer, CharTokenizer)
    training = {"data": spec.to_dict(), "data_sha256": corpus.sha256}
    return save_tiny_checkpoint(
        tmp_path / f"ckpt-corpus-{arch}",
        arch,
        vocab_size=corpus.tokenizer.vocab_size,
        tokenizer=corpus.tokenizer.to_dict(),
        training=training,
    )


def repository_entries(repository: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(repository)) for p in repository.rglob("*")) if repository.exists() else []
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """fp32 exports of a 1-layer LSTM and a 2-layer GRU, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("exported")
    results = {}
    for arch, layers in (("lstm", 1), ("gru", 2)):
        checkpoint = save_tiny_checkpoint(root / f"ckpt-{arch}", arch, num_layers=layers)
        results[arch] = (checkpoint, export_checkpoint(checkpoint, root / "repo", f"tiny-{arch}"))
    return results


# -- what an export writes -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_export_writes_model_and_config(exported: dict[str, tuple[Path, Any]], arch: str) -> None:
    checkpoint_dir, result = exported[arch]
    checkpoint = load_checkpoint(checkpoint_dir)
    assert result.path == checkpoint_dir.parent / "repo" / f"tiny-{arch}" / "1"
    assert result.version == 1
    assert sorted(p.name for p in result.path.iterdir()) == [sig.CONFIG_FILE, sig.MODEL_FILE]

    config = json.loads((result.path / sig.CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["format"] == "rnnserve-model/1"
    assert (config["name"], config["version"], config["precision"]) == (f"tiny-{arch}", 1, "fp32")
    expected_sizes = checkpoint.config.to_dict()
    for key in ("arch", "vocab_size", "embedding_size", "hidden_size", "num_layers", "pad_id"):
        assert config[key] == expected_sizes[key]
    assert config["tokenizer"] == checkpoint.tokenizer
    assert config["model_sha256"] == result.model_sha256
    assert config["model_sha256"] == hashlib.sha256((result.path / sig.MODEL_FILE).read_bytes()).hexdigest()
    assert config["checkpoint_sha256"] == checkpoint.weights_sha256
    assert config["opset"] == sig.OPSET
    assert set(config["producer"]) == {"rnnserve", "torch", "onnx", "onnxruntime"}
    assert config["producer"]["onnxruntime"] == ort.__version__
    assert datetime.fromisoformat(config["created_at"].replace("Z", "+00:00")).utcoffset() is not None
    assert config["source_checkpoint"] == str(checkpoint_dir.resolve())

    # No training data recorded: fp32's loss is what the checkpoint recorded.
    metrics = config["metrics"]
    assert metrics["val_loss"] == metrics["val_loss_fp32"] == RECORDED_VAL_LOSS
    assert metrics["val_loss_source"] == "recorded in the checkpoint"

    verification = config["verification"]
    assert verification["passed"] is True
    assert verification["failures"] == []
    assert 0.0 <= verification["max_abs_error"] < 1e-4
    assert result.max_abs_error == verification["max_abs_error"]
    expected_checks = {"signature", "structure", "metadata", "session", "chunked", "ragged", "greedy"}
    expected_checks |= {f"full/seq={t}/batch={b}" for t in (1, 2, 7, 64) for b in (1, 3)}
    assert set(verification["checks"]) == expected_checks
    assert verification["greedy"]["identical"] is True
    assert verification["greedy"]["tokens"] == 200
    assert {"load_checkpoint", "build", "write", "verify", "publish", "total"} <= set(result.timings)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_metadata_props_describe_the_model(exported: dict[str, tuple[Path, Any]], arch: str) -> None:
    checkpoint_dir, result = exported[arch]
    checkpoint = load_checkpoint(checkpoint_dir)
    session = ort.InferenceSession(str(result.path / sig.MODEL_FILE), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert set(sig.METADATA_KEYS) <= set(metadata)
    assert metadata["arch"] == arch
    assert int(metadata["num_layers"]) == checkpoint.config.num_layers
    assert int(metadata["hidden_size"]) == 16
    assert int(metadata["embedding_size"]) == 8
    assert int(metadata["vocab_size"]) == 24
    assert int(metadata["pad_id"]) == 0
    assert metadata["precision"] == "fp32"
    assert json.loads(metadata["tokenizer"]) == checkpoint.tokenizer
    assert metadata["checkpoint_sha256"] == checkpoint.weights_sha256
    assert json.loads(metadata["producer_versions"])["onnxruntime"] == ort.__version__


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_onnxruntime_sees_the_contract_signature(exported: dict[str, tuple[Path, Any]], arch: str) -> None:
    _, result = exported[arch]
    layers = 1 if arch == "lstm" else 2
    session = ort.InferenceSession(str(result.path / sig.MODEL_FILE), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
    state = ("tensor(float)", [sig.BATCH, layers, 16])
    assert inputs == {
        sig.TOKENS: ("tensor(int64)", [sig.BATCH, sig.SEQ]),
        sig.LENGTHS: ("tensor(int32)", [sig.BATCH]),
        **{name: state for name in sig.state_input_names(arch)},
    }
    assert outputs == {
        sig.LOGITS: ("tensor(float)", [sig.BATCH, sig.SEQ, 24]),
        sig.LAST_LOGITS: ("tensor(float)", [sig.BATCH, 24]),
        **{name: state for name in sig.state_output_names(arch)},
    }
    nodes = onnx.load(str(result.path / sig.MODEL_FILE)).graph.node
    recurrent = [n for n in nodes if n.op_type in ("LSTM", "GRU")]
    assert len(recurrent) == layers
    assert all(n.input[4] == sig.LENGTHS for n in recurrent)


# -- publication ---------------------------------------------------------------------------------


def test_versions_are_numbered_and_never_overwritten(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "gru")
    repository = tmp_path / "repo"
    assert export_checkpoint(checkpoint, repository, "m").version == 1
    assert export_checkpoint(checkpoint, repository, "m").version == 2
    # Only directories named by positive integers are versions.
    for stray in ("7", "0", ".tmp-left-by-a-crash", "notes"):
        (repository / "m" / stray).mkdir()
    assert export_checkpoint(checkpoint, repository, "m").version == 8
    assert export_checkpoint(checkpoint, repository, "m", version=5).version == 5

    before = (repository / "m" / "2" / sig.MODEL_FILE).read_bytes()
    with pytest.raises(VersionExistsError, match="version 2 of model 'm' already exists"):
        export_checkpoint(checkpoint, repository, "m", version=2)
    assert (repository / "m" / "2" / sig.MODEL_FILE).read_bytes() == before
    assert [p.name for p in (repository / "m").glob(".tmp-*")] == [".tmp-left-by-a-crash"]


def test_a_version_taken_during_export_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    repository = tmp_path / "repo"
    real_verify = verify.verify_model

    def verify_while_another_export_publishes(*args: Any, **kwargs: Any) -> Any:
        other = repository / "m" / "1"
        other.mkdir()
        (other / sig.MODEL_FILE).write_bytes(b"the other export's model")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(verify, "verify_model", verify_while_another_export_publishes)
    with pytest.raises(VersionExistsError, match="version 1 of model 'm' was taken by another export"):
        export_checkpoint(checkpoint, repository, "m")
    assert repository_entries(repository) == ["m", "m/1", f"m/1/{sig.MODEL_FILE}"]
    assert (repository / "m" / "1" / sig.MODEL_FILE).read_bytes() == b"the other export's model"


def test_publish_refuses_a_version_renamed_into_place_first(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "m"
    with publish.staging_directory(model_dir) as staging:
        (staging / "file").write_text("x")
        (model_dir / "4").mkdir()
        (model_dir / "4" / "file").write_text("y")
        with pytest.raises(VersionExistsError):
            publish.publish(staging, model_dir, 4)
    assert repository_entries(model_dir) == ["4", "4/file"]


def test_a_failed_export_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    monkeypatch.setattr("export.graph._LSTM_GATE_ORDER", (0, 1, 2, 3))  # PyTorch's order: wrong for ONNX
    with pytest.raises(VerificationError):
        export_checkpoint(checkpoint, tmp_path / "new" / "repo", "m")
    assert not (tmp_path / "new").exists()
    (tmp_path / "repo" / "m").mkdir(parents=True)
    with pytest.raises(VerificationError):
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    assert repository_entries(tmp_path / "repo") == ["m"]


# -- bad input -----------------------------------------------------------------------------------


def corrupt_weights(directory: Path) -> None:
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")


def garble_json(directory: Path) -> None:
    (directory / "checkpoint.json").write_text("{not json", encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (shutil.rmtree, "does not exist"),
        (corrupt_weights, "is corrupted"),
        (garble_json, "is not valid JSON"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), f"has no {WEIGHTS_FILE}"),
    ],
    ids=["missing", "corrupted-weights", "corrupted-json", "no-weights"],
)
def test_bad_checkpoints_are_refused(tmp_path: Path, damage: Any, message: str) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "gru")
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a/b", "..", "has space", "ü", "m" * 129])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    with pytest.raises(RepositoryError, match="invalid model name"):
        export_checkpoint(checkpoint, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


def test_valid_names_are_accepted() -> None:
    for name in ("m", "shakespeare-lstm", "v1.2_int8", "0model"):
        assert publish.check_name(name) == name


@pytest.mark.parametrize("version", [0, -3])
def test_invalid_versions_are_refused(tmp_path: Path, version: int) -> None:
    with pytest.raises(RepositoryError, match="versions are positive integers"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "repo", "m", version=version)


def test_a_repository_that_is_a_file_is_refused(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    (tmp_path / "repo").write_text("not a directory")
    with pytest.raises(RepositoryError, match="is not a directory"):
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    (tmp_path / "repo2").mkdir()
    (tmp_path / "repo2" / "m").write_text("a file where the model directory belongs")
    with pytest.raises(RepositoryError, match="is not a directory"):
        export_checkpoint(checkpoint, tmp_path / "repo2", "m")
    assert (tmp_path / "repo").read_text() == "not a directory"


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "repo", "m", precision="int4")


# -- precisions ----------------------------------------------------------------------------------


def recurrent_nodes(path: Path) -> list[onnx.NodeProto]:
    ops = ("LSTM", "GRU", "DynamicQuantizeLSTM")
    return [n for n in onnx.load(str(path / sig.MODEL_FILE)).graph.node if n.op_type in ops]


def test_int8_lstm_becomes_dynamic_quantize_lstm(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm", num_layers=2)
    result = export_checkpoint(checkpoint, tmp_path / "repo", "q", precision="int8")
    nodes = recurrent_nodes(result.path)
    assert [n.op_type for n in nodes] == ["DynamicQuantizeLSTM", "DynamicQuantizeLSTM"]
    assert all(n.domain == "com.microsoft" and n.input[4] == sig.LENGTHS for n in nodes)
    model = onnx.load(str(result.path / sig.MODEL_FILE))
    initializers = {t.name: t for t in model.graph.initializer}
    assert all(initializers[n.input[1]].data_type == TensorProto.INT8 for n in nodes)
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}  # the decoder
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"
    config = json.loads((result.path / sig.CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["precision"] == "int8"
    assert config["verification"]["tolerance"] == {"atol": 0.1, "rtol": 0.05}
    assert config["verification"]["greedy"]["agreement"] >= 0.9
    # Without validation data the int8 loss is unknown, and says why.
    assert config["metrics"]["val_loss"] is None
    assert config["metrics"]["val_loss_fp32"] == RECORDED_VAL_LOSS
    assert any("int8 validation loss needs the validation data" in n for n in config["metrics"]["notes"])


def test_int8_gru_keeps_float_gru_and_quantizes_embedding_and_decoder(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "gru")
    result = export_checkpoint(checkpoint, tmp_path / "repo", "q", precision="int8")
    model = onnx.load(str(result.path / sig.MODEL_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert [n.op_type for n in recurrent_nodes(result.path)] == ["GRU"]
    assert {"MatMulInteger", "DequantizeLinear"} <= ops
    assert "MatMul" not in ops
    assert result.verification.passed


def test_int8_without_dynamic_quantize_lstm_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    monkeypatch.setattr(quantize, "OP_TYPES_TO_QUANTIZE", ("MatMul",))
    with pytest.raises(QuantizationError, match="left LSTM node"):
        export_checkpoint(checkpoint, tmp_path / "repo", "q", precision="int8")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_fp16_computes_in_half_behind_float32_inputs_and_outputs(tmp_path: Path, arch: str) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", arch)
    result = export_checkpoint(checkpoint, tmp_path / "repo", "h", precision="fp16", device="cpu")
    model = onnx.load(str(result.path / sig.MODEL_FILE))
    initializers = {t.name: t for t in model.graph.initializer}
    (node,) = recurrent_nodes(result.path)
    assert node.op_type == arch.upper()
    assert initializers[node.input[1]].data_type == TensorProto.FLOAT16
    assert initializers["decoder.weight_t"].data_type == TensorProto.FLOAT16
    for value in (*model.graph.input[2:], *model.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    report = result.verification
    assert report.provider == "CPUExecutionProvider"
    assert any("CUDA's fp16 kernels were not exercised" in note for note in report.notes)
    assert result.max_abs_error < 0.05
    config = json.loads((result.path / sig.CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["precision"] == "fp16"
    assert config["verification"]["notes"] == report.notes


@pytest.mark.cuda
def test_fp16_is_verified_on_cuda(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA device and onnxruntime-gpu")
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm", num_layers=2)
    result = export_checkpoint(checkpoint, tmp_path / "repo", "h", precision="fp16", device="cuda")
    assert result.verification.provider == "CUDAExecutionProvider"
    assert result.verification.notes == []


def test_cuda_verification_without_cuda_is_refused(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    from export.errors import ExportError

    with pytest.raises(ExportError, match="verification on cuda needs onnxruntime-gpu"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "repo", "m", precision="fp16", device="cuda")


# -- validation loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_validation_loss_is_recomputed_from_the_training_data(tmp_path: Path, precision: str) -> None:
    checkpoint_dir = save_corpus_checkpoint(tmp_path)
    result = export_checkpoint(checkpoint_dir, tmp_path / "repo", "m", precision=precision)
    metrics = result.metrics
    assert metrics["val_loss_source"].startswith("recomputed on ")
    checkpoint = load_checkpoint(checkpoint_dir)
    batches = list(data.validation_batches(checkpoint.training, checkpoint.tokenizer))
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            logits, _ = checkpoint.model(
                torch.from_numpy(batch.tokens), None, torch.from_numpy(batch.lengths)
            )
        batch_total, batch_count = data.cross_entropy_sum(logits.numpy(), batch.targets)
        total, count = total + batch_total, count + batch_count
    assert metrics["val_loss_fp32"] == pytest.approx(total / count, abs=1e-6)
    tolerance = 1e-4 if precision == "fp32" else 0.05
    assert metrics["val_loss"] == pytest.approx(metrics["val_loss_fp32"], abs=tolerance)
    assert result.verification.checks[-1].name == "validation_loss"
    assert result.verification.validation["targets"] == count


def test_missing_training_data_falls_back_to_the_recorded_loss(tmp_path: Path) -> None:
    checkpoint_dir = save_corpus_checkpoint(tmp_path)
    (tmp_path / "corpus.txt").unlink()
    result = export_checkpoint(checkpoint_dir, tmp_path / "repo", "m", precision="int8")
    assert result.metrics["val_loss"] is None
    assert result.metrics["val_loss_fp32"] == RECORDED_VAL_LOSS
    assert any("corpus.txt does not exist" in note for note in result.metrics["notes"])
    assert "validation_loss" not in {c.name for c in result.verification.checks}


def test_changed_training_data_is_not_used(tmp_path: Path) -> None:
    checkpoint_dir = save_corpus_checkpoint(tmp_path)
    with (tmp_path / "corpus.txt").open("a", encoding="utf-8") as corpus:
        corpus.write("to be\n")
    result = export_checkpoint(checkpoint_dir, tmp_path / "repo", "m")
    assert result.metrics["val_loss_source"] == "recorded in the checkpoint"
    assert any("has changed since training" in note for note in result.metrics["notes"])
    assert np.isclose(result.metrics["val_loss"], RECORDED_VAL_LOSS)


def test_a_large_validation_split_is_scored_on_evenly_spaced_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = load_checkpoint(save_corpus_checkpoint(tmp_path))
    all_batches = list(data.validation_batches(checkpoint.training, checkpoint.tokenizer))
    total = sum(b.num_targets for b in all_batches)
    assert len(all_batches) >= 2 and all(b.tokens.shape[0] == 2 for b in all_batches[:-1])
    monkeypatch.setattr(evaluate, "MAX_VALIDATION_TARGETS", total // 2)
    validation, why = evaluate.load_validation_data(checkpoint)
    assert validation is not None, why
    # One row in two: the first row of every two-row batch.
    assert [b.tokens.tolist() for b in validation.batches] == [b.tokens[:1].tolist() for b in all_batches]
    assert validation.description.startswith(
        f"{validation.num_targets} of the {total} validation targets (one row in 2) of text"
    )
