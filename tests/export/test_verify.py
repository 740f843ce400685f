"""Verification: every check can fail and names itself; `rnnserve export` and --verify-only exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from contract import signature as sig
from contract.tokenizer import IdTokenizer
from export import cli, graph
from export.errors import VerificationError
from export.exporter import export_checkpoint, verify_version
from models import data
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.model import RNNLanguageModel
from serving import cli as rnnserve_cli

VOCAB_SIZE = 24


def save_tiny_checkpoint(
    directory: Path,
    arch: str,
    num_layers: int = 1,
    tokenizer: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch, vocab_size=vocab_size, embedding_size=8, hidden_size=16, num_layers=num_layers
    )
    model = RNNLanguageModel(config)
    tokenizer = tokenizer or IdTokenizer(vocab_size).to_dict()
    return save_checkpoint(directory, model, tokenizer, 0, {"val_loss": 3.2}, training)


# -- faults injected into the graph builder ----------------------------------------------------

Mutation = Callable[[onnx.ModelProto], None]


def patch_built_model(monkeypatch: pytest.MonkeyPatch, mutate: Mutation) -> None:
    """Make export/graph.py's builder return a damaged model."""
    build = graph.build_model

    def damaged(*args: Any, **kwargs: Any) -> onnx.ModelProto:
        model = build(*args, **kwargs)
        mutate(model)
        return model

    monkeypatch.setattr(graph, "build_model", damaged)


def recurrent(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("LSTM", "GRU")]


def freeze_seq(model: onnx.ModelProto) -> None:
    # What torch.onnx's dynamo exporter did to a time-major recurrence: `seq` frozen at 64.
    logits = next(o for o in model.graph.output if o.name == sig.LOGITS)
    logits.type.tensor_type.shape.dim[1].dim_value = 64


def lengths_as_int64(model: onnx.ModelProto) -> None:
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64


def drop_sequence_lens(model: onnx.ModelProto) -> None:
    for node in recurrent(model):
        node.input[4] = ""


def insert_dropout(model: onnx.ModelProto) -> None:
    # A Dropout after the embedding (an identity at inference, but no Dropout belongs in the graph).
    index, gather = next((i, n) for i, n in enumerate(model.graph.node) if n.output[0] == "embedded")
    gather.output[0] = "embedded_before_dropout"
    model.graph.node.insert(index + 1, helper.make_node("Dropout", ["embedded_before_dropout"], ["embedded"]))


def gru_reset_before_linear(model: onnx.ModelProto) -> None:
    # What onnxscript < 0.7.1 emitted.
    for node in recurrent(model):
        for attribute in node.attribute:
            if attribute.name == "linear_before_reset":
                attribute.i = 0


def ignore_initial_state(model: onnx.ModelProto) -> None:
    # The graph reads h0 * 0: it forgets the state a previous chunk handed over.
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    model.graph.initializer.append(zero)
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] == sig.H0:
            node.input[0] = "h0_forgotten"
    model.graph.node.insert(0, helper.make_node("Mul", [sig.H0, "zero"], ["h0_forgotten"]))


def favour_one_token(model: onnx.ModelProto) -> None:
    # A bias of +5 on the least likely token: ORT decodes it at every step, PyTorch never does.
    bias = next(t for t in model.graph.initializer if t.name == "decoder.bias")
    values = numpy_helper.to_array(bias).copy()
    values[values.argmin()] += 5.0
    bias.CopyFrom(numpy_helper.from_array(values, "decoder.bias"))


def forget_tokenizer(model: onnx.ModelProto) -> None:
    for prop in model.metadata_props:
        if prop.key == "tokenizer":
            prop.value = json.dumps({"type": "ids", "vocab_size": VOCAB_SIZE + 1})


FAULTS: list[tuple[str, str, Mutation, set[str]]] = [
    ("lstm", "frozen-seq", freeze_seq, {"signature"}),
    ("gru", "lengths-int64", lengths_as_int64, {"signature", "session"}),
    ("lstm", "no-sequence-lens", drop_sequence_lens, {"structure", "ragged"}),
    ("gru", "no-sequence-lens", drop_sequence_lens, {"structure", "ragged"}),
    ("lstm", "dropout", insert_dropout, {"structure"}),
    ("gru", "reset-before-linear", gru_reset_before_linear, {"structure", "full/seq=7/batch=3"}),
    # Greedy decoding alone misses this one (c still carries the state); the other checks do not.
    ("lstm", "ignores-h0", ignore_initial_state, {"chunked", "full/seq=1/batch=1", "ragged"}),
    ("gru", "ignores-h0", ignore_initial_state, {"chunked", "full/seq=64/batch=3"}),
    ("lstm", "favours-a-token", favour_one_token, {"greedy", "full/seq=2/batch=1"}),
    ("gru", "wrong-tokenizer", forget_tokenizer, {"metadata"}),
]


