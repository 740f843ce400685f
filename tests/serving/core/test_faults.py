"""Faults against a real server: clients that vanish mid-stream, cancelled and expired calls, and
onnxruntime failing on one batch. After each, nothing leaks (sessions, state pool slots, queued
work, event loop tasks back to where they were) and every surviving session predicts exactly what
the offline model predicts on its history.

Work is held in a model's queue with a WorkerGate (the batcher thread parked between batches, as a
long run would park it), so "the step was still queued when the client left" is certain, not a race.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient, Sampling
from tests.support.faults import (
    FailingBatches,
    WorkerGate,
    footprint,
    session_busy,
    session_slot,
    settles_to,
    wait_until,
)
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def watched_server(make_server: Callable[..., ServerThread]) -> Iterator[Callable[..., ServerThread]]:
    """make_server, plus a check when the test ends that no exception was left unretrieved on any
    of the servers' event loops (a background task failing unseen)."""
    problems: list[dict[str, object]] = []

    def make(**overrides: object) -> ServerThread:
        server = make_server(**overrides)
        server.on_loop(server.loop.set_exception_handler, lambda loop, context: problems.append(context))
        return server

    yield make
    assert not problems, problems


# A client process that opens a Stream, sends two chunks and reports its session; then, when told
# on stdin, sends a third chunk. The test kills it with SIGKILL while idle or while that chunk is queued.
KILLED_CLIENT = """
import asyncio, json, sys
from serving.clients.client import RnnserveClient

async def main(target):
    async with RnnserveClient(target) as client, client.stream("tiny-lstm") as stream:
        await stream.send([1, 2, 3])
        await stream.send([4])
        print(json.dumps({"session_id": stream.session_id}), flush=True)
        if (await asyncio.to_thread(sys.stdin.readline)).strip() == "third":
            await stream.send([5, 6])
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


class KilledClient:
    """The client process above; `session_id` once it has streamed its first two chunks."""

    def __init__(self, target: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, target],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        line = self.process.stdout.readline()
        if not line:
            self.kill()
            raise AssertionError(f"the client process exited ({self.process.returncode}) before streaming")
        self.session_id: str = json.loads(line)["session_id"]

    def send_third_chunk(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("third\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


async def resume_and_step(target: str, session_id: str, tokens: list[int]) -> tuple[list[float], int]:
    async with (
        RnnserveClient(target) as client,
        client.stream(session_id=session_id, return_logits=True) as s,
    ):
        prediction = await s.send(tokens)
        return list(prediction.logits), prediction.position


@pytest.mark.parametrize("queued", [False, True], ids=["idle", "chunk-queued"])
def test_a_killed_client_leaves_its_session_for_resumption_until_it_expires(
    watched_server: Callable[..., ServerThread], oracles: dict[str, Oracle], queued: bool
) -> None:
    """SIGKILL the client process: its session stays resumable with the same predictions (a chunk
    still queued when the connection dropped is dropped, not half-applied), then expires after the
    idle timeout and frees everything."""
    server = watched_server(session_idle_timeout_s=2.0)
    baseline = footprint(server)
    client = KilledClient(server.target)
    if queued:
        with WorkerGate(server, "tiny-lstm") as gate:
            client.send_third_chunk()
            gate.wait_for_backlog(1)
            client.kill()
            time.sleep(0.5)  # the server sees the connection reset and cancels the handler
        assert wait_until(lambda: gate.backlog() == 0)
    else:
        client.kill()
    logits, position = run(resume_and_step(server.target, client.session_id, [7]))
    assert position == 5, "the chunk queued at the disconnect was applied"
    np.testing.assert_allclose(logits, oracles["tiny-lstm"].last_logits([1, 2, 3, 4, 7]), atol=1e-5)
    assert settles_to(server, baseline, timeout=10.0) == baseline  # expired and freed
    assert server.observer.ended == [("tiny-lstm", "expired")]


def test_a_killed_client_frees_its_session_at_once_with_close_on_disconnect(
    watched_server: Callable[..., ServerThread],
) -> None:
    server = watched_server(close_on_disconnect=True)
    baseline = footprint(server)
    client = KilledClient(server.target)
    with WorkerGate(server, "tiny-lstm") as gate:
        client.send_third_chunk()
        gate.wait_for_backlog(1)
        client.kill()
        time.sleep(0.3)
        assert footprint(server).sessions == 1  # the close waits for the queued chunk to let go
    assert settles_to(server, baseline, timeout=5.0) == baseline

    async def resume() -> None:
        async with RnnserveClient(server.target) as client, client.stream(session_id=session_id):
            pass

    session_id = client.session_id
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        run(resume())
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"session {session_id} was closed" in (gone.value.details() or "")
    assert server.observer.ended == [("tiny-lstm", "closed")]


def test_a_cancelled_stream_chunk_is_dropped_and_the_session_resumes(
    watched_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    """A client that cancels its Stream while a chunk is queued: the chunk never runs."""
    server = watched_server()
    baseline = footprint(server)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            stream = client.stream("tiny-gru", return_logits=True)
            await stream.__aenter__()
            await stream.send([1, 2])
            with WorkerGate(server, "tiny-gru") as gate:
                pending = asyncio.ensure_future(stream.send([3, 4, 5]))
                await asyncio.to_thread(gate.wait_for_backlog, 1)
                pending.cancel()  # cancels the whole call, as a client going away does
                with pytest.raises(asyncio.CancelledError):
                    await pending
                await asyncio.sleep(0.3)
                rows_before = server.observer.rows("tiny-gru")
            assert await asyncio.to_thread(wait_until, lambda: gate.backlog() == 0)
            assert server.observer.rows("tiny-gru") == rows_before, "the cancelled chunk ran"
            async with client.stream(session_id=stream.session_id, return_logits=True) as resumed:
                prediction = await resumed.send([6])
                assert prediction.position == 3
                np.testing.assert_allclose(
                    prediction.logits, oracles["tiny-gru"].last_logits([1, 2, 6]), atol=1e-5
                )
                await resumed.end()

    run(scenario())
    assert settles_to(server, baseline) == baseline


def test_expired_step_deadlines_drop_queued_work(
    watched_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    server = watched_server()
    baseline = footprint(server)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session_id = (await client.create_session("tiny-lstm")).session_id
            await client.step(session_id, [9, 8])
            with WorkerGate(server, "tiny-lstm") as gate:
                rows_before = server.observer.rows("tiny-lstm")
                with pytest.raises(grpc.aio.AioRpcError) as expired:  # queued until its deadline
                    await client.stub.Step(
                        pb.StepRequest(session_id=session_id, tokens=[7, 7, 7]), timeout=0.3
                    )
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await asyncio.sleep(0.2)
            assert await asyncio.to_thread(wait_until, lambda: gate.backlog() == 0)
            assert server.observer.rows("tiny-lstm") == rows_before, "the expired Step ran"
            step = await client.step(session_id, [1], return_logits=True)
            assert step.prediction.position == 3
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-lstm"].last_logits([9, 8, 1]), atol=1e-5
            )
            await client.close_session(session_id)

    run(scenario())
    assert settles_to(server, baseline) == baseline


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_continued_generate_that_is_cancelled_or_expires_stops_and_rolls_back(
    watched_server: Callable[..., ServerThread], oracles: dict[str, Oracle], ending: str
) -> None:
    """The generation leaves the batches (steps run stop growing, nothing queued), and its session
    is as it was before the Generate: the tokens it made are not half-kept."""
    server = watched_server(generate_buffer_tokens=8)
    baseline = footprint(server)
    rows = server.observer.rows

    async def scenario() -> int:
        async with RnnserveClient(server.target) as client:
            session_id = (await client.create_session("tiny-gru")).session_id
            await client.step(session_id, [3, 1, 4])
            received = 0
            timeout = 0.5 if ending == "deadline" else None
            try:
                async for response in client.generate(
                    session_id=session_id,
                    prompt_tokens=[1, 5],
                    max_new_tokens=4000,
                    sampling=Sampling(seed=3),
                    timeout=timeout,
                ):
                    received += len(response.tokens)
                    await asyncio.sleep(0.01)  # a slow reader: the buffer fills, decoding pauses
                    if ending == "cancel" and received >= 30:
                        break  # leaving the iterator cancels the call
            except grpc.aio.AioRpcError as error:
                assert ending == "deadline" and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0 < received < 4000
            # The batcher lets go of the generation: the session is free and nothing is queued.
            assert await asyncio.to_thread(wait_until, lambda: not session_busy(server, session_id))
            assert footprint(server).backlog["tiny-gru"] == 0
            settled = rows("tiny-gru")
            await asyncio.sleep(0.3)
            assert rows("tiny-gru") == settled, "the generation kept running"
            step = await client.step(session_id, [2], return_logits=True)
            assert step.prediction.position == 4
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-gru"].last_logits([3, 1, 4, 2]), atol=1e-5
            )
            await client.close_session(session_id)
            return settled

    assert run(scenario()) < 4000
    assert settles_to(server, baseline) == baseline


def test_an_onnxruntime_failure_fails_only_its_batch(
    watched_server: Callable[..., ServerThread], oracles: dict[str, Oracle]
) -> None:
    """Four requests share a batch with a marked session (three Steps and a Generate continuing a
    session); onnxruntime fails on it. Those four get INTERNAL and keep their state; a request in
    the same model's next batch, and another model, are untouched; the server serves on."""
    server = watched_server()
    baseline = footprint(server)
    lstm, gru = oracles["tiny-lstm"], oracles["tiny-gru"]
    failing = FailingBatches(server.registry.latest("tiny-lstm").engine)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            names = ["marked", "b", "c", "generating", "other-batch"]
            ids = {n: (await client.create_session("tiny-lstm")).session_id for n in names}
            ids["gru"] = (await client.create_session("tiny-gru")).session_id
            history = {n: [i + 1, i + 2] for i, n in enumerate(ids)}
            for name, session_id in ids.items():
                await client.step(session_id, history[name])
            failing.marked.add(session_slot(server, ids["marked"]))

            with WorkerGate(server, "tiny-lstm") as gate:
                batch = [
                    asyncio.ensure_future(client.step(ids[n], [7], return_logits=True))
                    for n in ("marked", "b", "c")
                ]
                batch.append(
                    asyncio.ensure_future(
                        collect_tokens(client, ids["generating"], prompt=[7], max_new_tokens=3)
                    )
                )
                await asyncio.to_thread(gate.wait_for_backlog, 4)
                # A 5-token chunk is in another length bucket, so it runs in the next batch.
                next_batch = asyncio.ensure_future(client.step(ids["other-batch"], [6, 6, 6, 6, 6]))
                await asyncio.to_thread(gate.wait_for_backlog, 5)
                other_model = await client.step(ids["gru"], [9], return_logits=True)  # not held
                history["gru"].append(9)
                np.testing.assert_allclose(
                    other_model.prediction.logits, gru.last_logits(history["gru"]), atol=1e-5
                )
            failures = await asyncio.gather(*batch, return_exceptions=True)
            for failure in failures:
                assert isinstance(failure, grpc.aio.AioRpcError), failure
                assert failure.code() == grpc.StatusCode.INTERNAL
                assert "injected onnxruntime failure" in (failure.details() or "")
                assert "the session's state is unchanged" in (failure.details() or "")
            await next_batch
            history["other-batch"] += [6, 6, 6, 6, 6]
            assert (failing.failed, server.observer.failed) == (1, [("tiny-lstm", 4)])

            # Every session holds exactly its successful requests; the marked one still fails.
            for name in ("b", "c", "generating", "other-batch", "gru"):
                history[name].append(3)
                step = await client.step(ids[name], [3], return_logits=True)
                oracle = gru if name == "gru" else lstm
                assert step.prediction.position == len(history[name])
                np.testing.assert_allclose(
                    step.prediction.logits, oracle.last_logits(history[name]), atol=1e-5
                )
            with pytest.raises(grpc.aio.AioRpcError) as still_failing:
                await client.step(ids["marked"], [3])
            assert still_failing.value.code() == grpc.StatusCode.INTERNAL
            failing.marked.clear()  # onnxruntime recovers: the marked session serves again
            history["marked"].append(3)
            step = await client.step(ids["marked"], [3], return_logits=True)
            np.testing.assert_allclose(step.prediction.logits, lstm.last_logits(history["marked"]), atol=1e-5)
            for session_id in ids.values():
                await client.close_session(session_id)

    try:
        run(scenario())
    finally:
        failing.remove()
    assert settles_to(server, baseline) == baseline


