"""The PyTorch model: explicit state, packed padding, generation, and checkpoint round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from contract.tokenizer import CharTokenizer
from models.checkpoint import (
    CHECKPOINT_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from models.config import ModelConfig
from models.data import IGNORE_INDEX
from models.model import RNNLanguageModel
from models.sample import generate

ARCHS = ["lstm", "gru"]
VOCAB_SIZE = 40
PAD_ID = 0


def tiny_model(arch: str, num_layers: int = 2, seed: int = 0) -> RNNLanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch,
        vocab_size=VOCAB_SIZE,
        embedding_size=8,
        hidden_size=16,
        num_layers=num_layers,
        pad_id=PAD_ID,
    )
    return RNNLanguageModel(config).eval()


def random_rows(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB_SIZE, (n,), generator=generator) for n in lengths]


def pad(rows: list[torch.Tensor], fill: int = PAD_ID) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.full((width - len(r),), fill)]) for r in rows])


@pytest.mark.parametrize("arch", ARCHS)
def test_state_is_batch_major_and_matches_the_arch(arch: str) -> None:
    model = tiny_model(arch)
    logits, state = model(torch.randint(0, VOCAB_SIZE, (3, 5)))
    assert logits.shape == (3, 5, VOCAB_SIZE)
    assert len(state) == (2 if arch == "lstm" else 1)
    assert all(s.shape == (3, 2, 16) for s in state)
    assert [s.shape for s in model.init_state(4)] == [(4, 2, 16)] * len(state)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_run_carrying_state_equals_one_full_run(arch: str) -> None:
    model = tiny_model(arch)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 12))
    with torch.no_grad():
        full_logits, full_state = model(tokens)
        first, state = model(tokens[:, :5])
        second, state = model(tokens[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full_logits)
    for a, b in zip(state, full_state, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_reaches_neither_state_nor_real_logits(arch: str) -> None:
    model = tiny_model(arch)
    rows = random_rows([7, 3, 5, 1])
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        padded_logits, padded_state = model(pad(rows), None, lengths)
        other_logits, other_state = model(pad(rows, fill=17), None, lengths)
        for i, row in enumerate(rows):
            alone_logits, alone_state = model(row[None])
            torch.testing.assert_close(padded_logits[i, : len(row)], alone_logits[0])
            for packed, single in zip(padded_state, alone_state, strict=True):
                torch.testing.assert_close(packed[i], single[0])
    # Whatever fills the padding, nothing changes.
    torch.testing.assert_close(other_logits, padded_logits)
    for a, b in zip(other_state, padded_state, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_training_equals_per_row_training(arch: str) -> None:
    """Loss and gradients of a padded, packed batch are the sums over each row trained alone."""
    model = tiny_model(arch).train()
    rows = random_rows([9, 4, 6, 2], seed=1)
    inputs = pad([r[:-1] for r in rows])
    targets = pad([r[1:] for r in rows], fill=IGNORE_INDEX)
    lengths = torch.tensor([len(r) - 1 for r in rows])

    logits, _ = model(inputs, None, lengths)
    batch_loss = functional.cross_entropy(
        logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    batch_loss.backward()
    batch_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    row_loss = torch.zeros(())
    for row in rows:
        row_logits, _ = model(row[None, :-1])
        row_loss = row_loss + functional.cross_entropy(row_logits[0], row[1:], reduction="sum")
    row_loss.backward()
    torch.testing.assert_close(batch_loss, row_loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None
        torch.testing.assert_close(batch_grads[name], parameter.grad, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_the_argmax_of_the_full_history(arch: str) -> None:
    model = tiny_model(arch)
    prompt = [3, 9, 4]
    new_ids = generate(model, prompt, max_new_tokens=10)
    history = list(prompt)
    with torch.no_grad():
        for expected in new_ids:
            logits, _ = model(torch.tensor([history]))
            assert int(logits[0, -1].argmax()) == expected
            history.append(expected)


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k() -> None:
    model = tiny_model("gru")
    first = generate(model, [5], 30, temperature=1.0, generator=torch.Generator().manual_seed(1))
    second = generate(model, [5], 30, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert first == second
    top1 = generate(model, [5], 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(2))
    assert top1 == generate(model, [5], 10)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 5)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(tmp_path: Path, arch: str) -> None:
    model = tiny_model(arch)
    tokenizer = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz0123456789 .,\n")).to_dict()
    save_checkpoint(
        tmp_path / "ckpt", model, tokenizer, step=12, metrics={"val_loss": 2.5}, training={"x": 1}
    )
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert (loaded.step, loaded.metrics, loaded.training) == (12, {"val_loss": 2.5}, {"x": 1})
    assert loaded.tokenizer == tokenizer
    assert not loaded.model.training
    tokens = torch.randint(0, VOCAB_SIZE, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_corrupted_or_incomplete_checkpoints_are_refused(tmp_path: Path) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", tiny_model("lstm"), {"type": "byte"}, 0, {})
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(CheckpointError, match="is corrupted: sha256"):
        load_checkpoint(directory)
    (directory / CHECKPOINT_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="is not an rnnserve checkpoint"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
