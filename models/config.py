"""Model configuration: one frozen dataclass shared by training, checkpoints and export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from contract.model_config import ARCHITECTURES


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an embedding -> LSTM/GRU -> linear next-token model."""

    arch: str  # "lstm" (state h and c) or "gru" (state h only)
    vocab_size: int  # number of token ids, 0..vocab_size-1
    embedding_size: int = 256  # width of the token embedding fed to the first layer
    hidden_size: int = 512  # width of h (and c) in every layer
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between recurrent layers (training only)
    pad_id: int = 0  # token id used for right padding; never reaches loss or state

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the recurrent state tensors: ("h", "c") for LSTM, ("h",) for GRU."""
        return ("h", "c") if self.arch == "lstm" else ("h",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
