"""Validation loss of an exported model next to the PyTorch checkpoint's, on the same batches.

The batches are the checkpoint's own validation split, rebuilt by models.data from
checkpoint.json's "training" record (data spec and the sha256 of the data). When they cannot be
rebuilt (a checkpoint saved from a random-init model records no data; a corpus that moved or
changed), `load_validation_data` says why and the exporter falls back to the loss the checkpoint
recorded.

Loss is the token-weighted mean cross-entropy in nats over every real (non-padding) target, each
row starting from a zero state, as training computes metrics["val_loss"]. An export scores at most
MAX_VALIDATION_TARGETS targets (evenly spaced rows of the split) with both PyTorch and
onnxruntime: the comparison is paired on the same tokens, and scoring all of Shakespeare's
250 k validation characters twice took over a minute per export on a 2-core machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models import data
from models.checkpoint import Checkpoint

MAX_VALIDATION_TARGETS = 32_768

# (tokens (B, T) int64, lengths (B,) int32) -> logits (B, T, V), starting from a zero state.
LogitsFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ValidationData:
    batches: tuple[data.Batch, ...]  # right-padded; targets are IGNORE_INDEX at padding
    description: str  # where they came from, recorded in config.json

    @property
    def num_targets(self) -> int:
        return sum(batch.num_targets for batch in self.batches)


def load_validation_data(checkpoint: Checkpoint) -> tuple[ValidationData | None, str]:
    """The checkpoint's validation batches, or (None, why they cannot be rebuilt)."""
    if "data" not in checkpoint.training:
        return None, "the checkpoint records no training data (e.g. it was saved from an untrained model)"
    try:
        spec = data.DataSpec.from_dict(checkpoint.training["data"])
        batches = list(data.validation_batches(checkpoint.training, checkpoint.tokenizer))
    except data.DataError as error:
        return None, str(error)
    total = sum(batch.num_targets for batch in batches)
    stride = math.ceil(total / MAX_VALIDATION_TARGETS)
    if stride > 1:
        # Every stride-th row: rows spread over the whole split estimate its loss far better than
        # a few whole batches (each batch is one contiguous stretch of a single play).
        batches = [_every_nth_row(batch, stride) for batch in batches]
        batches = [batch for batch in batches if batch.tokens.shape[0]]
        subset = sum(batch.num_targets for batch in batches)
        description = (
            f"{subset} of the {total} validation targets (one row in {stride}) of {spec.description}"
        )
    else:
        description = f"all {total} validation targets of {spec.description}"
    return ValidationData(tuple(batches), description), ""


def _every_nth_row(batch: data.Batch, stride: int) -> data.Batch:
    return data.Batch(
        tokens=batch.tokens[::stride],
        targets=batch.targets[::stride],
        lengths=None if batch.lengths is None else batch.lengths[::stride],
    )


def mean_loss(logits_of: LogitsFunction, validation: ValidationData) -> float:
    """Mean cross-entropy (nats per target) of `logits_of` over the validation batches."""
    total, count = 0.0, 0
    for batch in validation.batches:
        lengths = batch.lengths
        if lengths is None:  # every row full
            lengths = np.full(batch.tokens.shape[0], batch.tokens.shape[1], np.int32)
        batch_total, batch_count = data.cross_entropy_sum(logits_of(batch.tokens, lengths), batch.targets)
        total += batch_total
        count += batch_count
    return total / count


def torch_logits(model: torch.nn.Module) -> LogitsFunction:
    """The PyTorch oracle as a LogitsFunction (packed sequences, zero initial state)."""

    def logits_of(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(tokens), None, torch.from_numpy(lengths.astype(np.int64)))
        return logits.numpy()

    return logits_of