@pytest.mark.parametrize(
    ("arch", "mutate", "expected"),
    [(arch, mutate, expected) for arch, _, mutate, expected in FAULTS],
    ids=[f"{arch}-{name}" for arch, name, _, _ in FAULTS],
)
def test_each_fault_fails_the_check_that_catches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, mutate: Mutation, expected: set[str]
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", arch, num_layers=2)
    patch_built_model(monkeypatch, mutate)
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    failed = set(caught.value.report.failed_checks())
    assert expected <= failed, f"expected {expected} among the failed checks {failed}"
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_swapped_gates_fail_the_values_with_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", arch)
    monkeypatch.setattr(graph, "_LSTM_GATE_ORDER", (0, 1, 2, 3))  # PyTorch's own order
    monkeypatch.setattr(graph, "_GRU_GATE_ORDER", (0, 1, 2))
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    report = caught.value.report
    assert {"full/seq=1/batch=1", "full/seq=64/batch=3", "ragged", "greedy"} <= set(report.failed_checks())
    assert {"signature", "structure", "metadata", "session"}.isdisjoint(report.failed_checks())
    message = str(caught.value)
    assert "[full/seq=1/batch=1] logits: max abs error" in message
    assert "> tolerance 1.000e-04" in message
    assert report.max_abs_error > 1e-3


def test_a_wrong_output_shape_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    build = graph.build_model

    def one_token_short(
        arch: str, layers: int, hidden: int, weights: dict[str, Any], *rest: Any, **kw: Any
    ) -> Any:
        weights = {
            **weights,
            "decoder.weight": weights["decoder.weight"][:-1],
            "decoder.bias": weights["decoder.bias"][:-1],
        }
        return build(arch, layers, hidden, weights, *rest, **kw)

    monkeypatch.setattr(graph, "build_model", one_token_short)
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    failures = [str(f) for f in caught.value.report.failures]
    assert any(f.startswith("[signature] logits: dims") for f in failures)
    assert any(f.startswith("[full/seq=7/batch=3] logits: shape (3, 7, 23) differs") for f in failures)


def test_a_worse_validation_loss_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("all the world's a stage, and all the men and women merely players.\n" * 20)
    spec = data.DataSpec(format="text", paths=(str(corpus_file),), eval_seq_len=32)
    corpus = data.load_corpus(spec)
    checkpoint = save_tiny_checkpoint(
        tmp_path / "ckpt",
        "gru",
        tokenizer=corpus.tokenizer.to_dict(),
        training={"data": spec.to_dict(), "data_sha256": corpus.sha256},
        vocab_size=corpus.tokenizer.vocab_size,
    )
    patch_built_model(monkeypatch, favour_one_token)
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(checkpoint, tmp_path / "repo", "m")
    assert "validation_loss" in caught.value.report.failed_checks()
    assert "above PyTorch's" in str(caught.value)


# -- --verify-only -------------------------------------------------------------------------------


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, Path]:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm", num_layers=2)
    return checkpoint, export_checkpoint(checkpoint, tmp_path / "repo", "m").path


