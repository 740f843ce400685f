"""The standard gRPC services beside rnnserve.v1.Inference: health (with List) and reflection.

Generic tools find their way around the server with these, without the proto file:

- `grpc.health.v1.Health`: Check and Watch as grpcio-health-checking serves them, plus List (a
  snapshot of every service name's status), which its servicer leaves unimplemented. Health needs
  no token (probes carry no secrets), so anyone who can reach the port can open Watch streams, and
  each stays open for as long as its client likes (measured: about 20 MiB of server memory per 300
  streams): at most `max_watches_per_peer` are open per client address at a time, and the next is
  refused with RESOURCE_EXHAUSTED (reason HEALTH_WATCH_LIMIT). Check and List are not limited:
  they answer at once and hold nothing.
- Server reflection under both names clients use: `grpc.reflection.v1.ServerReflection` (grpcurl,
  Postman and current gRPC libraries ask for it first) and `grpc.reflection.v1alpha`
  (older clients). grpcio-reflection ships only v1alpha. The v1 protocol is the same messages,
  field for field, in another package, so one servicer answers both: the v1 method decodes and
  encodes with the v1alpha message classes, and the v1 service's own descriptor, made from
  v1alpha's by renaming its package, is added to the descriptor pool so that reflection
  describes itself under both names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as _GrpcHealthServicer
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from serving.core.errors import Reason, ResourceExhaustedError, refuse

REFLECTION_V1ALPHA = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_SERVICES = (REFLECTION_V1, REFLECTION_V1ALPHA)
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string, without its port: "ipv4:10.0.0.7:51234" ->
    "ipv4:10.0.0.7", "ipv6:[::1]:51234" -> "ipv6:[::1]"; other forms (unix:...) as they are."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return f"{kind}:{host}"
    return peer


class HealthServicer(_GrpcHealthServicer):
    """grpc.health.v1.Health with List, and at most `max_watches_per_peer` open Watch streams per
    client address."""

    def __init__(self, max_watches_per_peer: int) -> None:
        super().__init__()
        self.max_watches_per_peer = max_watches_per_peer
        self._watches: Counter[str] = Counter()  # client address -> open Watch streams

    def open_watches(self, peer: str) -> int:
        return self._watches[peer_address(peer)]

    async def List(  # noqa: N802 (a gRPC method name)
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(  # noqa: N802 (a gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        address = peer_address(context.peer())
        limit = self.max_watches_per_peer
        if self._watches[address] >= limit:
            refuse(
                context,
                ResourceExhaustedError(
                    f"{address} has {limit} health Watch streams open, the limit "
                    f"(--max-health-watches-per-peer); close one, or poll with Check",
                    Reason.HEALTH_WATCH_LIMIT,
                    limit=limit,
                ),
            )
            return
        self._watches[address] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches[address] -= 1
            if not self._watches[address]:
                del self._watches[address]


def add_health_servicer(servicer: HealthServicer, server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put grpc/reflection/v1/reflection.proto in `pool` (v1alpha's file, renamed), once."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_package = proto.package
    proto.name = _V1_FILE
    proto.package = REFLECTION_V1.rpartition(".")[0]
    proto.ClearField("options")  # v1alpha's language options (java_package, ...) name v1alpha
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old_package}."):
                field.type_name = f".{proto.package}." + field.type_name[len(old_package) + 2 :]
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old_package}.", f".{proto.package}.")
            method.output_type = method.output_type.replace(f".{old_package}.", f".{proto.package}.")
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and both reflection
    services, from the default descriptor pool (where the generated modules put their files)."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = ReflectionServicer((*service_names, *REFLECTION_SERVICES), pool=pool)
    for service in REFLECTION_SERVICES:
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
