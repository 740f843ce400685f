"""Every error status carries a google.rpc.Status with an ErrorInfo whose reason names the case,
decoded on the client side with grpc_status.rpc_status.from_call.

SESSION_NOT_RESTORABLE and SESSION_ID_IN_USE from Redis are reached in test_scale_recovery.py
(they need a Redis server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from contract.session_id import SESSION_ID_KEY, new_session_id
from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient, Sampling, error_info
from serving.core.errors import ERROR_DOMAIN, Reason
from serving.ops.logs import REQUEST_ID_KEY
from tests.support.faults import FailingBatches, WorkerGate, session_slot
from tests.support.ops import OpsServer
from tests.support.servers import ServerThread, run

MODEL = "tiny-lstm"


def decoded(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a failed call, checking the google.rpc.Status around it."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{error.code().name} without a google.rpc.Status: {error.details()}"
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == ERROR_DOMAIN
    return info


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


async def stream_failure(client: RnnserveClient, *requests: pb.StreamRequest) -> grpc.aio.AioRpcError:
    call = client.stub.Stream(iter(requests))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream succeeded")


Scenario = Callable[[RnnserveClient], Awaitable[grpc.aio.AioRpcError]]


async def _unknown_session(client: RnnserveClient) -> grpc.aio.AioRpcError:
    return await failure(client.step(new_session_id(), [1]))


async def _closed_session(client: RnnserveClient) -> grpc.aio.AioRpcError:
    created = await client.create_session(MODEL)
    await client.close_session(created.session_id)
    return await failure(client.step(created.session_id, [1]))


async def _proposed_id_in_use(client: RnnserveClient) -> grpc.aio.AioRpcError:
    proposed = new_session_id()
    metadata = ((SESSION_ID_KEY, proposed),)
    await client.stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=metadata)
    return await failure(client.stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=metadata))


async def _other_model(client: RnnserveClient) -> grpc.aio.AioRpcError:
    created = await client.create_session(MODEL)
    await client.step(created.session_id, [1])
    responses = client.generate("tiny-gru", session_id=created.session_id, max_new_tokens=1)
    return await failure(responses.__anext__())


async def _prompt_twice(client: RnnserveClient) -> grpc.aio.AioRpcError:
    responses = client.generate(MODEL, prompt_tokens=[1], prompt_text="ab", max_new_tokens=1)
    return await failure(responses.__anext__())


async def _mismatched_metadata(client: RnnserveClient) -> grpc.aio.AioRpcError:
    created = await client.create_session(MODEL)
    request = pb.StepRequest(session_id=created.session_id, tokens=[1])
    return await failure(client.stub.Step(request, metadata=((SESSION_ID_KEY, new_session_id()),)))


async def _bad_top_k(client: RnnserveClient) -> Any:
    created = await client.create_session(MODEL)
    return await client.step(created.session_id, [1], top_k=10_000)


# reason -> (status code, how to reach it on a default server, metadata the ErrorInfo must carry)
DEFAULT_SERVER_CASES: dict[Reason, tuple[grpc.StatusCode, Scenario, dict[str, str]]] = {
    Reason.MALFORMED_REQUEST: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: stream_failure(client, pb.StreamRequest()),
        {},
    ),
    Reason.NO_TOKENS: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: stream_failure(
            client,
            pb.StreamRequest(open=pb.OpenSession(model=MODEL)),
            pb.StreamRequest(chunk=pb.TokenChunk()),
        ),
        {},
    ),
    Reason.TOKEN_OUT_OF_VOCABULARY: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: stream_failure(
            client,
            pb.StreamRequest(open=pb.OpenSession(model=MODEL)),
            pb.StreamRequest(chunk=pb.TokenChunk(tokens=[1, 9999])),
        ),
        {"model": MODEL, "version": "1", "token": "9999"},
    ),
    Reason.INVALID_OPTION: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: failure(_bad_top_k(client)),
        {"option": "top_k"},
    ),
    Reason.INVALID_PROMPT: (grpc.StatusCode.INVALID_ARGUMENT, _prompt_twice, {}),
    Reason.STREAM_OUT_OF_ORDER: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: stream_failure(client, pb.StreamRequest(chunk=pb.TokenChunk(tokens=[1]))),
        {},
    ),
    Reason.INVALID_SESSION_ID: (
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda client: failure(
            client.stub.CreateSession(
                pb.CreateSessionRequest(model=MODEL), metadata=((SESSION_ID_KEY, "not-hex"),)
            )
        ),
        {},
    ),
    Reason.SESSION_ID_MISMATCH: (grpc.StatusCode.INVALID_ARGUMENT, _mismatched_metadata, {}),
    Reason.SESSION_MODEL_MISMATCH: (grpc.StatusCode.INVALID_ARGUMENT, _other_model, {"model": MODEL}),
    Reason.MODEL_NOT_FOUND: (
        grpc.StatusCode.NOT_FOUND,
        lambda client: failure(client.get_model("no-such-model")),
        {"model": "no-such-model"},
    ),
    Reason.VERSION_NOT_FOUND: (
        grpc.StatusCode.NOT_FOUND,
        lambda client: failure(client.create_session(MODEL, version=7)),
        {"model": MODEL, "version": "7"},
    ),
    Reason.SESSION_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, _unknown_session, {}),
    Reason.SESSION_CLOSED: (grpc.StatusCode.NOT_FOUND, _closed_session, {}),
    Reason.SESSION_ID_IN_USE: (grpc.StatusCode.ALREADY_EXISTS, _proposed_id_in_use, {}),
    Reason.MAX_NEW_TOKENS_EXCEEDED: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda client: failure(client.generate(MODEL, prompt_tokens=[1], max_new_tokens=10**6).__anext__()),
        {"limit": "4096"},
    ),
}


@pytest.mark.parametrize("reason", list(DEFAULT_SERVER_CASES), ids=lambda reason: reason.value)
def test_each_reason_reaches_the_client_in_an_error_info(server: ServerThread, reason: Reason) -> None:
    code, scenario, metadata = DEFAULT_SERVER_CASES[reason]

    async def go() -> grpc.aio.AioRpcError:
        async with RnnserveClient(server.target) as client:
            return await scenario(client)

    error = run(go())
    assert error.code() == code, error.details()
    info = decoded(error)
    assert info.reason == reason.value, error.details()
    assert metadata.items() <= dict(info.metadata).items()
    assert error_info(error) == info  # the client's own decoder agrees


def test_the_request_id_survives_an_error_with_details(server: ServerThread) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async with RnnserveClient(server.target) as client:
            return await _unknown_session(client)

    error = run(go())
    assert decoded(error).reason == Reason.SESSION_NOT_FOUND.value
    assert any(key == REQUEST_ID_KEY for key, _ in error.trailing_metadata() or ())


def test_expired_evicted_and_limit_reasons(make_server: Callable[..., ServerThread]) -> None:
    evicting = make_server(max_sessions=1, session_overflow="evict")
    refusing = make_server(max_sessions=1, session_overflow="refuse", max_tokens_per_request=4)
    expiring = make_server(session_idle_timeout_s=0.05)

    async def go() -> dict[Reason, grpc.aio.AioRpcError]:
        errors: dict[Reason, grpc.aio.AioRpcError] = {}
        async with RnnserveClient(evicting.target) as client:
            first = await client.create_session(MODEL)
            await client.create_session(MODEL)  # evicts the first, least recently used
            errors[Reason.SESSION_EVICTED] = await failure(client.step(first.session_id, [1]))
        async with RnnserveClient(refusing.target) as client:
            held = await client.create_session(MODEL)
            errors[Reason.SESSION_LIMIT] = await failure(client.create_session(MODEL))
            errors[Reason.TOO_MANY_TOKENS] = await failure(client.step(held.session_id, [1] * 5))
        async with RnnserveClient(expiring.target) as client:
            idle = await client.create_session(MODEL)
            await asyncio.sleep(0.2)  # past the idle timeout: the next lookup (or a sweep) expires it
            errors[Reason.SESSION_EXPIRED] = await failure(client.step(idle.session_id, [1]))
        return errors

    errors = run(go())
    expected_codes = {
        Reason.SESSION_EVICTED: grpc.StatusCode.NOT_FOUND,
        Reason.SESSION_EXPIRED: grpc.StatusCode.NOT_FOUND,
        Reason.SESSION_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TOO_MANY_TOKENS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    for reason, error in errors.items():
        assert error.code() == expected_codes[reason], error.details()
        info = decoded(error)
        assert info.reason == reason.value, error.details()
    assert decoded(errors[Reason.SESSION_LIMIT]).metadata["limit"] == "1"
    assert decoded(errors[Reason.TOO_MANY_TOKENS]).metadata["limit"] == "4"


def test_queue_full_unloading_shutting_down_and_inference_failed(
    make_server: Callable[..., ServerThread],
) -> None:
    queueing = make_server(max_queue_steps=1)
    failing = make_server()
    draining = make_server()
    unloading = make_server()

    async def go() -> dict[Reason, grpc.aio.AioRpcError]:
        errors: dict[Reason, grpc.aio.AioRpcError] = {}
        async with RnnserveClient(queueing.target) as client:
            first = await client.create_session(MODEL)
            second = await client.create_session(MODEL)
            with WorkerGate(queueing, MODEL) as gate:  # the batcher holds: steps queue up
                queued = asyncio.ensure_future(client.step(first.session_id, [1]))
                await asyncio.to_thread(gate.wait_for_backlog, 1)
                errors[Reason.QUEUE_FULL] = await failure(client.step(second.session_id, [1]))
            await queued
        async with RnnserveClient(failing.target) as client:
            created = await client.create_session(MODEL)
            injected = FailingBatches(failing.registry.latest(MODEL).engine)
            injected.marked.add(await asyncio.to_thread(session_slot, failing, created.session_id))
            try:
                errors[Reason.INFERENCE_FAILED] = await failure(client.step(created.session_id, [1]))
            finally:
                injected.remove()
        async with RnnserveClient(unloading.target) as client:
            created = await client.create_session(MODEL)
            # As a retired version's unload does: its batcher stops taking work.
            await asyncio.to_thread(unloading.registry.latest(MODEL).batcher.stop, 10.0)
            errors[Reason.MODEL_UNLOADING] = await failure(client.step(created.session_id, [1]))
        async with RnnserveClient(draining.target) as client:
            draining.on_loop(setattr, draining.runtime, "draining", True)
            errors[Reason.SERVER_SHUTTING_DOWN] = await failure(client.create_session(MODEL))
        return errors

    errors = run(go())
    expected_codes = {
        Reason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.INFERENCE_FAILED: grpc.StatusCode.INTERNAL,
        Reason.SERVER_SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
        Reason.MODEL_UNLOADING: grpc.StatusCode.UNAVAILABLE,
    }
    for reason, error in errors.items():
        assert error.code() == expected_codes[reason], error.details()
        assert decoded(error).reason == reason.value, error.details()
    assert dict(decoded(errors[Reason.QUEUE_FULL]).metadata) == {"model": MODEL, "version": "1", "limit": "1"}


def test_authentication_and_owner_limit_reasons(model_repository: Path) -> None:
    token = "alice:" + "a1" * 16
    ops = OpsServer(model_repository, auth_tokens=token, max_sessions_per_token=1)
    try:

        async def go() -> dict[Reason, grpc.aio.AioRpcError]:
            errors: dict[Reason, grpc.aio.AioRpcError] = {}
            async with RnnserveClient(ops.target) as anonymous:
                errors[Reason.BEARER_TOKEN_MISSING] = await failure(anonymous.list_models())
            wrong_token = (("authorization", "Bearer " + "b2" * 16),)
            async with RnnserveClient(ops.target, metadata=wrong_token) as wrong:
                errors[Reason.BEARER_TOKEN_INVALID] = await failure(wrong.list_models())
            bearer = (("authorization", "Bearer " + "a1" * 16),)
            async with RnnserveClient(ops.target, metadata=bearer) as alice:
                await alice.create_session(MODEL)
                errors[Reason.OWNER_SESSION_LIMIT] = await failure(alice.create_session(MODEL))
            return errors

        errors = run(go())
    finally:
        ops.stop()
    for reason in (Reason.BEARER_TOKEN_MISSING, Reason.BEARER_TOKEN_INVALID):
        assert errors[reason].code() == grpc.StatusCode.UNAUTHENTICATED
        assert decoded(errors[reason]).reason == reason.value
    limited = errors[Reason.OWNER_SESSION_LIMIT]
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert decoded(limited).reason == Reason.OWNER_SESSION_LIMIT.value
    assert decoded(limited).metadata["limit"] == "1"


def test_sampling_options_are_invalid_options(server: ServerThread) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async with RnnserveClient(server.target) as client:
            created = await client.create_session(MODEL)
            return await failure(client.step(created.session_id, [1], sampling=Sampling(temperature=-1)))

    error = run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert decoded(error).reason == Reason.INVALID_OPTION.value


def test_every_reason_is_reached_by_a_test() -> None:
    """A new Reason needs a case here (or in test_scale_recovery.py, for the Redis ones)."""
    elsewhere = {
        Reason.SESSION_EVICTED,
        Reason.SESSION_EXPIRED,
        Reason.SESSION_LIMIT,
        Reason.TOO_MANY_TOKENS,
        Reason.QUEUE_FULL,
        Reason.INFERENCE_FAILED,
        Reason.SERVER_SHUTTING_DOWN,
        Reason.MODEL_UNLOADING,
        Reason.BEARER_TOKEN_MISSING,
        Reason.BEARER_TOKEN_INVALID,
        Reason.OWNER_SESSION_LIMIT,
        Reason.SESSION_NOT_RESTORABLE,  # test_scale_recovery.py
        Reason.STREAM_IDLE,  # test_hardening_idle.py
        Reason.HEALTH_WATCH_LIMIT,  # test_hardening_idle.py
    }
    assert set(DEFAULT_SERVER_CASES) | elsewhere == set(Reason)


def test_the_status_of_a_domain_error() -> None:
    from google.rpc import status_pb2

    from serving.core.errors import ResourceExhaustedError, ServingError, grpc_status

    error = ResourceExhaustedError("over the limit", Reason.TOO_MANY_TOKENS, limit=4096, model="m")
    status = grpc_status(error)
    assert (status.code, status.details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit")
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded_status = status_pb2.Status.FromString(value)
    info = error_details_pb2.ErrorInfo()
    assert decoded_status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "TOO_MANY_TOKENS",
        ERROR_DOMAIN,
        {"limit": "4096", "model": "m"},
    )
    assert ResourceExhaustedError("x").reason is Reason.SESSION_LIMIT  # the class's default
    with pytest.raises(TypeError, match="no default reason"):
        ServingError("which case?")