def test_verify_only_passes_on_a_good_export(
    published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, version_dir = published
    assert cli.main(["--verify-only", str(version_dir)]) == 0
    out = capsys.readouterr().out
    assert "integrity" in out
    assert "passed: precision fp32" in out


def test_verify_only_fails_on_tampered_weights(
    published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, version_dir = published
    model = onnx.load(str(version_dir / sig.MODEL_FILE))
    weights = next(t for t in model.graph.initializer if t.name == "rnn.R_l1")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) + 0.05, "rnn.R_l1"))
    onnx.save(model, str(version_dir / sig.MODEL_FILE))
    assert cli.main(["--verify-only", str(version_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILED [integrity] model.onnx: sha256" in out
    assert "FAILED [full/seq=64/batch=3] hn: max abs error" in out
    assert "FAILED: precision fp32" in out


def test_verify_only_fails_on_a_corrupt_file(
    published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, version_dir = published
    (version_dir / sig.MODEL_FILE).write_bytes(b"\x08\x07garbage, not protobuf" * 10)
    assert cli.main(["--verify-only", str(version_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILED [integrity]" in out
    assert "FAILED [load] model.onnx: not a valid ONNX model" in out


def test_verify_only_fails_when_config_does_not_describe_the_checkpoint(
    published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, version_dir = published
    config_path = version_dir / sig.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 17
    config_path.write_text(json.dumps(config))
    assert cli.main(["--verify-only", str(version_dir)]) == 1
    assert (
        "FAILED [config] hidden_size: config.json says 17, the checkpoint says 16" in capsys.readouterr().out
    )


def test_verify_only_against_another_checkpoint_fails(
    tmp_path: Path, published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, version_dir = published
    torch.manual_seed(1)
    other = RNNLanguageModel(
        ModelConfig(arch="lstm", vocab_size=VOCAB_SIZE, embedding_size=8, hidden_size=16, num_layers=2)
    )
    save_checkpoint(tmp_path / "other", other, IdTokenizer(VOCAB_SIZE).to_dict(), 0, {})
    assert cli.main(["--verify-only", str(version_dir), "--checkpoint", str(tmp_path / "other")]) == 1
    out = capsys.readouterr().out
    assert "FAILED [config] checkpoint_sha256" in out
    assert "FAILED [metadata] checkpoint_sha256" in out
    assert "FAILED [greedy]" in out


def test_verify_only_needs_a_checkpoint(
    tmp_path: Path, published: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, version_dir = published
    config_path = version_dir / sig.CONFIG_FILE
    config = json.loads(config_path.read_text())
    del config["source_checkpoint"]
    config_path.write_text(json.dumps(config))
    assert cli.main(["--verify-only", str(version_dir)]) == 1
    assert (
        "records no source_checkpoint; verification needs the PyTorch checkpoint" in capsys.readouterr().err
    )
    assert cli.main(["--verify-only", str(version_dir), "--checkpoint", str(checkpoint)]) == 0

    config["source_checkpoint"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(config))
    assert cli.main(["--verify-only", str(version_dir)]) == 1
    assert "moved-away does not exist (the checkpoint recorded in config.json" in capsys.readouterr().err


def test_verify_only_of_something_that_is_not_a_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--verify-only", str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
    assert cli.main(["--verify-only", str(tmp_path / "nowhere")]) == 1
    assert "is not a model version directory" in capsys.readouterr().err


def test_verify_version_returns_the_report(published: tuple[Path, Path]) -> None:
    _, version_dir = published
    report = verify_version(version_dir)
    assert report.passed
    assert [c.name for c in report.checks[:5]] == [
        "integrity",
        "config",
        "signature",
        "structure",
        "metadata",
    ]
    assert report.max_abs_error < 1e-4


# -- the command line ----------------------------------------------------------------------------


def test_export_command_publishes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "gru")
    argv = [
        "export",
        str(checkpoint),
        "--repository",
        str(tmp_path / "repo"),
        "--name",
        "g",
        "--version",
        "3",
    ]
    assert rnnserve_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"published {tmp_path / 'repo' / 'g' / '3'} (fp32" in out
    assert "largest parity error" in out
    assert (tmp_path / "repo" / "g" / "3" / sig.MODEL_FILE).is_file()

    assert rnnserve_cli.main(argv) == 1
    assert "version 3 of model 'g' already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["CKPT", "--repository", "R"], "exporting needs --name"),
        (["--verify-only", "R/m/1", "CKPT"], "give the checkpoint as --checkpoint"),
        (["--verify-only", "R/m/1", "--name", "m"], "--verify-only takes the version directory itself"),
        (
            ["CKPT", "--repository", "R", "--name", "m", "--checkpoint", "C"],
            "--checkpoint goes with --verify-only",
        ),
        (["CKPT", "--repository", "R", "--name", "m", "--precision", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_export_command_names_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "missing"), "--repository", str(tmp_path / "repo"), "--name", "m"]
    assert cli.main(argv) == 1
    assert f"checkpoint {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_export_command_reports_a_failed_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    patch_built_model(monkeypatch, drop_sequence_lens)
    assert cli.main([str(checkpoint), "--repository", str(tmp_path / "repo"), "--name", "m"]) == 1
    err = capsys.readouterr().err
    assert "FAILED [structure] rnn_out_l0/LSTM: sequence_lens is 'not connected', expected 'lengths'" in err
    assert "FAILED [ragged]" in err
    assert "verification failed; nothing was published" in err
    assert not (tmp_path / "repo").exists()


def test_int8_greedy_criteria_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "lstm")
    patch_built_model(monkeypatch, favour_one_token)
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(checkpoint, tmp_path / "repo", "m", precision="int8")
    report = caught.value.report
    greedy_failures = [str(f) for f in report.failures if f.check == "greedy"]
    assert any("top-1 agrees with PyTorch on 0.0% of steps, needs >= 90%" in f for f in greedy_failures)
    assert any("mean KL(PyTorch || ONNX)" in f for f in greedy_failures)
    assert report.greedy["first_divergence"] == 0
