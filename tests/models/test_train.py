"""`rnnserve train` end to end: tiny LSTM/GRU models in tmp_path, resume, interrupts, bad input."""

from __future__ import annotations

import io
import json
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import data, train
from models.checkpoint import (
    CHECKPOINT_FILE,
    CURVE_FILE,
    LAST_WEIGHTS_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
)
from models.presets import TrainConfig

ARCHS = ["lstm", "gru"]
LECTURE_JSONL = Path(__file__).resolve().parents[1] / "data" / "lecture_toy.jsonl"
TEXT = (
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n"
) * 12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Any:
    """main() sets torch's thread count for the process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "richard.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_args(out: Path, data_path: Path | None, arch: str = "lstm", *extra: str) -> list[str]:
    args = ["--arch", arch, "--preset", "tiny", "--out", str(out), "--no-progress", "--seq-len", "16"]
    args += ["--batch-size", "4", "--max-steps", "12", "--eval-every", "4", "--threads", "1"]
    if data_path is not None:
        args += ["--data", str(data_path)]
    return [*args, *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def checkpoint_json(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / CHECKPOINT_FILE).read_text())
    return result


# ----------------------------------------------------------------------------- successful runs


@pytest.mark.parametrize("arch", ARCHS)
def test_text_training_writes_a_complete_self_describing_checkpoint(
    tmp_path: Path, corpus_file: Path, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, corpus_file, arch, "--max-steps", "20", "--lr", "2e-2")) == 0
    captured = capsys.readouterr()
    assert "--- greedy sample ---" in captured.out
    assert "val_loss" in captured.out
    assert "step 20/20" in captured.err
    for name in (WEIGHTS_FILE, CHECKPOINT_FILE, LAST_WEIGHTS_FILE, OPTIMIZER_FILE, CURVE_FILE):
        assert (out / name).is_file(), name
    assert (out / CURVE_FILE).read_bytes().startswith(PNG_MAGIC)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    checkpoint = load_checkpoint(out)
    assert checkpoint.config.arch == arch
    assert checkpoint.tokenizer["type"] == "char"
    metrics = checkpoint.metrics
    vocab_size = checkpoint.config.vocab_size
    assert metrics["complete"] is True
    assert metrics["val_loss"] < math.log(vocab_size)  # it learned something
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bits_per_token"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert metrics["train_tokens_per_second"] > 0 and metrics["wall_seconds"] > 0
    assert metrics["steps"] == 20
    training = checkpoint.training
    assert training["data"]["paths"] == [str(corpus_file)]
    assert training["data"]["format"] == "text" and training["data"]["val_fraction"] == 0.05
    assert training["config"]["hidden_size"] == 32 and training["stop_reason"] == "max_steps"
    assert [v[0] for v in training["history"]["validation"]] == [4, 8, 12, 16, 20]

    # The documented exporter API recomputes the recorded validation loss from the record alone.
    def predict(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = checkpoint.model(torch.from_numpy(tokens), None, torch.from_numpy(lengths))
        return logits.numpy()

    recomputed = data.validation_loss(training, checkpoint.tokenizer, predict)
    assert recomputed == pytest.approx(metrics["val_loss"], abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_jsonl_training_on_the_lecture_toy_data(
    tmp_path: Path, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    args = tiny_args(out, LECTURE_JSONL, arch, "--format", "jsonl", "--vocab-size", "100", "--pad-id", "0")
    assert train.main(args) == 0
    assert "greedy sample" not in capsys.readouterr().out  # ids have no text to show
    checkpoint = load_checkpoint(out)
    assert checkpoint.tokenizer == {"type": "ids", "vocab_size": 100}
    assert (checkpoint.config.vocab_size, checkpoint.config.pad_id) == (100, 0)
    assert checkpoint.training["validation_tokens"] == sum(
        len(s) for s in data.load_corpus(data.DataSpec.from_dict(checkpoint.training["data"])).validation
    )
    assert math.isfinite(checkpoint.metrics["val_loss"])


@pytest.mark.parametrize("arch", ARCHS)
def test_default_corpus_is_shakespeare(tmp_path: Path, arch: str) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, None, arch, "--max-steps", "2", "--eval-every", "2")) == 0
    training = checkpoint_json(out)["training"]
    assert training["data"]["paths"] == ["shakespeare"]
    assert training["validation_tokens"] > 200_000
    assert checkpoint_json(out)["metrics"]["val_tokens"] == training["validation_tokens"] - 1


def test_time_budget_stops_training_and_ends_the_schedule(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    args = tiny_args(out, corpus_file, "gru", "--max-steps", "100000", "--max-time", "0.3")
    assert train.main(args) == 0
    training = checkpoint_json(out)["training"]
    assert training["stop_reason"] == "max_time"
    assert 0 < training["last_step"] < 100000
    assert training["elapsed_seconds"] >= 0.3
    assert " of 0.3 s" in capsys.readouterr().err  # the validation log shows the time budget


def test_learning_rate_schedule() -> None:
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert train.lr_at(cosine, 0, 0.0) == pytest.approx(0.1)  # first warmup step
    assert train.lr_at(cosine, 9, 0.0) == pytest.approx(1.0)
    assert train.lr_at(cosine, 50, 0.5) == pytest.approx(0.55)
    assert train.lr_at(cosine, 99, 1.0) == pytest.approx(0.1)
    assert train.lr_at(cosine, 99, 1.5) == pytest.approx(0.1)  # a budget overrun stays at the floor
    assert train.lr_at(TrainConfig(lr=0.5), 1000, 0.9) == 0.5


# ----------------------------------------------------------------------------- resume


def test_resume_continues_to_the_uninterrupted_result(tmp_path: Path, corpus_file: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_args(straight, corpus_file, "lstm", "--max-steps", "8")) == 0
    assert train.main(tiny_args(resumed, corpus_file, "lstm", "--max-steps", "4")) == 0
    assert checkpoint_json(resumed)["training"]["last_step"] == 4
    assert train.main(["--out", str(resumed), "--resume", "--max-steps", "8", "--no-progress"]) == 0
    record = checkpoint_json(resumed)["training"]
    assert record["last_step"] == 8 and record["config"]["max_steps"] == 8
    assert [v[0] for v in record["history"]["validation"]] == [4, 8]
    assert_same_weights(straight / LAST_WEIGHTS_FILE, resumed / LAST_WEIGHTS_FILE)
    assert_same_weights(straight / WEIGHTS_FILE, resumed / WEIGHTS_FILE)


@pytest.mark.parametrize("arch", ARCHS)
def test_ctrl_c_saves_progress_and_resume_matches_an_uninterrupted_run(
    tmp_path: Path, corpus_file: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cosine = ("--lr-schedule", "cosine", "--warmup-steps", "2", "--dropout", "0.2", "--num-layers", "2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train.main(tiny_args(straight, corpus_file, arch, *cosine)) == 0

    original = data.TextBatcher.batch

    def batch_then_ctrl_c(self: data.TextBatcher, step: int) -> data.Batch:
        if step == 5:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 5
        return original(self, step)

    monkeypatch.setattr(data.TextBatcher, "batch", batch_then_ctrl_c)
    assert train.main(tiny_args(interrupted, corpus_file, arch, *cosine)) == train.EXIT_INTERRUPTED
    assert checkpoint_json(interrupted)["training"]["last_step"] == 6  # step 5 completed, then stopped
    assert checkpoint_json(interrupted)["training"]["complete"] is False
    monkeypatch.setattr(data.TextBatcher, "batch", original)

    assert train.main(["--out", str(interrupted), "--resume", "--no-progress"]) == 0
    assert checkpoint_json(interrupted)["training"]["last_step"] == 12
    assert_same_weights(straight / LAST_WEIGHTS_FILE, interrupted / LAST_WEIGHTS_FILE)


def test_resume_refuses_shape_changes_finished_runs_and_tampered_state(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, corpus_file, "gru", "--max-steps", "4")) == 0
    capsys.readouterr()
    resume = ["--out", str(out), "--resume", "--no-progress"]
    assert train.main([*resume, "--hidden-size", "64", "--max-steps", "8"]) == train.EXIT_ERROR
    assert "--hidden-size 64 differs from the checkpoint's 32" in capsys.readouterr().err
    assert train.main([*resume, "--data", str(tmp_path / "other.txt")]) == train.EXIT_ERROR
    assert "--data differs from the checkpoint's data" in capsys.readouterr().err
    assert train.main(resume) == train.EXIT_ERROR
    assert "already trained to step 4 (--max-steps 4); raise --max-steps" in capsys.readouterr().err
    (out / LAST_WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes() + b"x")
    assert train.main([*resume, "--max-steps", "8"]) == train.EXIT_ERROR
    assert "last.safetensors does not match checkpoint.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusals


def test_existing_checkpoint_needs_resume_or_overwrite(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, corpus_file, "lstm", "--max-steps", "2")) == 0
    before = (out / WEIGHTS_FILE).read_bytes()
    capsys.readouterr()
    assert train.main(tiny_args(out, corpus_file, "lstm", "--max-steps", "2")) == train.EXIT_ERROR
    assert "already holds a checkpoint; pass --resume" in capsys.readouterr().err
    assert (out / WEIGHTS_FILE).read_bytes() == before
    args = tiny_args(out, corpus_file, "lstm", "--max-steps", "2", "--seed", "1", "--overwrite")
    assert train.main(args) == 0
    assert (out / WEIGHTS_FILE).read_bytes() != before


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make_data", "extra", "message"),
    [
        (lambda d: d / "missing.txt", (), r"data file .*missing\.txt does not exist"),
        (
            lambda d: write_bytes(d / "latin1.txt", TEXT.encode() + b"caf\xe9"),
            (),
            r"is not UTF-8 text \(byte 0xe9",
        ),
        (lambda d: write_bytes(d / "empty.txt", b""), (), "the corpus is empty"),
        (
            lambda d: write_bytes(d / "bad.jsonl", b"[1, 2, 3]\n[4, 5,\n"),
            ("--format", "jsonl", "--vocab-size", "10"),
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            lambda d: write_bytes(d / "ids.jsonl", b"[1, 2, 3]\n[4, 12, 6]\n"),
            ("--format", "jsonl", "--vocab-size", "10"),
            r"ids\.jsonl:2: token id 12 is outside the vocabulary 0\.\.9",
        ),
        (lambda d: write_bytes(d / "x.jsonl", b"[1, 2]\n"), ("--format", "jsonl"), "needs --vocab-size"),
        (lambda d: d / "x.txt", ("--hidden-size", "0"), "hidden_size must be a positive integer"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_data: Any,
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, make_data(tmp_path), "lstm", *extra)) == train.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("rnnserve train: error: ")
    assert len(err.strip().splitlines()) == 1  # a message, not a traceback
    assert __import__("re").search(message, err), err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert train.main(tiny_args(out, corpus_file, "lstm", "--device", "cuda")) == train.EXIT_ERROR
    assert "--device cuda was requested but no CUDA device is available" in capsys.readouterr().err
    assert not out.exists()


def test_arch_is_required_for_a_new_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--out", str(tmp_path / "ckpt")]) == train.EXIT_ERROR
    assert "--arch lstm|gru is required" in capsys.readouterr().err


def render(bar: train.BudgetBar) -> str:
    return str(bar.bar)


def test_progress_bar_counts_seconds_under_a_time_limit() -> None:
    config = TrainConfig(max_steps=50_000, max_time=105.0)
    bar = train.BudgetBar(config, train.Progress(), disable=False, file=io.StringIO())
    assert (bar.bar.total, bar.bar.n) == (105, 0)
    bar.advance(step=40, elapsed=10.7)
    bar.show(40, loss="2.500")
    text = render(bar)
    assert bar.bar.n == 10
    assert "10/105 s" in text and "step=40/50000" in text and "loss=2.500" in text
    assert "50000 " not in text.replace("40/50000", ""), text  # steps are not the bar's total
    bar.advance(step=900, elapsed=400.0)  # the last step may end past the limit
    assert bar.bar.n == 105
    bar.close()


def test_progress_bar_resumes_at_the_elapsed_time_and_counts_steps_without_a_limit() -> None:
    resumed = train.BudgetBar(
        TrainConfig(max_steps=500, max_time=60.0),
        train.Progress(step=30, elapsed_seconds=20.4),
        disable=False,
        file=io.StringIO(),
    )
    assert (resumed.bar.total, resumed.bar.n) == (60, 20)
    resumed.close()
    by_steps = train.BudgetBar(
        TrainConfig(max_steps=500), train.Progress(step=30), disable=False, file=io.StringIO()
    )
    assert (by_steps.bar.total, by_steps.bar.n) == (500, 30)
    by_steps.advance(step=31, elapsed=1000.0)
    assert by_steps.bar.n == 31 and "31/500" in render(by_steps)
    by_steps.close()
