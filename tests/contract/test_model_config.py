"""The config -> ONNX metadata mapping that the exporter, export verification and the server share."""

from __future__ import annotations

from dataclasses import dataclass

from contract import signature as sig
from contract.model_config import CONFIG_METADATA_FIELDS, config_metadata


@dataclass(frozen=True)
class Shape:
    arch: str = "gru"
    vocab_size: int = 84
    num_layers: int = 2
    hidden_size: int = 64
    embedding_size: int = 32
    pad_id: int = 0


def test_config_metadata_writes_every_field_as_a_string() -> None:
    assert config_metadata(Shape()) == {
        "arch": "gru",
        "vocab_size": "84",
        "num_layers": "2",
        "hidden_size": "64",
        "embedding_size": "32",
        "pad_id": "0",
    }


def test_every_config_field_is_a_metadata_key_of_the_signature() -> None:
    assert set(CONFIG_METADATA_FIELDS) <= set(sig.METADATA_KEYS)
