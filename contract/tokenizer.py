"""Tokenizers: how text maps to a model's token ids.

A tokenizer travels as a small JSON object in the checkpoint, in config.json and in the ONNX
metadata, so the server and clients encode text exactly as training did. Torch-free: the
training side, the exporter, the server and the client all import it.
"""

from __future__ import annotations

import codecs
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class TokenizerError(ValueError):
    """Text or ids that a tokenizer cannot map, or a malformed tokenizer description."""


class Tokenizer(ABC):
    """Base class: `encode(text) -> ids`, `decode(ids) -> text`, `to_dict()`."""

    kind = "abstract"
    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise TokenizerError(f"the {self.kind!r} tokenizer does not encode text")

    def decode(self, ids: Iterable[int]) -> str:
        raise TokenizerError(f"the {self.kind!r} tokenizer does not decode to text")

    def stream_decoder(self) -> Callable[[Sequence[int]], str]:
        """A decoder for ids that arrive in pieces (a multi-byte character may straddle two)."""
        return self.decode

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready description that `tokenizer_from_dict` reads back."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet, built from the training text."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise TokenizerError("a character vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("a character vocabulary must list distinct single characters")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise TokenizerError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as error:
            allowed = "".join(self.chars)
            raise TokenizerError(
                f"character {error.args[0]!r} is not in the model's vocabulary of "
                f"{self.vocab_size} characters: {allowed!r}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            raise TokenizerError(f"token id outside the vocabulary (size {self.vocab_size})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab": self.chars}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255: any text encodes, nothing is out of vocabulary."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[Sequence[int]], str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: decoder.decode(bytes(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind}


# The kinds that map text (a model with an `ids` tokenizer takes and returns token ids only).
TEXT_TOKENIZERS = (CharTokenizer.kind, ByteTokenizer.kind)


class IdTokenizer(Tokenizer):
    """Pre-tokenized data: ids only, no text (e.g. a JSONL corpus of token ids)."""

    kind = "ids"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise TokenizerError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(i) for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size}


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer(data["vocab"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "ids":
        return IdTokenizer(int(data["vocab_size"]))
    raise TokenizerError(f"unknown tokenizer type {kind!r}; expected 'char', 'byte' or 'ids'")


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerError(f"tokenizer description is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise TokenizerError("tokenizer description must be a JSON object")
    return tokenizer_from_dict(data)
