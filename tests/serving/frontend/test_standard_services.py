"""The standard gRPC services: reflection v1 and v1alpha, and health's List."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.support.models import TINY_MODELS
from tests.support.ops import OpsServer
from tests.support.servers import ServerThread

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def reflect_v1(
    channel: grpc.Channel, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """A v1-only reflection client: it calls grpc.reflection.v1 and nothing else. (v1's messages
    are v1alpha's, field for field, so v1alpha's classes encode and decode them.)"""
    call = channel.stream_stream(
        V1_METHOD,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def test_a_v1_only_reflection_client_lists_and_describes_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        listed, inference, itself, kserve = reflect_v1(
            channel,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="rnnserve.v1.Inference"),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        )
    names = {service.name for service in listed.list_services_response.service}
    assert names == {
        "rnnserve.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in inference.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.name.endswith("rnnserve/v1/inference.proto") for f in files)
    kserve_files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in kserve.file_descriptor_response.file_descriptor_proto
    ]
    assert any(
        f.package == "inference" and any(s.name == "GRPCInferenceService" for s in f.service)
        for f in kserve_files
    )
    [v1] = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in itself.file_descriptor_response.file_descriptor_proto
    ]
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    [method] = v1.service[0].method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )


def test_health_list_answers_every_name_without_an_error_in_the_log(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    statuses = {name: value.status for name, value in response.statuses.items()}
    serving = health_pb2.HealthCheckResponse.SERVING
    assert statuses == {name: serving for name in ("", "rnnserve.v1.Inference", *TINY_MODELS)}
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []


def test_health_list_needs_a_token_where_check_does_not(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token = "b" * 32
    ops = OpsServer(model_repository, auth_tokens=token)
    try:
        with grpc.insecure_channel(ops.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            checked = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                stub.List(health_pb2.HealthListRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            listed = stub.List(
                health_pb2.HealthListRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=5
            )
            assert set(TINY_MODELS) <= set(listed.statuses)
    finally:
        ops.stop()
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