async def collect_tokens(
    client: RnnserveClient, session_id: str, prompt: list[int], max_new_tokens: int
) -> list[int]:
    return [
        t
        async for r in client.generate(
            session_id=session_id, prompt_tokens=prompt, max_new_tokens=max_new_tokens
        )
        for t in r.tokens
    ]


def test_a_session_closed_by_another_client_while_its_stream_goes_away(
    watched_server: Callable[..., ServerThread],
) -> None:
    """close_on_disconnect closes the session of a Stream whose client vanished, after its queued
    chunk lets go; if another client closed the session first, that is the wanted end, not an
    error (no exception is left unretrieved on the server's event loop)."""
    server = watched_server(close_on_disconnect=True)
    baseline = footprint(server)

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            stream = client.stream("tiny-gru")
            await stream.__aenter__()
            await stream.send([1])
            with WorkerGate(server, "tiny-gru") as gate:
                pending = asyncio.ensure_future(stream.send([2]))
                await asyncio.to_thread(gate.wait_for_backlog, 1)
                closing = asyncio.ensure_future(client.close_session(stream.session_id))  # waits its turn
                await asyncio.sleep(0.2)
                pending.cancel()  # the stream's client goes away with its chunk still queued
                await asyncio.sleep(0.3)
            await closing

    run(scenario())
    assert settles_to(server, baseline) == baseline
