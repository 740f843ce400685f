"""Hostile input against a real server, for every RPC, with an oracle session running beside it.

Hypothesis draws the inputs: random and boundary token ids, empty and oversized chunks, random
bytes as request bodies, Stream requests in every order, contradictory sampling options, unknown
models, versions and session ids. Each input is sent together with one step of an ORACLE Stream
session on tiny-lstm (the two may share a batch), and

- the answer has the status serving/core/errors.py gives the problem, and a message naming it;
- the oracle's prediction equals the offline ONNX model on its token history (logits within 1e-5);
- a session the input targeted keeps exactly the state of its successful requests (a failed
  request never changes a session's state), checked against the offline model as well;
- at the end the server is SERVING and every session the tests opened is gone (nothing leaked).

The number of inputs tried per kind is printed when the module ends (for the README's
Reliability table). Malformed model repositories are at the end of the module: each is refused
with a log line naming the file and the problem, and every valid model still serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import signature as sig
from contract.hashing import sha256_file
from contract.model_name import MODEL_NAME_RULE, valid_model_name
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc
from serving.clients.client import RnnserveClient, StreamSession
from tests.support.faults import report
from tests.support.models import ALPHABET, Oracle, export_tiny_model
from tests.support.servers import ServerThread

T = TypeVar("T")

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# Codes a bad request may get; UNKNOWN and INTERNAL mean the server did not understand its own failure.
REQUEST_ERRORS = {INVALID, NOT_FOUND, EXHAUSTED}

VOCAB = 32  # the tiny models' vocabulary
TOKEN_LIMIT = 64  # max_tokens_per_request of the server under test
MESSAGE_LIMIT = 64 * 1024  # max_message_bytes of the server under test
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TARGET = "tiny-gru"  # the model hostile requests go to; the oracle runs on tiny-lstm
TARGET_LABEL = f"model {TARGET!r} version 1"
STREAM_METHOD = "/rnnserve.v1.Inference/Stream"
RESET_AFTER = 40  # tokens of history before a tracked session starts over (keeps the oracle cheap)

# Each example is a few round trips to the server (about 10 ms): 50 per test keeps the module near 15 s.
EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----- the client side: one event loop for the module, an oracle beside every input ---------------


class ClientLoop:
    """A client event loop in a background thread: the channel and the oracle's Stream outlive
    each hypothesis example, which is a plain synchronous call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-clients", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status, the server's message, and the response(s) when OK."""

    code: grpc.StatusCode
    details: str
    value: Any = None

    def expect(self, code: grpc.StatusCode, message: str = "") -> None:
        assert self.code == code, f"expected {code.name}, got {self.code.name}: {self.details!r}"
        assert message in self.details, f"expected {message!r} in {self.details!r}"


async def outcome(call: Awaitable[Any]) -> Outcome:
    try:
        value = await call
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), error.details() or "")
    return Outcome(OK, "", value)


async def collect(responses: AsyncIterator[Any]) -> list[Any]:
    return [response async for response in responses]


async def stream_outcome(responses: AsyncIterator[Any]) -> Outcome:
    """Like outcome(collect(...)), but a failed call keeps the responses that came before the error."""
    received: list[Any] = []
    try:
        async for response in responses:
            received.append(response)
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), error.details() or "", received)
    return Outcome(OK, "", received)


class Tracked:
    """A session on TARGET that hostile requests aim at; `history` is what it must have consumed."""

    def __init__(self, session_id: str, history: list[int]) -> None:
        self.session_id = session_id
        self.history = history


