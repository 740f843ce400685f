"""Bad input gets the documented status and a message naming the problem; nothing changes state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc
from serving.clients.client import RnnserveClient, Sampling
from tests.support.models import Oracle
from tests.support.servers import ServerThread, run

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT  # out-of-order requests are bad requests
VOCAB = 32  # the tiny models' vocabulary


def rpc_error(server: ServerThread, call: Callable[[RnnserveClient], Awaitable[Any]]) -> grpc.aio.AioRpcError:
    """Run `call` with a fresh client; it must fail. Returns the error."""

    async def scenario() -> grpc.aio.AioRpcError:
        async with RnnserveClient(server.target) as client:
            try:
                await call(client)
            except grpc.aio.AioRpcError as error:
                return error
        raise AssertionError("the call succeeded")

    return run(scenario())


async def drain(responses: AsyncIterator[Any]) -> list[Any]:
    return [r async for r in responses]


async def new_session(client: RnnserveClient, model: str = "tiny-lstm") -> str:
    return (await client.create_session(model)).session_id


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            [VOCAB],
            f"token id {VOCAB} is outside the vocabulary of model 'tiny-lstm' version 1 (ids 0..{VOCAB - 1})",
        ),
        ([1, -1], "token id -1 is outside the vocabulary of model 'tiny-lstm' version 1"),
        ([2**62], f"token id {2**62} is outside the vocabulary"),
        ([], "a Step needs at least one token id"),
    ],
)
def test_step_rejects_bad_tokens(server: ServerThread, tokens: list[int], message: str) -> None:
    async def call(client: RnnserveClient) -> None:
        await client.step(await new_session(client), tokens)

    error = rpc_error(server, call)
    assert error.code() == INVALID
    assert message in (error.details() or "")


@pytest.mark.parametrize(
    ("sampling", "top_k", "message"),
    [
        (Sampling(temperature=-0.5), 0, "temperature must be a finite number >= 0"),
        (Sampling(top_p=0.0), 0, "top_p must be in (0, 1], got 0.0"),
        (Sampling(top_p=1.5), 0, "top_p must be in (0, 1], got 1.5"),
        (Sampling(top_k=VOCAB + 1), 0, f"sampling top_k must be at most the vocabulary size {VOCAB}"),
        (None, VOCAB + 1, f"top_k must be at most the vocabulary size {VOCAB}"),
    ],
)
def test_step_rejects_nonsensical_options(
    server: ServerThread, sampling: Sampling | None, top_k: int, message: str
) -> None:
    async def call(client: RnnserveClient) -> None:
        await client.step(await new_session(client), [1], top_k=top_k, sampling=sampling)

    error = rpc_error(server, call)
    assert error.code() == INVALID
    assert message in (error.details() or "")


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda c: c.create_session("no-such-model"),
            NOT_FOUND,
            "model 'no-such-model' is not served; models: ",
        ),
        (
            lambda c: c.create_session("tiny-lstm", version=7),
            NOT_FOUND,
            "model 'tiny-lstm' has no version 7 open to new sessions; versions open to new sessions: [1]",
        ),
        (lambda c: c.get_model("tiny-gru", 3), NOT_FOUND, "model 'tiny-gru' has no loaded version 3"),
        (lambda c: c.step("0" * 32, [1]), NOT_FOUND, f"session '{'0' * 32}' not found"),
        (lambda c: c.step("not-an-id", [1]), NOT_FOUND, "session ids are 32 lower-case hex characters"),
        (lambda c: c.close_session("f" * 32), NOT_FOUND, "not found"),
        (lambda c: c.step("", [1]), INVALID, "session_id is empty"),
    ],
)
def test_unknown_models_versions_and_sessions(
    server: ServerThread, call: Any, code: grpc.StatusCode, message: str
) -> None:
    error = rpc_error(server, call)
    assert error.code() == code
    assert message in (error.details() or "")


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        (
            {"model": "tiny-lstm", "prompt_tokens": [1], "max_new_tokens": 0},
            INVALID,
            "max_new_tokens must be at least 1",
        ),
        (
            {"model": "tiny-lstm", "prompt_tokens": [1], "max_new_tokens": 5000},
            EXHAUSTED,
            "max_new_tokens 5000 is over the server's limit of 4096",
        ),
        ({"model": "tiny-lstm", "max_new_tokens": 3}, INVALID, "a new session needs a prompt"),
        (
            {"model": "tiny-lstm", "prompt_tokens": [1], "prompt_text": "a", "max_new_tokens": 3},
            INVALID,
            "not both",
        ),
        (
            {"model": "tiny-lstm", "prompt_text": "ABC", "max_new_tokens": 3},
            INVALID,
            "prompt_text cannot be encoded for model 'tiny-lstm' version 1: character 'A' is not in the",
        ),
        (
            {"model": "tiny-lstm", "prompt_tokens": [1, 99], "max_new_tokens": 3},
            INVALID,
            "token id 99 is outside",
        ),
        (
            {"model": "tiny-lstm", "prompt_tokens": [1], "max_new_tokens": 3, "stop_tokens": [-3]},
            INVALID,
            "token id -3 is outside",
        ),
        (
            {
                "model": "tiny-lstm",
                "prompt_tokens": [1],
                "max_new_tokens": 3,
                "sampling": Sampling(temperature=-1),
            },
            INVALID,
            "temperature must be",
        ),
        (
            {"max_new_tokens": 3, "prompt_tokens": [1]},
            INVALID,
            "give model (to start a new session) or session_id",
        ),
        (
            {"model": "nope", "prompt_tokens": [1], "max_new_tokens": 3},
            NOT_FOUND,
            "model 'nope' is not served",
        ),
        ({"session_id": "a" * 32, "max_new_tokens": 3}, NOT_FOUND, "not found"),
    ],
)
def test_generate_rejects_bad_requests(
    server: ServerThread, kwargs: dict[str, Any], code: grpc.StatusCode, message: str
) -> None:
    error = rpc_error(server, lambda client: drain(client.generate(**kwargs)))
    assert error.code() == code
    assert message in (error.details() or "")


def test_generate_continuing_an_unused_session_needs_a_prompt(server: ServerThread) -> None:
    async def call(client: RnnserveClient) -> None:
        await drain(client.generate(session_id=await new_session(client), max_new_tokens=2))

    error = rpc_error(server, call)
    assert error.code() == INVALID
    assert "has consumed no tokens yet" in (error.details() or "")


def test_tokens_per_request_limit(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_tokens_per_request=8)

    async def call(client: RnnserveClient) -> None:
        await client.step(await new_session(client), [1] * 9)

    error = rpc_error(server, call)
    assert error.code() == EXHAUSTED
    assert "has 9 tokens, over the limit of 8 tokens per request" in (error.details() or "")


def test_message_size_limit(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_message_bytes=512)

    async def call(client: RnnserveClient) -> None:
        await client.step(await new_session(client), [1] * 2000)

    error = rpc_error(server, call)
    assert error.code() == EXHAUSTED
    assert "larger than max" in (error.details() or "")


async def raw_stream(server: ServerThread, requests: list[pb.StreamRequest]) -> list[pb.StreamResponse]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def messages() -> AsyncIterator[pb.StreamRequest]:
            for request in requests:
                yield request

        return [r async for r in stub.Stream(messages())]


OPEN = pb.StreamRequest(open=pb.OpenSession(model="tiny-gru"))
CHUNK = pb.StreamRequest(chunk=pb.TokenChunk(tokens=[1]))
END = pb.StreamRequest(control=pb.CONTROL_END)


@pytest.mark.parametrize(
    ("requests", "code", "message"),
    [
        ([CHUNK], PRECONDITION, "a chunk arrived before open or resume"),
        (
            [pb.StreamRequest(control=pb.CONTROL_RESET)],
            PRECONDITION,
            "a control arrived before open or resume",
        ),
        ([OPEN, OPEN], PRECONDITION, "this stream already carries session"),
        ([OPEN, CHUNK, END, CHUNK], PRECONDITION, "a request followed CONTROL_END on this stream"),
        ([OPEN, pb.StreamRequest()], INVALID, "empty StreamRequest"),
        (
            [OPEN, pb.StreamRequest(control=pb.CONTROL_UNSPECIFIED)],
            INVALID,
            "control must be CONTROL_RESET or",
        ),
        ([OPEN, pb.StreamRequest(chunk=pb.TokenChunk())], INVALID, "a chunk needs at least one token id"),
        ([pb.StreamRequest(open=pb.OpenSession())], INVALID, "open needs a model name"),
        (
            [pb.StreamRequest(open=pb.OpenSession(model="tiny-gru", options=pb.PredictionOptions(top_k=99)))],
            INVALID,
            "top_k must be at most the vocabulary size 32",
        ),
        ([pb.StreamRequest(resume=pb.ResumeSession(session_id="b" * 32))], NOT_FOUND, "not found"),
    ],
)
def test_stream_protocol_errors(
    server: ServerThread, requests: list[pb.StreamRequest], code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(raw_stream(server, requests))
    assert error.value.code() == code
    assert message in (error.value.details() or "")


def test_rejected_open_creates_no_session(server: ServerThread) -> None:
    before = server.on_loop(len, server.runtime.sessions)
    bad_open = pb.StreamRequest(
        open=pb.OpenSession(
            model="tiny-gru", options=pb.PredictionOptions(sampling=pb.SamplingOptions(top_p=2.0))
        )
    )
    with pytest.raises(grpc.aio.AioRpcError):
        run(raw_stream(server, [bad_open]))
    assert server.on_loop(len, server.runtime.sessions) == before


def test_end_without_half_close_still_ends_the_stream(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(stream_end_linger_s=0.2)

    async def scenario() -> list[pb.StreamResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Stream()
            responses = []
            for request in (OPEN, END):
                await call.write(request)
                responses.append(await call.read())
            assert await call.code() == grpc.StatusCode.OK  # ended by the server after the linger
            return responses

    events = [r.event for r in run(scenario())]
    assert events == [pb.STREAM_EVENT_OPENED, pb.STREAM_EVENT_ENDED]


def test_a_failed_request_never_changes_the_state(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    oracle = oracles["tiny-lstm"]

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            session_id = await new_session(client)
            await client.step(session_id, [1, 2])
            for bad in ([3, VOCAB], [], [3, -5]):
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.step(session_id, bad)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.step(session_id, [3], sampling=Sampling(top_p=7))
            with pytest.raises(grpc.aio.AioRpcError):  # a stream aborted by a bad chunk mid-way
                async with client.stream(session_id=session_id) as stream:
                    await stream.send([3, 100])
            with pytest.raises(grpc.aio.AioRpcError):
                await drain(client.generate(session_id=session_id, prompt_tokens=[3, 77], max_new_tokens=2))
            step = await client.step(session_id, [3], return_logits=True)
            assert step.prediction.position == 3
            np.testing.assert_allclose(step.prediction.logits, oracle.last_logits([1, 2, 3]), atol=1e-5)

    run(scenario())
