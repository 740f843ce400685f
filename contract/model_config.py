"""Names shared by the model config, the ONNX file and the repository, and how they map.

A model's shape (architecture and sizes) travels in three places: the checkpoint's ModelConfig,
config.json beside model.onnx in the repository, and the ONNX file's `metadata_props`. The
exporter writes the metadata from the config, export verification and the server's repository
check compare it against the config; all three use `config_metadata`, so the mapping is written
once.
"""

from __future__ import annotations

from typing import Protocol

ARCHITECTURES = ("lstm", "gru")  # recurrent cells a model may use
PRECISIONS = ("fp32", "int8", "fp16")  # weights of an exported model.onnx

# The ModelConfig fields that metadata_props carries, each under its own name, as str(value).
CONFIG_METADATA_FIELDS = ("arch", "vocab_size", "num_layers", "hidden_size", "embedding_size", "pad_id")


class ModelShape(Protocol):
    """What `config_metadata` reads: models.config.ModelConfig and the server's manifest both fit."""

    @property
    def arch(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def embedding_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...


def config_metadata(shape: ModelShape) -> dict[str, str]:
    """The metadata_props entries of a model's shape: {"arch": "lstm", "vocab_size": "84", ...}."""
    return {field: str(getattr(shape, field)) for field in CONFIG_METADATA_FIELDS}
