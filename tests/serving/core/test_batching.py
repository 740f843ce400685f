"""Batching is correct: hundreds of interleaved sessions match the offline model, and batching on
gives what batching off (max_batch_size=1) gives, for ragged chunks, interleaved sessions and
seeded generations, LSTM and GRU."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from serving.clients.client import RnnserveClient, Sampling
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run

SESSIONS = 200
OPERATIONS = 6


async def exercise_session(client: RnnserveClient, model: str, oracle: Oracle, seed: int) -> list[str]:
    """Random chunks (some longer than a piece) and resets on one session, over a Stream or Steps;
    every prediction is checked against the oracle on the history since the last reset."""
    rng = random.Random(seed)
    vocab = 32
    history: list[int] = []
    problems: list[str] = []

    def check(logits: list[float], position: int) -> None:
        expected = oracle.last_logits(history)
        if position != len(history) or not np.allclose(logits, expected, atol=1e-5):
            problems.append(
                f"session {seed}: mismatch after {len(history)} tokens (position {position}), "
                f"max error {np.abs(np.asarray(logits) - expected).max():.2e}"
            )

    def next_chunk() -> list[int]:
        length = rng.choice([1, 1, 1, 2, 3, 5, 9, 17])
        return [rng.randrange(vocab) for _ in range(length)]

    if seed % 2:
        async with client.stream(model, return_logits=True) as stream:
            for _ in range(OPERATIONS):
                if history and rng.random() < 0.15:
                    await stream.reset()
                    history.clear()
                    continue
                chunk = next_chunk()
                history.extend(chunk)
                prediction = await stream.send(chunk)
                check(list(prediction.logits), prediction.position)
            await stream.end()
    else:
        session_id = (await client.create_session(model)).session_id
        for _ in range(OPERATIONS):
            chunk = next_chunk()
            history.extend(chunk)
            step = await client.step(session_id, chunk, return_logits=True)
            check(list(step.prediction.logits), step.prediction.position)
        await client.close_session(session_id)
    return problems


@pytest.mark.parametrize(
    ("model", "state_on_device", "sessions"),
    [
        ("tiny-lstm", False, SESSIONS),
        ("tiny-gru", False, SESSIONS),
        ("tiny-lstm", True, 64),  # the device-pool path (double-buffered pool in the graph), on CPU
    ],
)
def test_interleaved_sessions_match_the_offline_model(
    make_server: Callable[..., ServerThread],
    oracles: dict[str, Oracle],
    model: str,
    state_on_device: bool,
    sessions: int,
) -> None:
    server = make_server(prompt_piece_tokens=4, state_on_device=state_on_device)

    async def scenario() -> list[str]:
        async with RnnserveClient(server.target) as client:
            results = await asyncio.gather(
                *(exercise_session(client, model, oracles[model], seed) for seed in range(sessions))
            )
        return [problem for problems in results for problem in problems]

    problems = run(scenario())
    assert problems == []
    assert server.observer.largest_batch() > 1, "the sessions never shared a batch"
    assert server.on_loop(len, server.runtime.sessions) == 0


@dataclass(frozen=True)
class Outcome:
    """Everything a deterministic workload observed, for comparing two servers."""

    top_ids: dict[tuple[int, int], list[int]]
    logprobs: dict[tuple[int, int], list[float]]
    sampled: dict[tuple[int, int], int]
    generated: dict[int, list[int]]


async def deterministic_workload(target: str, model: str) -> Outcome:
    """Ragged chunks on interleaved seeded streams, and seeded generations, all at once."""
    top_ids: dict[tuple[int, int], list[int]] = {}
    logprobs: dict[tuple[int, int], list[float]] = {}
    sampled: dict[tuple[int, int], int] = {}
    generated: dict[int, list[int]] = {}

    async def stream_session(client: RnnserveClient, index: int) -> None:
        rng = random.Random(1000 + index)
        sampling = Sampling(
            seed=index, temperature=0.5 + index % 3 / 2, top_k=index % 7, top_p=1 - index % 4 / 10
        )
        async with client.stream(model, top_k=4, sampling=sampling) as stream:
            for step in range(5):
                chunk = [rng.randrange(32) for _ in range(rng.choice([1, 2, 6, 11]))]
                prediction = await stream.send(chunk)
                top_ids[index, step] = list(prediction.top_ids)
                logprobs[index, step] = list(prediction.top_logprobs)
                sampled[index, step] = prediction.sampled_token
            await stream.end()

    async def generation(client: RnnserveClient, index: int) -> None:
        sampling = Sampling(
            seed=77 + index,
            temperature=[0.0, 0.7, 1.0, 1.3][index % 4],
            top_k=index % 5,
            top_p=[1.0, 0.9, 0.6][index % 3],
        )
        prompt = [(3 * index + k) % 32 for k in range(1 + index % 9)]
        generated[index] = [
            t
            async for r in client.generate(model, prompt_tokens=prompt, max_new_tokens=25, sampling=sampling)
            for t in r.tokens
        ]

    async with RnnserveClient(target) as client:
        await asyncio.gather(
            *(stream_session(client, i) for i in range(24)), *(generation(client, i) for i in range(12))
        )
    return Outcome(top_ids, logprobs, sampled, generated)


@pytest.mark.parametrize("model", ["tiny-lstm", "tiny-gru"])
def test_batching_on_equals_batching_off(make_server: Callable[..., ServerThread], model: str) -> None:
    batched = make_server(max_batch_size=64, prompt_piece_tokens=4)
    unbatched = make_server(max_batch_size=1, prompt_piece_tokens=4)
    with_batching = run(deterministic_workload(batched.target, model))
    without_batching = run(deterministic_workload(unbatched.target, model))
    assert batched.observer.largest_batch() > 1
    assert unbatched.observer.largest_batch() == 1
    assert with_batching.generated == without_batching.generated
    assert with_batching.sampled == without_batching.sampled
    assert with_batching.top_ids == without_batching.top_ids
    for key, values in with_batching.logprobs.items():
        np.testing.assert_allclose(values, without_batching.logprobs[key], atol=1e-5)


def test_long_chunks_run_in_pieces_between_single_steps(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    server = make_server(prompt_piece_tokens=8)
    long_prompt = [i % 32 for i in range(60)]

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            long_session = (await client.create_session("tiny-lstm")).session_id
            short_session = (await client.create_session("tiny-lstm")).session_id
            long_step = asyncio.ensure_future(client.step(long_session, long_prompt, return_logits=True))
            for t in range(10):
                await client.step(short_session, [t])
            result = await long_step
            np.testing.assert_allclose(
                result.prediction.logits, oracles["tiny-lstm"].last_logits(long_prompt), atol=1e-5
            )
            assert result.prediction.position == 60

    run(scenario())
    with server.observer.lock:
        widths = [tokens / rows for _, rows, tokens in server.observer.batches]
    assert max(widths) <= 8  # no row ran more than one piece at a time