class Harness:
    """Sends each hostile input beside one oracle step and counts the inputs by kind."""

    def __init__(self, server: ServerThread, oracles: dict[str, Oracle], loop: ClientLoop) -> None:
        self.server = server
        self.loop = loop
        self.oracle = oracles["tiny-lstm"]
        self.target_oracle = oracles[TARGET]
        self.rng = random.Random(0)
        self.tried: Counter[str] = Counter()
        self.oracle_history: list[int] = []
        self.oracle_steps = 0
        self.client: RnnserveClient
        self.oracle_stream: StreamSession
        self.tracked: Tracked
        self.sync_channel = grpc.insecure_channel(server.target)
        self.sync_stub = inference_pb2_grpc.InferenceStub(self.sync_channel)
        loop.run(self._connect())

    async def _connect(self) -> None:
        self.client = RnnserveClient(self.server.target, timeout=30.0)
        self.oracle_stream = self.client.stream("tiny-lstm", return_logits=True, timeout=600.0)
        await self.oracle_stream.__aenter__()
        self.tracked = await self._new_tracked()

    async def _new_tracked(self) -> Tracked:
        session_id = (await self.client.create_session(TARGET)).session_id
        tracked = Tracked(session_id, [])
        await self.check_tracked(tracked)  # position > 0, so a Generate may continue it
        return tracked

    async def close(self) -> None:
        await self.oracle_stream.end()
        await self.client.close_session(self.tracked.session_id)
        await self.client.close()
        self.sync_channel.close()

    async def oracle_step(self) -> None:
        token = self.rng.randrange(VOCAB)
        prediction = await self.oracle_stream.send([token])
        self.oracle_history.append(token)
        self.oracle_steps += 1
        assert prediction.position == len(self.oracle_history)
        np.testing.assert_allclose(prediction.logits, self.oracle.last_logits(self.oracle_history), atol=1e-5)
        if len(self.oracle_history) >= RESET_AFTER:
            await self.oracle_stream.reset()
            self.oracle_history.clear()

    async def check_tracked(self, tracked: Tracked | None = None) -> None:
        """Step the tracked session once and compare with the offline model on its history."""
        tracked = tracked or self.tracked
        token = self.rng.randrange(VOCAB)
        step = await self.client.step(tracked.session_id, [token], return_logits=True)
        tracked.history.append(token)
        assert step.prediction.position == len(tracked.history)
        np.testing.assert_allclose(
            step.prediction.logits, self.target_oracle.last_logits(tracked.history), atol=1e-5
        )

    async def _renew_tracked(self) -> None:
        if len(self.tracked.history) >= RESET_AFTER:
            await self.client.close_session(self.tracked.session_id)
            self.tracked = await self._new_tracked()

    async def stream(self, requests: Sequence[Message | bytes], raw: bool = False) -> Outcome:
        """A Stream with every request sent at once (pipelined), through the synchronous client.

        When a server ends a stream while the client is still writing, grpc.aio's client can report
        INTERNAL "Internal error from Core" instead of the status the server sent (grpc/grpc#36066:
        a failed write overwrites the status); the synchronous client reports the server's status.
        With `raw`, the requests are bytes, sent as they are (identity serializers).
        """
        return await asyncio.to_thread(self._stream, list(requests), raw)

    def _stream(self, requests: list[Message | bytes], raw: bool) -> Outcome:
        call = self.sync_channel.stream_stream(STREAM_METHOD) if raw else self.sync_stub.Stream
        received: list[Any] = []
        try:
            for response in call(iter(requests), timeout=30):
                received.append(response)
        except grpc.RpcError as error:
            return Outcome(error.code(), error.details() or "", received)  # type: ignore[attr-defined]
        return Outcome(OK, "", received)

    def probe(self, kind: str, hostile: Callable[[], Awaitable[T]]) -> T:
        """Run `hostile()` beside an oracle step (both in flight at once); return its result."""

        async def both() -> T:
            task = asyncio.ensure_future(hostile())
            await self.oracle_step()
            result = await task
            await self._renew_tracked()  # after: tests read `tracked` before they probe
            return result

        self.tried[kind] += 1
        return self.loop.run(both())

    def session_count(self) -> int:
        return int(self.server.on_loop(len, self.server.runtime.sessions))


@pytest.fixture(scope="module")
def hostile_server(model_repository: Path) -> Iterator[ServerThread]:
    """The server under attack. Besides answering well, it must not fail inside: no exception left
    unretrieved on its event loop, and no ERROR log line (grpc logs a handler's unexpected error)."""
    running = ServerThread(
        model_repository, max_tokens_per_request=TOKEN_LIMIT, max_message_bytes=MESSAGE_LIMIT
    )
    loop_problems: list[dict[str, Any]] = []
    running.on_loop(running.loop.set_exception_handler, lambda loop, context: loop_problems.append(context))
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    try:
        yield running
    finally:
        logging.getLogger().removeHandler(errors)
        running.stop()
    assert not loop_problems, loop_problems
    assert not errors.records, [record.getMessage() for record in errors.records]


