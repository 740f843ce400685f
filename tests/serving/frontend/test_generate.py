"""Generate: seeded determinism, cancellation and deadlines stop the work, slow readers get
coalesced responses from a bounded buffer, and a failed onnxruntime run fails only its batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient, Sampling
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run


async def generate_tokens(target: str, **kwargs: Any) -> list[int]:
    async with RnnserveClient(target) as client:
        return [t async for r in client.generate(**kwargs) for t in r.tokens]


def test_same_seed_same_tokens(server: ServerThread) -> None:
    request = {"model": "tiny-gru", "prompt_text": "hello", "max_new_tokens": 40}
    first = run(generate_tokens(server.target, sampling=Sampling(seed=123), **request))
    again = run(generate_tokens(server.target, sampling=Sampling(seed=123), **request))
    other = run(generate_tokens(server.target, sampling=Sampling(seed=124), **request))
    assert first == again and len(first) == 40
    assert first != other


def test_greedy_generation_follows_the_offline_model(
    server: ServerThread, oracles: dict[str, Oracle]
) -> None:
    prompt = [1, 2, 3]
    tokens = run(
        generate_tokens(
            server.target,
            model="tiny-lstm",
            prompt_tokens=prompt,
            max_new_tokens=8,
            sampling=Sampling(temperature=0),
        )
    )
    history = list(prompt)
    for token in tokens:
        assert token == int(np.argmax(oracles["tiny-lstm"].last_logits(history)))
        history.append(token)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_cancelled_generate_stops_computing(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(generate_buffer_tokens=4096)
    rows = server.observer.rows

    async def scenario() -> int:
        async with RnnserveClient(server.target) as client:
            received = 0
            async for response in client.generate("tiny-lstm", prompt_tokens=[1], max_new_tokens=4096):
                received += len(response.tokens)
                if received >= 20:
                    break  # leaving the iterator cancels the call
            return received

    received = run(scenario())
    assert received < 4096
    assert wait_until(lambda: server.on_loop(len, server.runtime.sessions) == 0), "the session was not closed"
    settled = rows()
    time.sleep(0.3)
    assert rows() == settled, "the generation kept running after its call was cancelled"
    assert settled < 4096


def test_expired_deadline_stops_generate(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(generate_buffer_tokens=4)

    async def scenario() -> grpc.StatusCode:
        async with RnnserveClient(server.target) as client:
            call = client.generate("tiny-gru", prompt_tokens=[1], max_new_tokens=4096, timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                async for _ in call:
                    await asyncio.sleep(0.05)  # a slow reader: the buffer fills, decoding pauses
            return expired.value.code()

    assert run(scenario()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.on_loop(len, server.runtime.sessions) == 0)
    settled = server.observer.rows()
    time.sleep(0.2)
    assert server.observer.rows() == settled


def test_slow_reader_gets_coalesced_tokens_from_a_bounded_buffer(
    make_server: Callable[..., ServerThread],
) -> None:
    """A reader that stalls: once HTTP/2 flow control stops the server's writes, the generation
    fills its 8-token buffer and pauses; reading again gets the buffered tokens in few messages."""
    server = make_server(generate_buffer_tokens=8)
    rows = server.observer.rows
    # A small receive window (no BDP growth) makes flow control bite after a few messages.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]

    async def scenario() -> tuple[list[pb.GenerateResponse], int, int]:
        channel = grpc.aio.insecure_channel(server.target, options=options)
        async with RnnserveClient(server.target, channel=channel) as client:
            responses: list[pb.GenerateResponse] = []
            stalled = (0, 0)
            async for response in client.generate(
                "tiny-lstm", prompt_tokens=[1, 2], max_new_tokens=1500, sampling=Sampling(seed=9)
            ):
                responses.append(response)
                if len(responses) == 1:
                    await asyncio.sleep(0.3)
                    before = rows()
                    await asyncio.sleep(0.3)
                    stalled = (before, rows())
            return responses, *stalled

    responses, before, after = run(scenario())
    sizes = [len(r.tokens) for r in responses]
    assert sum(sizes) == 1500
    assert before == after < 1500, "decoding went on while the reader stalled"
    assert max(sizes) <= 8, "more tokens were buffered than the bound allows"
    assert sizes.count(8) > 0 and len(responses) < 1500, "tokens were not coalesced"
    fast = run(
        generate_tokens(
            server.target,
            model="tiny-lstm",
            prompt_tokens=[1, 2],
            max_new_tokens=1500,
            sampling=Sampling(seed=9),
        )
    )
    assert [t for r in responses for t in r.tokens] == fast  # pausing does not change the tokens


class FailingStep:
    """Wraps an engine's step; raises while `failing` is set (onnxruntime failing on a batch)."""

    def __init__(self, step: Callable[..., np.ndarray]) -> None:
        self.step = step
        self.failing = False
        self.calls = 0

    def __call__(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.failing:
            raise RuntimeError("injected onnxruntime failure")
        return self.step(slots, tokens, lengths)


def test_a_failed_run_fails_only_its_batch_and_keeps_the_state(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    server = make_server(prompt_piece_tokens=4)
    engine = server.registry.latest("tiny-lstm").engine
    failing = FailingStep(engine.step)
    engine.step = failing

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            lstm = (await client.create_session("tiny-lstm")).session_id
            gru = (await client.create_session("tiny-gru")).session_id
            await client.step(lstm, [1, 2])
            await client.step(gru, [1, 2])
            failing.failing = True
            for request in (client.step(lstm, [3]), client.step(lstm, list(range(10)))):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await request
                assert failed.value.code() == grpc.StatusCode.INTERNAL
                assert "injected onnxruntime failure" in (failed.value.details() or "")
                assert "the session's state is unchanged" in (failed.value.details() or "")
            other = await client.step(gru, [3], return_logits=True)  # another model is untouched
            np.testing.assert_allclose(
                other.prediction.logits, oracles["tiny-gru"].last_logits([1, 2, 3]), atol=1e-5
            )
            failing.failing = False
            step = await client.step(lstm, [3], return_logits=True)
            assert step.prediction.position == 3
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-lstm"].last_logits([1, 2, 3]), atol=1e-5
            )

    run(scenario())
    assert server.observer.failed and all(model == "tiny-lstm" for model, _ in server.observer.failed)


def test_a_run_failing_midway_rolls_back_earlier_pieces(
    make_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    server = make_server(prompt_piece_tokens=4)
    engine = server.registry.latest("tiny-gru").engine

    class FailSecondRun(FailingStep):
        def __call__(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            self.failing = self.calls == 1  # the request's first run succeeds, its second fails
            return super().__call__(slots, tokens, lengths)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session_id = (await client.create_session("tiny-gru")).session_id
            await client.step(session_id, [5])
            engine.step = FailSecondRun(engine.step)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.step(session_id, list(range(10)))
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            engine.step = FailSecondRun(engine.step.step)
            with pytest.raises(grpc.aio.AioRpcError):  # a kept session's generation fails midway
                await generate_tokens(
                    server.target, session_id=session_id, prompt_tokens=[7, 7, 7, 7, 7], max_new_tokens=5
                )
            del engine.step  # back to the class's step
            step = await client.step(session_id, [6], return_logits=True)
            assert step.prediction.position == 2
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-gru"].last_logits([5, 6]), atol=1e-5
            )

    run(scenario())
