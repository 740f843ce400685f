"""Self-describing checkpoints that load without unpickling code.

A checkpoint is a directory:

    model.safetensors   best weights so far (what export reads)
    checkpoint.json     model config, tokenizer, step, metrics, training settings, weights sha256
    last.safetensors    latest weights, for resuming
    optimizer.pt        latest optimizer state (tensors only: torch.load(weights_only=True))
    training_curve.png  losses against steps

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from contract.hashing import sha256_file
from models.config import ModelConfig
from models.model import RNNLanguageModel

FORMAT = "rnnserve-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
LAST_WEIGHTS_FILE = "last.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CURVE_FILE = "training_curve.png"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and everything that describes it."""

    path: Path
    model: RNNLanguageModel
    config: ModelConfig
    tokenizer: dict[str, Any]
    step: int
    metrics: dict[str, Any]
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename tmp_path over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file 0600; a checkpoint is read by other users (the export or
        # serving container), so give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: Path, model: RNNLanguageModel) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def save_checkpoint(
    directory: Path | str,
    model: RNNLanguageModel,
    tokenizer: dict[str, Any],
    step: int,
    metrics: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights as the checkpoint's best weights, then the JSON describing them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_weights(weights, model)
    meta = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer,
        "step": step,
        "metrics": metrics,
        "training": training or {},
        "weights_sha256": sha256_file(weights),
    }
    text = json.dumps(meta, indent=2, ensure_ascii=False)
    _atomic_write(directory / CHECKPOINT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def read_checkpoint_json(directory: Path | str) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} is not a directory (expected {CHECKPOINT_FILE} inside)"
        )
    meta_path = directory / CHECKPOINT_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CHECKPOINT_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not an rnnserve checkpoint (expected format {FORMAT!r})")
    return meta


def load_checkpoint(
    directory: Path | str, weights_file: str = WEIGHTS_FILE, map_location: str = "cpu"
) -> Checkpoint:
    """Load a checkpoint directory; raise CheckpointError naming what is wrong."""
    directory = Path(directory)
    meta = read_checkpoint_json(directory)
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CHECKPOINT_FILE}: bad model config: {error}") from None
    weights = directory / weights_file
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {weights_file}")
    digest = sha256_file(weights)
    if weights_file == WEIGHTS_FILE and digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} is corrupted: sha256 {digest[:12]}… does not match "
            f"{str(meta.get('weights_sha256'))[:12]}… recorded in {CHECKPOINT_FILE}"
        )
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights} cannot be read: {error}") from None
    model = RNNLanguageModel(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{weights} does not match the model config: {error}") from None
    model.eval()
    return Checkpoint(
        path=directory,
        model=model,
        config=config,
        tokenizer=meta.get("tokenizer", {}),
        step=int(meta.get("step", 0)),
        metrics=dict(meta.get("metrics", {})),
        weights_sha256=digest,
        training=dict(meta.get("training", {})),
    )


def save_optimizer(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    _atomic_write(directory / OPTIMIZER_FILE, lambda tmp: torch.save(optimizer.state_dict(), tmp))


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