class ErrorRecords(logging.Handler):
    """Keeps the log records at ERROR or above from the servers' threads (their event loop and
    batchers); the test thread's own lines (repositories refused on purpose) are not kept."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName != threading.main_thread().name:
            self.records.append(record)


@pytest.fixture(scope="module")
def harness(
    hostile_server: ServerThread, oracles: dict[str, Oracle], request: pytest.FixtureRequest
) -> Iterator[Harness]:
    loop = ClientLoop()
    harness = Harness(hostile_server, oracles, loop)
    baseline = harness.session_count() - 2  # the oracle's session and the tracked one
    yield harness
    loop.run(harness.close())
    loop.close()
    # Nothing leaked: every session the tests opened is closed (closes from aborted streams are
    # asynchronous, so allow them a moment), and the server still answers health checks.
    for _ in range(100):
        if harness.session_count() == baseline:
            break
        threading.Event().wait(0.05)
    assert harness.session_count() == baseline, "sessions leaked"
    with grpc.insecure_channel(hostile_server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    total = sum(harness.tried.values())
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(harness.tried.items()))
    report(
        request.config,
        f"\nhardening: {total} hostile inputs tried ({kinds}); "
        f"{harness.oracle_steps} oracle steps beside them matched the offline model",
    )


# ----- strategies -----------------------------------------------------------------------------

BOUNDARY_IDS = [-1, VOCAB, VOCAB + 1, 2**31 - 1, 2**31, 2**32, INT64_MAX, INT64_MIN]
token_ids = st.one_of(
    st.integers(0, VOCAB - 1),
    st.sampled_from(BOUNDARY_IDS),
    st.integers(INT64_MIN, INT64_MAX),
)
# Mostly short chunks, sometimes over the server's limit of TOKEN_LIMIT tokens per request.
chunks = st.one_of(
    st.lists(token_ids, max_size=12),
    st.lists(st.integers(0, VOCAB - 1), min_size=TOKEN_LIMIT - 2, max_size=TOKEN_LIMIT + 40),
)


def token_problem(tokens: list[int], what: str) -> tuple[grpc.StatusCode, str] | None:
    """The status and message the server must give a chunk, in the order it checks; None if valid."""
    if not tokens:
        return INVALID, f"{what} needs at least one token id"
    if len(tokens) > TOKEN_LIMIT:
        return (
            EXHAUSTED,
            f"{what} has {len(tokens)} tokens, over the limit of {TOKEN_LIMIT} tokens per request",
        )
    bad = next((t for t in tokens if not 0 <= t < VOCAB), None)
    if bad is not None:
        return INVALID, f"token id {bad} is outside the vocabulary of {TARGET_LABEL} (ids 0..{VOCAB - 1})"
    return None


# ----- token ids and chunk sizes, on every RPC that takes tokens ----------------------------------


@EXAMPLES
@given(tokens=chunks)
def test_step_tokens(harness: Harness, tokens: list[int]) -> None:
    tracked = harness.tracked

    async def hostile() -> Outcome:
        result = await outcome(harness.client.step(tracked.session_id, tokens, return_logits=True))
        problem = token_problem(tokens, "a Step")
        if problem is None:
            result.expect(OK)
            tracked.history.extend(tokens)
            np.testing.assert_allclose(
                result.value.prediction.logits,
                harness.target_oracle.last_logits(tracked.history),
                atol=1e-5,
            )
        else:
            result.expect(*problem)
        await harness.check_tracked()  # a failed Step left the state as it was
        return result

    harness.probe("Step tokens", hostile)


@EXAMPLES
@given(tokens=chunks)
def test_stream_chunk_tokens(harness: Harness, tokens: list[int]) -> None:
    tracked = harness.tracked
    requests = [
        pb.StreamRequest(
            resume=pb.ResumeSession(
                session_id=tracked.session_id, options=pb.PredictionOptions(return_logits=True)
            )
        ),
        pb.StreamRequest(chunk=pb.TokenChunk(tokens=tokens)),
    ]

    async def hostile() -> Outcome:
        result = await harness.stream(requests)
        problem = token_problem(tokens, "a chunk")
        if problem is None:
            result.expect(OK)
            resumed, predicted = result.value
            assert resumed.event == pb.STREAM_EVENT_RESUMED
            tracked.history.extend(tokens)
            np.testing.assert_allclose(
                predicted.prediction.logits,
                harness.target_oracle.last_logits(tracked.history),
                atol=1e-5,
            )
        else:
            result.expect(*problem)
        await harness.check_tracked()  # the aborted stream kept its session, state unchanged
        return result

    harness.probe("Stream chunk tokens", hostile)


@EXAMPLES
@given(prompt=chunks, stop=st.one_of(st.lists(token_ids, max_size=4), st.lists(st.just(1), min_size=65)))
def test_generate_prompt_and_stop_tokens(harness: Harness, prompt: list[int], stop: list[int]) -> None:
    """A Generate continuing the tracked session: the prompt, then its stop tokens, are checked."""
    tracked = harness.tracked

    async def hostile() -> Outcome:
        call = harness.client.generate(
            session_id=tracked.session_id, prompt_tokens=prompt, stop_tokens=stop, max_new_tokens=2
        )
        result = await outcome(collect(call))
        problem = token_problem(prompt, "the prompt") if prompt else None
        if problem is None and len(stop) > TOKEN_LIMIT:
            problem = (EXHAUSTED, f"{len(stop)} stop tokens are over the limit of {TOKEN_LIMIT} tokens")
        if problem is None:
            bad = next((t for t in stop if not 0 <= t < VOCAB), None)
            if bad is not None:
                problem = (INVALID, f"token id {bad} is outside the vocabulary of {TARGET_LABEL}")
        if problem is None:
            result.expect(OK)
            generated = [t for response in result.value for t in response.tokens]
            assert 1 <= len(generated) <= 2 and all(0 <= t < VOCAB for t in generated)
            tracked.history.extend([*prompt, *generated])  # a kept session consumes what it made
        else:
            result.expect(*problem)
        await harness.check_tracked()
        return result

    harness.probe("Generate prompt/stop tokens", hostile)


@EXAMPLES
@given(text=st.one_of(st.text(alphabet=ALPHABET, max_size=80), st.text(max_size=20)))
def test_generate_prompt_text(harness: Harness, text: str) -> None:
    """Text is encoded with the model's tokenizer: characters outside it, and texts longer than the
    token limit (refused before encoding: each character is at least one token), are refused."""

    async def hostile() -> Outcome:
        generation = harness.client.generate(TARGET, prompt_text=text, max_new_tokens=2)
        return await outcome(collect(generation))

    result = harness.probe("Generate prompt_text", hostile)
    unknown = next((c for c in text if c not in ALPHABET), None)
    if text == "":
        result.expect(INVALID, "a new session needs a prompt (prompt_tokens or prompt_text)")
    elif len(text) > TOKEN_LIMIT:
        result.expect(
            EXHAUSTED, f"the prompt has {len(text)} characters, at least as many tokens, over the limit"
        )
    elif unknown is not None:
        result.expect(
            INVALID, f"prompt_text cannot be encoded for {TARGET_LABEL}: character {unknown!r} is not in"
        )
    else:
        result.expect(OK)
        assert len([t for r in result.value for t in r.tokens]) == 2


@EXAMPLES
@given(max_new_tokens=st.one_of(st.sampled_from([0, 1, 4096, 4097, 2**32 - 1]), st.integers(0, 2**32 - 1)))
def test_generate_max_new_tokens(harness: Harness, max_new_tokens: int) -> None:
    """Every token id is a stop token, so a valid request generates exactly one token, whatever it allows."""

    async def hostile() -> Outcome:
        generation = harness.client.generate(
            TARGET, prompt_tokens=[1], max_new_tokens=max_new_tokens, stop_tokens=range(VOCAB)
        )
        return await outcome(collect(generation))

    result = harness.probe("Generate max_new_tokens", hostile)
    if max_new_tokens == 0:
        result.expect(INVALID, "max_new_tokens must be at least 1")
    elif max_new_tokens > 4096:
        result.expect(EXHAUSTED, f"max_new_tokens {max_new_tokens} is over the server's limit of 4096")
    else:
        result.expect(OK)
        assert sum(len(r.tokens) for r in result.value) == 1
        assert result.value[-1].finish_reason == pb.FINISH_REASON_STOP


def test_ids_beyond_int64_are_refused_by_the_protobuf_client_and_wrap_on_the_wire(harness: Harness) -> None:
    """2^63 cannot be put in an int64 field by the Python client; sent as raw bytes, protobuf reads
    the varint's low 64 bits (2^63 -> -2^63), which the server refuses as outside the vocabulary."""
    for value in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match="Value out of range"):
            pb.StepRequest(tokens=[value])
        with pytest.raises(ValueError, match="Value out of range"):
            pb.TokenChunk(tokens=[value])
    tracked = harness.tracked
    step = harness.client.channel.unary_unary("/rnnserve.v1.Inference/Step")  # bytes in, bytes out
    for value, seen in ((2**63, INT64_MIN), (2**64 - 1, -1)):
        body = pb.StepRequest(session_id=tracked.session_id).SerializeToString()
        body += b"\x12" + bytes([len(varint(value))]) + varint(value)  # tokens, packed

        async def hostile(body: bytes = body) -> Outcome:
            return await outcome(step(body, timeout=30))

        harness.probe("Step raw varint ids", hostile).expect(
            INVALID, f"token id {seen} is outside the vocabulary of {TARGET_LABEL}"
        )
    harness.loop.run(harness.check_tracked())


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("rpc", ["Step", "Stream", "Generate prompt_tokens", "Generate prompt_text"])
def test_messages_over_the_size_limit(harness: Harness, rpc: str) -> None:
    """Over max_message_bytes, grpc itself refuses the message with RESOURCE_EXHAUSTED; below it but
    over max_tokens_per_request (text included: counted before it is encoded), the server does."""
    huge = [2**40] * (MESSAGE_LIMIT // 6 + 100)  # 6-byte varints: just over the limit
    tracked = harness.tracked
    client = harness.client

    async def hostile() -> list[Outcome]:
        session_id = tracked.session_id
        if rpc == "Step":
            return [await outcome(client.step(session_id, tokens)) for tokens in (huge, [1] * 1000)]
        if rpc == "Stream":
            return [await harness.stream([resume(session_id), chunk(t)]) for t in (huge, [1] * 1000)]
        if rpc == "Generate prompt_tokens":
            return [
                await outcome(collect(client.generate(session_id=session_id, prompt_tokens=tokens)))
                for tokens in (huge, [1] * 1000)
            ]
        return [
            await outcome(collect(client.generate(session_id=session_id, prompt_text=text)))
            for text in ("a" * (MESSAGE_LIMIT + 10), "a" * 1000)
        ]

    over_size, over_tokens = harness.probe(f"{rpc} over size limits", hostile)
    over_size.expect(EXHAUSTED, "larger than max")
    over_tokens.expect(EXHAUSTED, f"over the limit of {TOKEN_LIMIT} tokens per request")
    harness.loop.run(harness.check_tracked())


def resume(session_id: str, return_logits: bool = True) -> pb.StreamRequest:
    options = pb.PredictionOptions(return_logits=return_logits)
    return pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id, options=options))


