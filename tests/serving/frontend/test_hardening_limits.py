"""Bounded input: the gRPC receive limit is the largest legal request, refused requests are freed
at once, and text a client sent (model names) reaches error messages bounded, with the right code.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from contract.model_name import MAX_MODEL_NAME
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc
from serving.settings import FIXED_REQUEST_BYTES, ServerSettings
from tests.support.servers import ServerThread, run

LARGEST_TOKEN_ID = 2**35 - 1  # the largest id whose varint takes TOKEN_ID_VARINT_BYTES bytes


def largest_generate_request(max_tokens: int) -> pb.GenerateRequest:
    """A GenerateRequest with every field at the most a legal request can hold."""
    return pb.GenerateRequest(
        model="m" * MAX_MODEL_NAME,
        version=2**64 - 1,
        session_id="f" * 32,
        prompt_tokens=[LARGEST_TOKEN_ID] * max_tokens,
        max_new_tokens=2**31 - 1,
        sampling=pb.SamplingOptions(temperature=1e30, top_k=2**31 - 1, top_p=1.0, seed=2**64 - 1),
        stop_tokens=[LARGEST_TOKEN_ID] * max_tokens,
        keep_session=True,
    )


@pytest.mark.parametrize("max_tokens", [1, 8, 32_768])
def test_the_receive_limit_is_the_largest_legal_request(max_tokens: int) -> None:
    settings = ServerSettings(max_tokens_per_request=max_tokens)
    largest = largest_generate_request(max_tokens).ByteSize()
    # Every legal request fits; the limit exceeds the largest one by at most the fixed allowance.
    assert largest <= settings.receive_message_bytes <= largest + FIXED_REQUEST_BYTES
    fixed_fields = largest_generate_request(0).ByteSize()
    assert fixed_fields <= FIXED_REQUEST_BYTES // 8  # the allowance covers the other fields amply
    step = pb.StepRequest(
        session_id="f" * 32,
        tokens=[LARGEST_TOKEN_ID] * max_tokens,
        options=pb.PredictionOptions(top_k=2**31 - 1, return_logits=True),
    )
    assert step.ByteSize() <= settings.receive_message_bytes
    # An explicit --max-message-bytes wins.
    assert ServerSettings(max_message_bytes=1234).receive_message_bytes == 1234


@pytest.fixture(scope="module")
def limited(model_repository: Any) -> Iterator[ServerThread]:
    """A server with default limits but a token limit small enough to fill cheaply."""
    running = ServerThread(model_repository, max_tokens_per_request=4096)
    yield running
    running.stop()


def test_legal_requests_of_the_maximal_size_work_and_larger_ones_are_refused(limited: ServerThread) -> None:
    limit = limited.settings.max_tokens_per_request
    vocab = limited.registry.latest("tiny-gru").vocab_size
    top = vocab - 1

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(limited.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            generate = pb.GenerateRequest(
                model="tiny-gru", prompt_tokens=[top] * limit, stop_tokens=[top] * limit, max_new_tokens=2
            )
            replies = [reply async for reply in stub.Generate(generate, timeout=60)]
            assert sum(len(reply.tokens) for reply in replies) >= 1
            opened = await stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10)
            step = await stub.Step(
                pb.StepRequest(session_id=opened.session_id, tokens=[top] * limit), timeout=60
            )
            assert step.prediction.position == limit and len(step.prediction.top_ids) > 0
            # One token over: decoded (it fits the receive limit) and refused by the token check.
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await stub.Step(
                    pb.StepRequest(session_id=opened.session_id, tokens=[top] * (limit + 1)), timeout=60
                )
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the limit of 4096 tokens per request" in str(over.value.details())
            # Beyond the receive limit: refused by gRPC before decoding.
            huge = pb.StepRequest(
                session_id=opened.session_id, tokens=[1] * (limited.settings.receive_message_bytes)
            )
            with pytest.raises(grpc.aio.AioRpcError) as too_large:
                await stub.Step(huge, timeout=60)
            assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "received message larger than max" in str(too_large.value.details()).lower()
            # The refusals left the session as it was: the next step continues at its position.
            after = await stub.Step(pb.StepRequest(session_id=opened.session_id, tokens=[1]), timeout=60)
            assert after.prediction.position == limit + 1

    run(scenario())


def _held_handler_frames() -> list[types.FrameType]:
    """Frames of rnnserve's servicer handlers that only the garbage collector would free (call
    with the collector disabled since the requests were made)."""
    saved = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(saved)
        gc.garbage.clear()
    return [
        item
        for item in garbage
        if isinstance(item, types.FrameType) and item.f_code.co_filename.endswith("serving/service.py")
    ]


@pytest.mark.parametrize("rpc", ["Step", "Generate", "CreateSession", "Stream"])
def test_refused_requests_are_freed_at_once(limited: ServerThread, rpc: str) -> None:
    """A refused request is not kept alive by its exception's traceback (a reference cycle the
    garbage collector frees only later): under a flood of refused requests, memory grew by GiBs."""
    limit = limited.settings.max_tokens_per_request

    async def refused(stub: pb_grpc.InferenceStub, session_id: str) -> grpc.StatusCode:
        tokens = [1] * (limit + 1)
        try:
            if rpc == "Step":
                await stub.Step(pb.StepRequest(session_id=session_id, tokens=tokens), timeout=30)
            elif rpc == "Generate":
                request = pb.GenerateRequest(model="tiny-gru", prompt_tokens=tokens, max_new_tokens=1)
                [reply async for reply in stub.Generate(request, timeout=30)]
            elif rpc == "CreateSession":
                await stub.CreateSession(pb.CreateSessionRequest(model="x" * 1000), timeout=30)
            else:
                call = stub.Stream(timeout=30)
                await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
                await call.read()
                await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=tokens)))
                await call.read()
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def scenario() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(limited.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            opened = await stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10)
            codes = [await refused(stub, opened.session_id) for _ in range(5)]
            await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=10)
            return codes

    gc.collect()
    gc.disable()  # what the collector would free later must show here
    try:
        codes = run(scenario())
        held = _held_handler_frames()
    finally:
        gc.enable()
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}, codes
    assert held == [], [(frame.f_code.co_name, sorted(frame.f_locals)) for frame in held]


@pytest.mark.parametrize("length", [129, 8_000, 16_384, 100_000])
@pytest.mark.parametrize("rpc", ["CreateSession", "GetModel", "Stream", "Generate"])
def test_long_model_names_answer_not_found_with_the_name_cut(
    server: ServerThread, rpc: str, length: int
) -> None:
    name = "n" * length

    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            try:
                if rpc == "CreateSession":
                    await stub.CreateSession(pb.CreateSessionRequest(model=name), timeout=10)
                elif rpc == "GetModel":
                    await stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
                elif rpc == "Stream":
                    call = stub.Stream(timeout=10)
                    await call.write(pb.StreamRequest(open=pb.OpenSession(model=name)))
                    await call.read()
                else:
                    request = pb.GenerateRequest(model=name, prompt_tokens=[1], max_new_tokens=1)
                    [reply async for reply in stub.Generate(request, timeout=10)]
            except grpc.aio.AioRpcError as error:
                return error
        raise AssertionError(f"{rpc} with a {length}-character model name succeeded")

    error = run(scenario())
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    details = str(error.details())
    assert details.startswith(f"model {'n' * 64!r}… ({length} characters) is not served"), details
    assert "model names are 1-128 characters of A-Z a-z 0-9 _ . -" in details
    assert len(details) < 400


def test_a_wrong_model_name_for_a_continued_session_is_cut(server: ServerThread) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            opened = await stub.CreateSession(pb.CreateSessionRequest(model="tiny-gru"), timeout=10)
            await stub.Step(pb.StepRequest(session_id=opened.session_id, tokens=[1]), timeout=10)
            request = pb.GenerateRequest(session_id=opened.session_id, model="w" * 100_000, max_new_tokens=1)
            try:
                [reply async for reply in stub.Generate(request, timeout=10)]
            except grpc.aio.AioRpcError as error:
                return error
            finally:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=10)
        raise AssertionError("a Generate naming another model than its session's succeeded")

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not {'w' * 64!r}… (100000 characters)" in str(error.details())
