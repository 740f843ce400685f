"""Tiny models for tests: made by the real pipeline (a seeded random RNNLanguageModel saved with
save_checkpoint and published with export_checkpoint, which verifies it against PyTorch), and an
offline oracle that runs the exported ONNX file on a whole history."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import signature as sig

# Every character the tiny models know: prompts in tests use only these.
ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"
TINY_MODELS = {  # name -> (arch, num_layers)
    "tiny-lstm": ("lstm", 2),
    "tiny-gru": ("gru", 1),
}


def export_tiny_model(
    repository: Path,
    checkpoints: Path,
    name: str,
    arch: str,
    num_layers: int,
    seed: int = 0,
    version: int | None = None,
) -> Path:
    """Train nothing: save a seeded random model as a checkpoint and export it. Returns the version dir."""
    import torch

    from contract.tokenizer import CharTokenizer
    from export.exporter import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.model import RNNLanguageModel

    tokenizer = CharTokenizer(sorted(set(ALPHABET)))
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch, vocab_size=tokenizer.vocab_size, embedding_size=8, hidden_size=16, num_layers=num_layers
    )
    checkpoint = save_checkpoint(
        checkpoints / f"{name}-{seed}",
        RNNLanguageModel(config),
        tokenizer.to_dict(),
        step=0,
        metrics={"val_loss": None},
    )
    return export_checkpoint(checkpoint, repository, name, version=version).path


class Oracle:
    """The exported ONNX model run offline on a whole token history, batch 1, zero state."""

    def __init__(self, version_dir: Path) -> None:
        self.session = ort.InferenceSession(
            str(version_dir / sig.MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.state_inputs = [n for n in (sig.H0, sig.C0) if n in inputs]
        self.state_shape = [int(d) for d in inputs[sig.H0].shape[1:]]

    def last_logits(self, history: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) after the last token of `history`."""
        tokens = np.array([list(history)], dtype=np.int64)
        feeds = {sig.TOKENS: tokens, sig.LENGTHS: np.array([len(history)], np.int32)}
        feeds.update({name: np.zeros([1, *self.state_shape], np.float32) for name in self.state_inputs})
        return self.session.run([sig.LAST_LOGITS], feeds)[0][0]

    def logprobs(self, history: Sequence[int]) -> np.ndarray:
        logits = self.last_logits(history).astype(np.float64)
        return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