def chunk(tokens: list[int]) -> pb.StreamRequest:
    return pb.StreamRequest(chunk=pb.TokenChunk(tokens=tokens))


# ----- random bytes as request bodies ------------------------------------------------------------

METHODS: dict[str, tuple[type[Message], bool]] = {  # method -> (request type, client streaming)
    method.name: (getattr(pb, method.input_type.name), method.client_streaming)
    for method in pb.DESCRIPTOR.services_by_name["Inference"].methods
}
VALID_BODIES: dict[str, bytes] = {
    "Stream": pb.StreamRequest(chunk=pb.TokenChunk(tokens=[1, 2])).SerializeToString(),
    "Generate": pb.GenerateRequest(model=TARGET, prompt_tokens=[1], max_new_tokens=2).SerializeToString(),
    "CreateSession": pb.CreateSessionRequest(model="nope").SerializeToString(),
    "Step": pb.StepRequest(session_id="0" * 32, tokens=[1]).SerializeToString(),
    "CloseSession": pb.CloseSessionRequest(session_id="0" * 32).SerializeToString(),
    "ListModels": b"",
    "GetModel": pb.GetModelRequest(name="nope", version=3).SerializeToString(),
}


@st.composite
def request_bodies(draw: st.DrawFn, method: str) -> bytes:
    """Random bytes, or a valid body of the method with some bytes flipped, cut or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=48))
    body = bytearray(VALID_BODIES[method])
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        elif action == "cut" and body:
            del body[draw(st.integers(0, len(body) - 1)) :]
        else:
            body += draw(st.binary(min_size=1, max_size=6))
    return bytes(body)


def parses(method: str, body: bytes) -> bool:
    try:
        METHODS[method][0].FromString(body)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(EXAMPLES, max_examples=25)
@given(data=st.data())
def test_random_bytes_as_a_request_body(harness: Harness, data: st.DataObject, method: str) -> None:
    """grpc's own deserializer would answer UNKNOWN ("Unexpected <class 'DecodeError'>"); the server
    registers deserializers that let the handler answer INVALID_ARGUMENT naming the message type.
    A body that happens to parse is an ordinary (nonsensical) request: a request error or OK."""
    body = data.draw(request_bodies(method))
    path = f"/rnnserve.v1.Inference/{method}"
    channel = harness.client.channel
    # Stream: once as the first message, once after a valid open.
    opening = pb.StreamRequest(open=pb.OpenSession(model=TARGET)).SerializeToString()

    async def hostile() -> list[Outcome]:
        if method == "Stream":
            return [await harness.stream(messages, raw=True) for messages in ([body], [opening, body])]
        if method == "Generate":
            return [await stream_outcome(channel.unary_stream(path)(body, timeout=30))]
        return [await outcome(channel.unary_unary(path)(body, timeout=30))]

    results = harness.probe(f"{method} random bytes", hostile)
    message_type = METHODS[method][0].DESCRIPTOR.full_name
    for result in results:
        if parses(method, body):  # an ordinary request, most likely a nonsensical one
            assert result.code in {OK, *REQUEST_ERRORS}, (result.code, result.details)
        else:
            result.expect(INVALID, f"the request body is not a valid {message_type} protobuf message: ")
    harness.loop.run(close_sessions_in(harness, method, results))


async def close_sessions_in(harness: Harness, method: str, results: list[Outcome]) -> None:
    """Close the sessions raw responses name: a Stream that opened one and then failed keeps it
    for resumption, and a parsed body may have asked for a kept session or a new one."""
    response_types: dict[str, type[Message]] = {
        "Stream": pb.StreamResponse,
        "Generate": pb.GenerateResponse,
        "CreateSession": pb.CreateSessionResponse,
    }
    if method not in response_types:
        return
    for result in results:
        bodies = result.value if isinstance(result.value, list) else [result.value]
        for body in bodies:
            if body is not None:
                session_id = getattr(response_types[method].FromString(body), "session_id", "")
                if session_id:
                    await outcome(harness.client.close_session(session_id))


# ----- Stream requests in every order ---------------------------------------------------------------

STREAM_ACTIONS = [
    "open",
    "open-no-model",
    "resume-live",
    "resume-closed",
    "resume-expired",
    "resume-unknown",
    "resume-malformed",
    "resume-empty",
    "chunk",
    "chunk-bad",
    "chunk-empty",
    "reset",
    "end",
    "control-unspecified",
    "control-unknown",
    "empty",
]


@dataclass
class StreamScript:
    """Sessions made for one example: a live one (history [1, 2]), a closed one, an expired one."""

    live: str
    closed: str
    expired: str
    unknown: str = "c0ffee" * 5 + "00"
    malformed: str = "not-a-session-id"


async def make_script(harness: Harness) -> StreamScript:
    client = harness.client
    live = (await client.create_session(TARGET)).session_id
    await client.step(live, [1, 2])
    closed = (await client.create_session(TARGET)).session_id
    await client.close_session(closed)
    expired = (await client.create_session(TARGET)).session_id
    runtime = harness.server.runtime

    def age(session_id: str) -> None:
        runtime.sessions.get(session_id).last_used -= 10 * runtime.settings.session_idle_timeout_s

    harness.server.on_loop(age, expired)
    return StreamScript(live, closed, expired)


def stream_request(action: str, script: StreamScript) -> pb.StreamRequest:
    sessions = {
        "resume-live": script.live,
        "resume-closed": script.closed,
        "resume-expired": script.expired,
        "resume-unknown": script.unknown,
        "resume-malformed": script.malformed,
        "resume-empty": "",
    }
    if action in sessions:
        return resume(sessions[action])
    requests = {
        "open": pb.StreamRequest(
            open=pb.OpenSession(model=TARGET, options=pb.PredictionOptions(return_logits=True))
        ),
        "open-no-model": pb.StreamRequest(open=pb.OpenSession()),
        "chunk": chunk([3, 4]),
        "chunk-bad": chunk([5, 99]),
        "chunk-empty": chunk([]),
        "reset": pb.StreamRequest(control=pb.CONTROL_RESET),
        "end": pb.StreamRequest(control=pb.CONTROL_END),
        "control-unspecified": pb.StreamRequest(control=pb.CONTROL_UNSPECIFIED),
        "control-unknown": pb.StreamRequest(control=7),  # type: ignore[arg-type]
        "empty": pb.StreamRequest(),
    }
    return requests[action]


@dataclass
class Expected:
    """What a Stream must answer to a script: events in order, then a status and message."""

    events: list[tuple[int, int]]  # (event, position) of each response
    code: grpc.StatusCode = OK
    message: str = ""


def expected_stream(actions: list[str], script: StreamScript) -> tuple[Expected, list[int] | None]:
    """The Stream protocol as a state machine; also returns the live session's final history
    (None when this script never resumed it)."""
    expected = Expected([])
    session: str | None = None  # "new" (opened) or the resumed id
    ended = False
    position = 0
    live_history: list[int] | None = None

    def fail(code: grpc.StatusCode, message: str) -> Expected:
        expected.code, expected.message = code, message
        return expected

    for action in actions:
        if ended:
            return fail(INVALID, "a request followed CONTROL_END on this stream"), live_history
        if action == "empty":
            return fail(
                INVALID, "empty StreamRequest: set one of open, resume, chunk or control"
            ), live_history
        if action.startswith(("open", "resume")):
            if session is not None:
                return fail(INVALID, "this stream already carries session "), live_history
            if action == "open-no-model":
                return fail(INVALID, "open needs a model name"), live_history
            gone = {
                "resume-closed": (NOT_FOUND, f"session {script.closed} was closed"),
                "resume-expired": (
                    NOT_FOUND,
                    f"session {script.expired} expired after 600 s without requests; open a new session",
                ),
                "resume-unknown": (NOT_FOUND, f"session {script.unknown!r} not found"),
                "resume-malformed": (NOT_FOUND, "session ids are 32 lower-case hex characters"),
                "resume-empty": (INVALID, "session_id is empty"),
            }
            if action in gone:
                return fail(*gone[action]), live_history
            if action == "open":
                session, position = "new", 0
                expected.events.append((pb.STREAM_EVENT_OPENED, 0))
            else:
                session, position, live_history = script.live, 2, [1, 2]
                expected.events.append((pb.STREAM_EVENT_RESUMED, position))  # where it stands
            continue
        if session is None:
            kind = "chunk" if action.startswith("chunk") else "control"
            return fail(INVALID, f"a {kind} arrived before open or resume"), live_history
        if action == "chunk":
            position += 2
            if live_history is not None:
                live_history += [3, 4]
            expected.events.append((pb.STREAM_EVENT_PREDICTION, position))
        elif action == "chunk-bad":
            return fail(INVALID, f"token id 99 is outside the vocabulary of {TARGET_LABEL}"), live_history
        elif action == "chunk-empty":
            return fail(INVALID, "a chunk needs at least one token id"), live_history
        elif action == "reset":
            position = 0
            if live_history is not None:
                live_history = []
            expected.events.append((pb.STREAM_EVENT_RESET, 0))
        elif action == "end":
            ended = True
            if live_history is not None:
                live_history = None  # closed: nothing to check afterwards
            expected.events.append((pb.STREAM_EVENT_ENDED, 0))
        else:
            return fail(INVALID, "control must be CONTROL_RESET or CONTROL_END"), live_history
    return expected, live_history


@settings(EXAMPLES, max_examples=100)
@given(actions=st.lists(st.sampled_from(STREAM_ACTIONS), min_size=1, max_size=6))
def test_stream_requests_in_any_order(harness: Harness, actions: list[str]) -> None:
    """Chunks before open and after end, reset after end, resume of live, unknown, expired and
    closed ids, a second open, unknown controls: each answered as the protocol says."""

    async def hostile() -> tuple[Outcome, StreamScript]:
        script = await make_script(harness)
        requests = [stream_request(action, script) for action in actions]
        return await harness.stream(requests), script

    result, script = harness.probe("Stream request orders", hostile)
    expected, live_history = expected_stream(actions, script)
    assert (result.code, [(r.event, r.prediction.position) for r in result.value]) == (
        expected.code,
        expected.events,
    ), result.details
    assert expected.message in result.details

    async def clean_up() -> None:
        for response in result.value:  # sessions the script's opens made (ended ones are gone)
            if response.event == pb.STREAM_EVENT_OPENED and response.session_id != script.live:
                await outcome(harness.client.close_session(response.session_id))
        if live_history is not None:  # the live session holds exactly what its stream answered
            await harness.check_tracked(Tracked(script.live, live_history))
        await outcome(harness.client.close_session(script.live))
        # The expired session was expired by a lookup, or is still waiting for one: make sure.
        await outcome(harness.client.step(script.expired, [1]))

    harness.loop.run(clean_up())


# ----- contradictory sampling options ---------------------------------------------------------------

SPECIAL_FLOATS = [
    0.0,
    -0.0,
    -1.0,
    1.0,
    0.5,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    2.0**-149,
    3.4028234663852886e38,
]
floats = st.one_of(st.none(), st.sampled_from(SPECIAL_FLOATS), st.floats(width=32))
top_ks = st.one_of(st.integers(0, VOCAB + 2), st.sampled_from([2**31, 2**32 - 1]))


def sampling_problem(temperature: float | None, top_p: float | None, top_k: int) -> str | None:
    """The message the server must give these options (checked in this order); None if valid."""
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        return "temperature must be a finite number >= 0 (0 is greedy), got"
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        return "top_p must be in (0, 1], got"
    if top_k > VOCAB:
        return f"sampling top_k must be at most the vocabulary size {VOCAB} (0 means no limit), got {top_k}"
    return None


@pytest.mark.parametrize("rpc", ["Step", "Stream", "Generate"])
@settings(EXAMPLES, max_examples=30)
@given(temperature=floats, top_p=floats, top_k=top_ks, seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_contradictory_sampling_options(
    harness: Harness, temperature: float | None, top_p: float | None, top_k: int, seed: int | None, rpc: str
) -> None:
    options = pb.SamplingOptions(top_k=top_k)
    if temperature is not None:
        options.temperature = temperature
    if top_p is not None:
        options.top_p = top_p
    if seed is not None:
        options.seed = seed
    prediction_options = pb.PredictionOptions(sampling=options)
    tracked = harness.tracked
    client = harness.client

    async def hostile() -> Outcome:
        if rpc == "Step":
            request = pb.StepRequest(session_id=tracked.session_id, tokens=[3], options=prediction_options)
            return await outcome(client.stub.Step(request, timeout=30))
        if rpc == "Stream":
            opening = pb.StreamRequest(open=pb.OpenSession(model=TARGET, options=prediction_options))
            requests = [opening, chunk([3]), pb.StreamRequest(control=pb.CONTROL_END)]
            return await harness.stream(requests)
        request = pb.GenerateRequest(model=TARGET, prompt_tokens=[3], max_new_tokens=3, sampling=options)
        return await outcome(collect(client.stub.Generate(request, timeout=30)))

    result = harness.probe(f"{rpc} sampling options", hostile)
    problem = sampling_problem(temperature, top_p, top_k)
    if problem is not None:
        result.expect(INVALID, problem)
    else:
        result.expect(OK)
        if rpc == "Step":
            tracked.history.append(3)
            assert 0 <= result.value.prediction.sampled_token < VOCAB
        elif rpc == "Stream":
            assert 0 <= result.value[1].prediction.sampled_token < VOCAB
        else:
            generated = [t for r in result.value for t in r.tokens]
            assert len(generated) == 3 and all(0 <= t < VOCAB for t in generated)
    harness.loop.run(harness.check_tracked())


@pytest.mark.parametrize("rpc", ["Step", "Stream"])
@settings(EXAMPLES, max_examples=25)
@given(top_k=top_ks)
def test_prediction_top_k_beyond_the_vocabulary(harness: Harness, top_k: int, rpc: str) -> None:
    tracked = harness.tracked
    options = pb.PredictionOptions(top_k=top_k)

    async def hostile() -> Outcome:
        if rpc == "Step":
            request = pb.StepRequest(session_id=tracked.session_id, tokens=[2], options=options)
            return await outcome(harness.client.stub.Step(request, timeout=30))
        requests = [
            pb.StreamRequest(open=pb.OpenSession(model=TARGET, options=options)),
            chunk([2]),
            pb.StreamRequest(control=pb.CONTROL_END),
        ]
        return await harness.stream(requests)

    result = harness.probe(f"{rpc} top_k", hostile)
    if top_k > VOCAB:
        result.expect(INVALID, f"top_k must be at most the vocabulary size {VOCAB} of {TARGET_LABEL}")
    else:
        result.expect(OK)
        prediction = result.value.prediction if rpc == "Step" else result.value[1].prediction
        assert len(prediction.top_ids) == (top_k or 5)
        if rpc == "Step":
            tracked.history.append(2)
    harness.loop.run(harness.check_tracked())


# ----- unknown models, versions and sessions ---------------------------------------------------------

model_names = st.one_of(
    st.sampled_from(["tiny-gru", "tiny-lstm", "TINY-GRU", "tiny-gru ", "", "tiny"]), st.text(max_size=24)
)
versions = st.one_of(st.sampled_from([0, 1, 2, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
SERVED = {"tiny-gru", "tiny-lstm"}


@pytest.mark.parametrize("rpc", ["CreateSession", "GetModel", "Stream", "Generate"])
@settings(EXAMPLES, max_examples=25)
@given(name=model_names, version=versions)
def test_unknown_models_and_versions(harness: Harness, name: str, version: int, rpc: str) -> None:
    client = harness.client

    async def hostile() -> Outcome:
        if rpc == "CreateSession":
            return await outcome(
                client.stub.CreateSession(pb.CreateSessionRequest(model=name, version=version))
            )
        if rpc == "GetModel":
            return await outcome(client.stub.GetModel(pb.GetModelRequest(name=name, version=version)))
        if rpc == "Stream":
            requests = [pb.StreamRequest(open=pb.OpenSession(model=name, version=version)), chunk([1])]
            requests.append(pb.StreamRequest(control=pb.CONTROL_END))
            return await harness.stream(requests)
        request = pb.GenerateRequest(model=name, version=version, prompt_tokens=[1], max_new_tokens=2)
        return await outcome(collect(client.stub.Generate(request, timeout=30)))

    result = harness.probe(f"{rpc} model/version", hostile)
    empty_name = {
        "CreateSession": "a model name is needed to open a session",
        "Stream": "open needs a model name",
        "Generate": "give model (to start a new session) or session_id (to continue one)",
    }
    if name == "" and rpc in empty_name:
        result.expect(INVALID, empty_name[rpc])
    elif name not in SERVED:
        rule = "" if valid_model_name(name) else f" (model names are {MODEL_NAME_RULE})"
        result.expect(NOT_FOUND, f"model {name!r} is not served{rule}; models: ['tiny-gru', 'tiny-lstm']")
    elif version not in (0, 1) and rpc == "GetModel":
        result.expect(NOT_FOUND, f"model {name!r} has no loaded version {version}; loaded versions: [1]")
    elif version not in (0, 1):
        result.expect(
            NOT_FOUND,
            f"model {name!r} has no version {version} open to new sessions; "
            f"versions open to new sessions: [1] (0 = latest)",
        )
    else:
        result.expect(OK)
        if rpc == "CreateSession":
            harness.loop.run(client.close_session(result.value.session_id))


session_ids = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    st.text(alphabet="0123456789ABCDEF", min_size=32, max_size=32),
)


@pytest.mark.parametrize("rpc", ["Step", "CloseSession", "Stream", "Generate"])
@settings(EXAMPLES, max_examples=25)
@given(session_id=session_ids)
def test_unknown_session_ids(harness: Harness, session_id: str, rpc: str) -> None:
    client = harness.client

    async def hostile() -> Outcome:
        if rpc == "Step":
            return await outcome(client.step(session_id, [1]))
        if rpc == "CloseSession":
            return await outcome(client.close_session(session_id))
        if rpc == "Stream":
            return await harness.stream([resume(session_id), chunk([1])])
        return await outcome(collect(client.generate(session_id=session_id, max_new_tokens=2)))

    result = harness.probe(f"{rpc} session ids", hostile)
    if session_id == "":
        message = "give model (to start a new session)" if rpc == "Generate" else "session_id is empty"
        result.expect(INVALID, message)
    elif len(session_id) == 32 and all(c in "0123456789abcdef" for c in session_id):
        result.expect(NOT_FOUND, f"session {session_id!r} not found")
    else:
        result.expect(NOT_FOUND, "not found: session ids are 32 lower-case hex characters")


# ----- malformed model repositories --------------------------------------------------------------------


def copy_version(source: Path, repository: Path, name: str, version: str) -> Path:
    """Copy a published version to NAME/VERSION, with config.json's name and version to match."""
    target = repository / name / version
    shutil.copytree(source, target)
    config = json.loads((target / sig.CONFIG_FILE).read_text())
    config.update(name=name, version=int(version) if version.isdigit() else version)
    (target / sig.CONFIG_FILE).write_text(json.dumps(config))
    return target


