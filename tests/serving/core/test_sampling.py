"""Sampling: log-probabilities, top-k, and seeded sampling that ignores the rest of the batch."""

from __future__ import annotations

import numpy as np
import pytest

from serving.core.errors import InvalidArgumentError
from serving.core.sampling import Sampler, SamplingParams, log_softmax, sample, top_k


def samplers(*params: SamplingParams) -> list[Sampler]:
    return [Sampler(p) for p in params]


def test_log_softmax_rows_are_normalised() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], np.float32)
    logprobs = log_softmax(logits)
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(logprobs[1, :2]).all()


def test_top_k_is_sorted_and_breaks_ties_by_id() -> None:
    assert top_k(np.array([[0.1, 0.5, 0.5, 0.2], [0.4, 0.3, 0.2, 0.1]], np.float32), 3).tolist() == [
        [1, 2, 3],
        [0, 1, 2],
    ]
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(4, 1000)).astype(np.float32)  # the partitioning path
    wide[0, [7, 500]] = 9.0
    np.testing.assert_array_equal(top_k(wide, 5), np.argsort(-wide, axis=1, kind="stable")[:, :5])


def test_greedy_picks_the_most_likely_token() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 5.0, 1.0]], np.float32)
    tokens = sample(logits, samplers(SamplingParams(temperature=0), SamplingParams(temperature=0)))
    assert tokens.tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 400, np.float32))
    with_k = sample(logits, samplers(*[SamplingParams(top_k=2, seed=s) for s in range(400)]))
    assert set(with_k.tolist()) == {0, 1}
    with_p = sample(logits, samplers(*[SamplingParams(top_p=0.7, seed=s) for s in range(400)]))
    assert set(with_p.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    tiny_p = sample(logits[:50], samplers(*[SamplingParams(top_p=0.01, seed=s) for s in range(50)]))
    assert set(tiny_p.tolist()) == {0}


def test_sampling_follows_the_distribution() -> None:
    probabilities = np.array([0.6, 0.3, 0.1])
    logits = np.log(np.tile(probabilities, (4000, 1)).astype(np.float32))
    tokens = sample(logits, samplers(*[SamplingParams(seed=s) for s in range(4000)]))
    frequencies = np.bincount(tokens, minlength=3) / len(tokens)
    np.testing.assert_allclose(frequencies, probabilities, atol=0.03)


def test_a_seeded_row_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 50)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=42)
    alone_sampler = Sampler(params)
    alone = [int(sample(row, [alone_sampler])[0]) for _ in range(5)]
    batched_sampler = Sampler(params)
    in_batches = []
    for step in range(5):  # different companions, greedy or not, before it in each batch
        companions = rng.normal(size=(step + 1, 50)).astype(np.float32)
        others = [
            Sampler(SamplingParams(temperature=float(i % 2), seed=step * 10 + i)) for i in range(step + 1)
        ]
        tokens = sample(np.concatenate([companions, row]), [*others, batched_sampler])
        in_batches.append(int(tokens[-1]))
    assert alone == in_batches
    assert len(set(alone)) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.01}, "top_p must be in (0, 1]"),
        ({"top_k": 11}, "sampling top_k must be at most the vocabulary size 10"),
    ],
)
def test_nonsensical_options_are_refused(kwargs: dict[str, float], message: str) -> None:
    values = {"temperature": None, "top_k": 0, "top_p": None, "seed": None, **kwargs}
    with pytest.raises(InvalidArgumentError) as refused:
        SamplingParams.validated(
            values["temperature"], int(values["top_k"] or 0), values["top_p"], None, vocab_size=10
        )
    assert message in str(refused.value)


def test_unset_options_take_the_defaults() -> None:
    params = SamplingParams.validated(None, 0, None, None, vocab_size=10)
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (1.0, 0, 1.0, None)
