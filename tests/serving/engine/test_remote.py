"""RemoteRuntime against a real EngineCore over ZeroMQ: the same answers and errors as in one
process, calls batched per event-loop iteration, and UNAVAILABLE when the core goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from contract.sampling import Sampling
from serving.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    Reason,
    SessionNotFoundError,
    UnavailableError,
)
from serving.core.interface import GenerateRequestFields, StepOptions
from serving.core.local import LocalEngine
from serving.core.registry import load_repository
from serving.core.runtime import Runtime
from serving.engine.core_process import EngineCore
from serving.engine.remote import EngineConnection, RemoteRuntime
from serving.settings import ServerSettings


class Pair:
    def __init__(self, runtime: Runtime, local: LocalEngine, core: EngineCore, remote: RemoteRuntime) -> None:
        self.runtime, self.local, self.core, self.remote = runtime, local, core, remote


def with_pair(
    repository: Path, tmp_path: Path, body: Callable[[Pair], Awaitable[None]], **overrides: Any
) -> None:
    """Run `body` against a Runtime served by an EngineCore and reached through a RemoteRuntime."""

    async def scenario() -> None:
        settings = ServerSettings(repository=repository, port=0, **overrides)
        runtime = Runtime(settings, load_repository(settings))
        runtime.start()
        local = LocalEngine(runtime)
        address = f"{tmp_path}/engine.sock"
        core = EngineCore(local, address)
        await core.start()
        connection = EngineConnection(address, heartbeat_s=0.05, lost_after_s=0.3)
        await connection.start(wait_s=5)
        try:
            await asyncio.wait_for(body(Pair(runtime, local, core, RemoteRuntime(connection))), 20)
        finally:
            await connection.close()
            await core.close()
            await runtime.stop()

    asyncio.run(scenario())


async def _remote_answers_equal_local(pair: Pair) -> None:
    options = StepOptions(top_k=3, return_logits=True)
    remote = await pair.remote.open_session("tiny-lstm", options=options)
    local = await pair.local.open_session("tiny-lstm", options=options)
    for tokens in ([1, 2, 3], [4], [5, 6]):
        remote_answer = await pair.remote.step(remote, tokens)
        local_answer = await pair.local.step(local, tokens)
        assert remote_answer == local_answer
    assert remote_answer.position == 6
    ref, once = await pair.remote.step_once(remote.id, None, [7], StepOptions())
    assert ref.id == remote.id and once.position == 7
    await pair.remote.close(remote.id, None)
    with pytest.raises(SessionNotFoundError, match="closed"):
        await pair.remote.step_once(remote.id, None, [1], StepOptions())


async def _errors_cross_with_their_class_and_message(pair: Pair) -> None:
    with pytest.raises(NotFoundError, match="'nope' is not served"):
        await pair.remote.open_session("nope")
    ref = await pair.remote.open_session("tiny-gru", options=StepOptions())
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary") as raised:
        await pair.remote.step(ref, [10_000])
    assert raised.value.reason is Reason.TOKEN_OUT_OF_VOCABULARY
    assert raised.value.metadata["token"] == "10000"
    assert (await pair.remote.step(ref, [1])).position == 1  # the failed request changed nothing


async def _generate_streams_the_same_tokens(pair: Pair) -> None:
    fields = GenerateRequestFields(
        model="tiny-lstm", prompt_tokens=[1, 2], max_new_tokens=12, sampling=Sampling(seed=7)
    )
    remote = await pair.remote.generate(fields, None)
    local = await pair.local.generate(fields, None)
    remote_tokens = [t async for chunk in remote.chunks() for t in chunk.tokens]
    local_tokens = [t async for chunk in local.chunks() for t in chunk.tokens]
    assert remote_tokens == local_tokens and len(remote_tokens) == 12
    assert remote.session_id == "" and remote.model == "tiny-lstm"


async def _concurrent_calls_share_messages(pair: Pair) -> None:
    refs = await asyncio.gather(
        *(pair.remote.open_session("tiny-gru", options=StepOptions()) for _ in range(64))
    )
    connection = pair.remote.connection
    frames, calls = connection.frames_sent, connection.calls_sent
    answers = await asyncio.gather(*(pair.remote.step(ref, [3]) for ref in refs))
    assert all(answer.position == 1 for answer in answers)
    assert connection.calls_sent - calls >= 64
    assert connection.frames_sent - frames <= 3  # 64 steps in one message (plus, at most, pings)


async def _a_lost_core_fails_calls_with_unavailable(pair: Pair) -> None:
    ref = await pair.remote.open_session("tiny-gru", options=StepOptions())
    await pair.core.close()  # the core is gone: nothing answers
    with pytest.raises(UnavailableError, match="engine core"):
        await asyncio.wait_for(pair.remote.step(ref, [1]), timeout=10)
    for _ in range(200):  # the heartbeat notices within lost_after_s (0.3 s)
        if not pair.remote.connection.connected:
            break
        await asyncio.sleep(0.05)
    assert not pair.remote.connection.connected
    with pytest.raises(UnavailableError, match="engine core"):  # new calls fail at once meanwhile
        await asyncio.wait_for(pair.remote.open_session("tiny-gru"), timeout=1)


def test_remote_answers_equal_local(model_repository: Path, tmp_path: Path) -> None:
    with_pair(model_repository, tmp_path, _remote_answers_equal_local)


def test_errors_cross_with_their_class_and_message(model_repository: Path, tmp_path: Path) -> None:
    with_pair(model_repository, tmp_path, _errors_cross_with_their_class_and_message)


def test_generate_streams_the_same_tokens(model_repository: Path, tmp_path: Path) -> None:
    with_pair(model_repository, tmp_path, _generate_streams_the_same_tokens)


def test_concurrent_calls_share_messages(model_repository: Path, tmp_path: Path) -> None:
    with_pair(model_repository, tmp_path, _concurrent_calls_share_messages)


def test_a_lost_core_fails_calls_with_unavailable(model_repository: Path, tmp_path: Path) -> None:
    with_pair(model_repository, tmp_path, _a_lost_core_fails_calls_with_unavailable)


async def _orphaned_streams_end_with_their_front_end(pair: Pair) -> None:
    kept = await pair.remote.open_session("tiny-gru")  # a session without a stream stays
    ref = await pair.remote.open_session("tiny-gru", options=StepOptions())
    await pair.remote.step(ref, [1])
    assert len(pair.runtime.sessions) == 2
    await pair.remote.connection.close()  # the front end goes away with the stream open
    for _ in range(400):  # the core closes the stream's session (--close-on-disconnect)
        if len(pair.runtime.sessions) == 1:
            break
        await asyncio.sleep(0.01)
    assert [session.id for session in pair.runtime.sessions] == [kept.id]


def test_orphaned_streams_end_with_their_front_end(model_repository: Path, tmp_path: Path) -> None:
    with_pair(
        model_repository, tmp_path, _orphaned_streams_end_with_their_front_end, close_on_disconnect=True
    )