def edit_config(version_dir: Path, **changes: object) -> None:
    config = json.loads((version_dir / sig.CONFIG_FILE).read_text())
    config.update(changes)
    (version_dir / sig.CONFIG_FILE).write_text(json.dumps(config))


def replace_model(version_dir: Path, data: bytes) -> None:
    """Write model.onnx and record its sha256, so only its contents are wrong."""
    (version_dir / sig.MODEL_FILE).write_bytes(data)
    edit_config(version_dir, model_sha256=sha256_file(version_dir / sig.MODEL_FILE))


def unknown_operator(version_dir: Path) -> None:
    """A well-formed ONNX file whose recurrent node onnxruntime has no kernel for."""
    model = onnx.load(str(version_dir / sig.MODEL_FILE))
    for node in model.graph.node:
        if node.op_type in ("LSTM", "GRU"):
            node.op_type = "NoSuchRecurrence"
    replace_model(version_dir, model.SerializeToString())


def test_malformed_repositories_are_refused_with_a_log_line_and_valid_models_serve(
    tmp_path: Path, oracles: dict[str, Oracle], caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "source"
    lstm_v1 = export_tiny_model(source, tmp_path / "checkpoints", "tiny-lstm", "lstm", 2)
    gru_v1 = export_tiny_model(source, tmp_path / "checkpoints", "tiny-gru", "gru", 1)
    repository = tmp_path / "repository"
    copy_version(lstm_v1, repository, "tiny-lstm", "1")
    copy_version(gru_v1, repository, "tiny-gru", "1")
    copy_version(gru_v1, repository, "also-gru", "5")  # a valid model under another name
    broken: dict[Path, str] = {}  # version dir -> the reason its log line must give

    def damage(name: str, version: str, source_dir: Path, how: Callable[[Path], None], reason: str) -> None:
        version_dir = copy_version(source_dir, repository, name, version)
        how(version_dir)
        broken[version_dir] = reason

    damage(
        "tiny-lstm",
        "2",
        lstm_v1,
        lambda v: (v / sig.MODEL_FILE).unlink(),
        "incomplete version, model.onnx is missing",
    )
    damage(
        "tiny-lstm",
        "3",
        lstm_v1,
        lambda v: (v / sig.MODEL_FILE).write_bytes((v / sig.MODEL_FILE).read_bytes()[:300]),
        "does not match",
    )
    damage(
        "tiny-lstm",
        "4",
        lstm_v1,
        lambda v: replace_model(v, (v / sig.MODEL_FILE).read_bytes()[:300]),
        "not a readable ONNX model",
    )
    damage("tiny-gru", "2", gru_v1, lambda v: edit_config(v, hidden_size=32), "disagrees with config.json")
    damage("tiny-gru", "latest", gru_v1, lambda v: None, "version directory names must be positive integers")
    damage(
        "tiny-gru",
        "3",
        gru_v1,
        lambda v: (v / sig.CONFIG_FILE).write_bytes(b'\xff\xfe{"name": '),
        "not readable JSON",
    )
    damage(
        "tiny-gru",
        "4",
        gru_v1,
        lambda v: (v / sig.CONFIG_FILE).write_text('{"format": '),
        "not readable JSON",
    )
    damage("tiny-gru", "6", gru_v1, unknown_operator, "onnxruntime cannot load")
    damage("tiny-lstm", "5", lstm_v1, lambda v: (v / sig.CONFIG_FILE).unlink(), "config.json is missing")
    damage(
        "only-broken",
        "1",
        gru_v1,
        lambda v: (v / sig.MODEL_FILE).write_bytes(b"\x08\x07" + b"\x00" * 64),
        "does not match",
    )
    (repository / "README.txt").write_text("stray files in the repository are ignored\n")

    with caplog.at_level(logging.ERROR, logger="serving.core.registry"):
        server = ServerThread(repository)
    try:
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        for version_dir, reason in broken.items():
            assert any(str(version_dir) in line and reason in line for line in lines), (
                version_dir,
                reason,
                lines,
            )
        assert "model 'only-broken' has no servable version" in lines

        async def every_valid_model_serves() -> dict[str, list[int]]:
            async with RnnserveClient(server.target) as client:
                served = {m.name: [v.version for v in m.versions] for m in await client.list_models()}
                for name, oracle in (("tiny-lstm", oracles["tiny-lstm"]), ("tiny-gru", oracles["tiny-gru"])):
                    session_id = (await client.create_session(name)).session_id
                    step = await client.step(session_id, [4, 2], return_logits=True)
                    np.testing.assert_allclose(step.prediction.logits, oracle.last_logits([4, 2]), atol=1e-5)
                    await client.close_session(session_id)
                created = await client.create_session("also-gru")
                assert created.version == 5
                await client.close_session(created.session_id)
                return served

        served = asyncio.run(every_valid_model_serves())
        assert served == {"also-gru": [5], "tiny-gru": [1], "tiny-lstm": [1]}
    finally:
        server.stop()
