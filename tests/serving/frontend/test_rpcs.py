"""Every RPC of rnnserve.v1.Inference against a real server, plus health and reflection."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from contract.tokenizer import tokenizer_from_json
from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import RnnserveClient, Sampling
from tests.support.models import ALPHABET, TINY_MODELS, Oracle
from tests.support.servers import ServerThread, run


def test_list_models_describes_every_model(server: ServerThread) -> None:
    async def scenario() -> list[pb.ModelInfo]:
        async with RnnserveClient(server.target) as client:
            return await client.list_models()

    models = {m.name: m for m in run(scenario())}
    assert sorted(models) == sorted(TINY_MODELS)
    lstm = models["tiny-lstm"].versions[0]
    assert models["tiny-lstm"].latest_version == 1
    assert (lstm.version, lstm.arch, lstm.num_layers, lstm.hidden_size, lstm.embedding_size) == (
        1,
        "lstm",
        2,
        16,
        8,
    )
    assert lstm.vocab_size == len(set(ALPHABET))
    assert [(s.name, list(s.shape)) for s in lstm.state] == [("h", [2, 16]), ("c", [2, 16])]
    assert [s.name for s in models["tiny-gru"].versions[0].state] == ["h"]
    assert lstm.precision == "fp32" and len(lstm.model_sha256) == 64
    assert "val_loss" in json.loads(lstm.metrics_json)
    assert tokenizer_from_json(lstm.tokenizer_json).encode("ab") == [ALPHABET_IDS["a"], ALPHABET_IDS["b"]]


ALPHABET_IDS = {c: i for i, c in enumerate(sorted(set(ALPHABET)))}


def test_get_model_latest_and_pinned_version(server: ServerThread) -> None:
    async def scenario() -> tuple[pb.ModelInfo, pb.ModelInfo]:
        async with RnnserveClient(server.target) as client:
            return await client.get_model("tiny-gru"), await client.get_model("tiny-gru", 1)

    latest, pinned = run(scenario())
    assert latest.name == "tiny-gru" and [v.version for v in latest.versions] == [1]
    assert pinned == latest


def test_unary_session_lifecycle_matches_the_oracle(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            created = await client.create_session("tiny-lstm")
            assert len(created.session_id) == 32 and int(created.session_id, 16) >= 0
            assert (created.model, created.version) == ("tiny-lstm", 1)
            first = await client.step(created.session_id, [3, 4, 5], top_k=4, return_logits=True)
            second = await client.step(created.session_id, [6], top_k=4, return_logits=True)
            assert first.prediction.position == 3 and second.prediction.position == 4
            expected = oracles["tiny-lstm"].last_logits([3, 4, 5, 6])
            np.testing.assert_allclose(second.prediction.logits, expected, atol=1e-5)
            logprobs = oracles["tiny-lstm"].logprobs([3, 4, 5, 6])
            assert list(second.prediction.top_ids) == list(np.argsort(-logprobs, kind="stable")[:4])
            np.testing.assert_allclose(
                second.prediction.top_logprobs, logprobs[second.prediction.top_ids], atol=1e-5
            )
            await client.close_session(created.session_id)
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                await client.step(created.session_id, [1])
            assert closed.value.code() == grpc.StatusCode.NOT_FOUND
            assert "was closed" in (closed.value.details() or "")

    run(scenario())


def test_step_defaults_to_five_top_ids_without_logits(server: ServerThread) -> None:
    async def scenario() -> pb.StepResponse:
        async with RnnserveClient(server.target) as client:
            session = await client.create_session("tiny-gru")
            return await client.step(session.session_id, [1])

    prediction = run(scenario()).prediction
    assert len(prediction.top_ids) == 5 and len(prediction.top_logprobs) == 5
    assert list(prediction.top_logprobs) == sorted(prediction.top_logprobs, reverse=True)
    assert len(prediction.logits) == 0 and not prediction.HasField("sampled_token")


def test_stream_open_chunks_reset_end(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    oracle = oracles["tiny-gru"]

    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            stream = client.stream("tiny-gru", top_k=3, return_logits=True)
            async with stream:
                assert len(stream.session_id) == 32 and stream.version == 1
                first = await stream.send([1, 2])
                second = await stream.send([3])
                np.testing.assert_allclose(second.logits, oracle.last_logits([1, 2, 3]), atol=1e-5)
                assert (first.position, second.position) == (2, 3) and len(second.top_ids) == 3
                await stream.reset()
                after_reset = await stream.send([3])
                np.testing.assert_allclose(after_reset.logits, oracle.last_logits([3]), atol=1e-5)
                assert after_reset.position == 1
                await stream.end()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await client.step(stream.session_id, [1])
            assert ended.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())


def test_stream_resume_continues_a_session(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            async with client.stream("tiny-lstm") as first:
                await first.send([7, 8])
            # Leaving without END keeps the session; a new stream resumes it.
            async with client.stream(session_id=first.session_id, return_logits=True) as resumed:
                assert resumed.session_id == first.session_id
                prediction = await resumed.send([9])
            np.testing.assert_allclose(
                prediction.logits, oracles["tiny-lstm"].last_logits([7, 8, 9]), atol=1e-5
            )
            assert prediction.position == 3
            await client.close_session(first.session_id)

    run(scenario())


def test_stream_sampling_is_seeded(server: ServerThread) -> None:
    async def sampled(seed: int) -> list[int]:
        async with (
            RnnserveClient(server.target) as client,
            client.stream("tiny-lstm", sampling=Sampling(seed=seed)) as stream,
        ):
            tokens = [(await stream.send([t])).sampled_token for t in (1, 2, 3, 4, 5)]
            await stream.end()
            return tokens

    assert run(sampled(11)) == run(sampled(11))
    assert all(0 <= t < len(ALPHABET_IDS) for t in run(sampled(12)))


def test_generate_streams_text_and_reports_the_finish(server: ServerThread) -> None:
    async def scenario() -> list[pb.GenerateResponse]:
        async with RnnserveClient(server.target) as client:
            return [
                r
                async for r in client.generate(
                    "tiny-lstm", prompt_text="to be", max_new_tokens=12, sampling=Sampling(seed=5)
                )
            ]

    responses = run(scenario())
    tokens = [t for r in responses for t in r.tokens]
    assert len(tokens) == 12
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    alphabet = sorted(set(ALPHABET))
    assert "".join(r.text for r in responses) == "".join(alphabet[t] for t in tokens)
    assert all(r.model == "tiny-lstm" and r.version == 1 and r.session_id == "" for r in responses)


def test_generate_stops_at_a_stop_token(server: ServerThread) -> None:
    async def scenario(stop: list[int]) -> list[int]:
        async with RnnserveClient(server.target) as client:
            return [
                t
                async for r in client.generate(
                    "tiny-gru",
                    prompt_tokens=[1, 2],
                    max_new_tokens=50,
                    sampling=Sampling(temperature=0),
                    stop_tokens=stop,
                )
                for t in r.tokens
            ]

    greedy = run(scenario([]))
    stop_at = greedy[3]
    stopped = run(scenario([stop_at]))
    assert stopped == greedy[: greedy.index(stop_at) + 1]


def test_generate_keeps_and_continues_a_session(server: ServerThread, oracles: dict[str, Oracle]) -> None:
    async def scenario() -> None:
        async with RnnserveClient(server.target) as client:
            first = [
                r
                async for r in client.generate(
                    "tiny-lstm",
                    prompt_tokens=[4, 5],
                    max_new_tokens=3,
                    keep_session=True,
                    sampling=Sampling(seed=1),
                )
            ]
            session_id = first[0].session_id
            assert len(session_id) == 32
            generated = [t for r in first for t in r.tokens]
            more = [
                r
                async for r in client.generate(
                    session_id=session_id, max_new_tokens=2, sampling=Sampling(seed=2)
                )
            ]
            generated += [t for r in more for t in r.tokens]
            step = await client.step(session_id, [6], return_logits=True)
            history = [4, 5, *generated, 6]
            assert step.prediction.position == len(history)
            np.testing.assert_allclose(
                step.prediction.logits, oracles["tiny-lstm"].last_logits(history), atol=1e-5
            )

    run(scenario())


def test_health_overall_per_service_and_per_model(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.Inference", *TINY_MODELS):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "rnnserve.v1.Inference",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        described = database.FindFileContainingSymbol("rnnserve.v1.Inference")
        assert "rnnserve/v1/inference.proto" in described.name
