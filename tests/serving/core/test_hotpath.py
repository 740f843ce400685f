"""The batcher's hot path keeps its results: top-k ties, buffered random draws, and Generate
replies that carry several tokens when many generations share a batch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np

from serving.clients.client import RnnserveClient, Sampling
from serving.core.batcher import Delivery, GenerateWork, TokenChannel
from serving.core.sampling import DRAW_BLOCK, Sampler, SamplingParams, sample, top_k
from tests.support.servers import ServerThread, run


def test_top_k_breaks_ties_by_id_in_large_vocabularies() -> None:
    """The partition path (a large vocabulary) ranks like a stable full sort, even where the k-th
    value is tied with ids the partition left out."""
    rng = np.random.default_rng(0)
    logprobs = rng.standard_normal((6, 3000)).astype(np.float32) - 10.0
    logprobs[:, 500:520] = 0.0  # 20 tied maxima: which 5 of them is decided by id alone
    logprobs[1, 7] = 1.0
    logprobs[2, 2999] = 0.0
    expected = np.argsort(-logprobs, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top_k(logprobs, 5), expected)
    assert top_k(logprobs, 5)[0].tolist() == [500, 501, 502, 503, 504]


def test_a_sampler_takes_its_generators_numbers_in_order() -> None:
    """Block draws give the stream of one-at-a-time draws, across block boundaries."""
    sampler = Sampler(SamplingParams(seed=7))
    one_at_a_time = np.random.default_rng(7)
    draws = [sampler.uniform() for _ in range(2 * DRAW_BLOCK + 5)]
    assert draws == [one_at_a_time.random() for _ in range(2 * DRAW_BLOCK + 5)]


def test_sampled_tokens_follow_the_seed_and_not_the_block() -> None:
    """The k-th token of a seeded sampler is the same whether it is sampled alone or among
    greedy rows (which take no draw), step after step."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((80, 40)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=12, top_p=0.95, seed=11)
    alone, mixed = Sampler(params), Sampler(params)
    greedy = [Sampler(SamplingParams(temperature=0.0)) for _ in range(3)]
    for row in logits:
        single = sample(row[None, :], [alone])[0]
        batch = sample(np.stack([row, row, row, row]), [greedy[0], mixed, greedy[1], greedy[2]])
        assert batch[1] == single
        assert batch[0] == batch[2] == batch[3] == np.argmax(row)


def _generation(capacity: int, max_new_tokens: int = 1000) -> GenerateWork:
    return GenerateWork(
        slot=0,
        prompt=np.zeros(1, np.int64),
        sampler=Sampler(SamplingParams(seed=1)),
        max_new_tokens=max_new_tokens,
        stop_tokens=frozenset(),
        feed_final=False,
        channel=TokenChannel(capacity),
        rollback=False,
        on_finish=lambda work, error: None,
    )


def _wakes(work: GenerateWork, tokens: int, reply_tokens: int) -> list[int]:
    """Emit `tokens` tokens nobody takes; return after which ones the reader was woken (1-based)."""
    woken = []
    for produced in range(1, tokens + 1):
        deliveries: list[Delivery] = []
        work.emit(produced, deliveries, reply_tokens)
        if work.channel.wake in deliveries:
            woken.append(produced)
    return woken


def test_a_waiting_reader_is_woken_once_a_reply_is_due() -> None:
    """The first token wakes the reader at once; later ones once `reply_tokens` are buffered."""
    work = _generation(capacity=100)
    assert _wakes(work, 3, reply_tokens=4) == [1]
    asyncio.run(work.channel.take())  # the reader takes the three buffered tokens
    assert _wakes(work, 9, reply_tokens=4) == [4, 5, 6, 7, 8, 9]  # due from the 4th on


def test_the_last_token_wakes_the_reader_at_once() -> None:
    work = _generation(capacity=100, max_new_tokens=6)
    assert _wakes(work, 6, reply_tokens=10) == [1, 6]


def test_a_full_buffer_wakes_the_reader_whatever_the_reply_size() -> None:
    work = _generation(capacity=3)
    assert _wakes(work, 3, reply_tokens=50) == [1, 3]  # the first token, then the full buffer
    assert work.channel.cancel()  # it was paused: the caller must resume it


def test_a_cancelled_generation_is_never_paused_by_a_later_push() -> None:
    """The cancel can land between the worker's check of `cancelled` and its push that fills the
    buffer: that push must not pause the generation, or nobody would ever resume and drop it."""
    work = _generation(capacity=3)
    assert not work.channel.cancel()  # not paused yet
    paused = [work.channel.push(token, may_pause=True)[0] for token in (5, 6, 7, 8)]
    assert paused == [False, False, False, False]


def test_many_generations_share_replies_and_keep_their_tokens(
    make_server: Callable[..., ServerThread],
) -> None:
    """48 generations in one batch with 4 replies per batch: the tokens are those of a server
    without batching, in fewer replies than tokens."""
    batched = make_server(max_batch_size=64)
    for model in batched.runtime.registry:
        batcher = model.batcher
        batcher.options = dataclasses.replace(batcher.options, replies_per_batch=4)
    unbatched = make_server(max_batch_size=1)

    async def generate_all(target: str) -> tuple[dict[int, list[int]], int]:
        replies = 0

        async def one(client: RnnserveClient, index: int) -> list[int]:
            nonlocal replies
            tokens: list[int] = []
            sampling = Sampling(seed=index, temperature=1.0)
            async for reply in client.generate(
                "tiny-gru", prompt_tokens=[index % 30], max_new_tokens=48, sampling=sampling
            ):
                replies += 1
                tokens.extend(reply.tokens)
            return tokens

        async with RnnserveClient(target) as client:
            results = await asyncio.gather(*(one(client, index) for index in range(48)))
        return dict(enumerate(results)), replies

    batched_tokens, batched_replies = run(generate_all(batched.target))
    unbatched_tokens, _ = run(generate_all(unbatched.target))
    assert batched_tokens == unbatched_tokens
    assert all(len(tokens) == 48 for tokens in batched_tokens.values())
    assert batched_replies < 48 * 48 / 2
