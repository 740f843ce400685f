"""`rnnserve serve`: the gRPC server (rnnserve.v1.Inference, grpc.health.v1.Health, reflection).

main() reads top to bottom: parse the settings, load and check the models, create the server,
run it until SIGINT/SIGTERM, then stop gracefully (health NOT_SERVING, no new sessions, calls in
flight get `grace_period_s` to finish). `create_server(settings)` is the piece tests and tools use:
it returns the server and the bound port, so `port=0` gives a free one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from protos.rnnserve.v1 import inference_pb2, inference_pb2_grpc
from serving.engine import EngineError, resolve_providers
from serving.observers import ServerObserver
from serving.registry import ModelRegistry, load_repository
from serving.repository import RepositoryError
from serving.runtime import Runtime
from serving.service import Identity, InferenceServicer, no_identity
from serving.settings import ServerSettings, parse_settings

log = logging.getLogger("rnnserve.server")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SERVICE_NAMES = (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)


class BindError(RuntimeError):
    """The server's address cannot be bound (in use, or not an address of this machine)."""


class RnnserveServer:
    """A grpc.aio server with rnnserve's runtime; start(), stop(grace), wait_for_termination()."""

    def __init__(
        self,
        settings: ServerSettings,
        runtime: Runtime,
        grpc_server: grpc.aio.Server,
        health_servicer: HealthServicer,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.grpc_server = grpc_server
        self.health = health_servicer

    def health_names(self) -> list[str]:
        """Health service names: overall (""), the Inference service and every model name."""
        return ["", INFERENCE_SERVICE, *self.runtime.registry.names()]

    async def set_serving(self, serving: bool) -> None:
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if serving else statuses.NOT_SERVING
        for name in self.health_names():
            await self.health.set(name, status)

    async def start(self) -> None:
        self.runtime.start()
        await self.grpc_server.start()
        await self.set_serving(True)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new sessions, let calls in flight finish within `grace` seconds, then stop."""
        self.runtime.draining = True
        await self.set_serving(False)
        await self.grpc_server.stop(grace)
        await self.runtime.stop()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # Two servers on one port would split traffic silently; fail to bind instead.
        ("grpc.so_reuseport", 0),
    ]


async def create_server(
    settings: ServerSettings,
    registry: ModelRegistry | None = None,
    *,
    observer: ServerObserver | None = None,
    identity: Identity = no_identity,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[RnnserveServer, int]:
    """Build the server on the running event loop and bind settings.host:settings.port.

    Loads the repository unless a registry is given. Returns (server, port): the bound port,
    which is a free one when settings.port is 0. Call `await server.start()` to serve.
    `observer` receives the server's events (metrics), `identity` names a call's caller for
    session ownership, `interceptors` wrap every RPC (auth, request metrics), and `credentials`
    serve TLS instead of plaintext. Raises BindError when the address cannot be bound.
    """
    if registry is None:
        registry = load_repository(settings, observer)
    runtime = Runtime(settings, registry)
    grpc_server = grpc.aio.server(options=server_options(settings), interceptors=list(interceptors))
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(runtime, identity), grpc_server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(SERVICE_NAMES, grpc_server)
    server = RnnserveServer(settings, runtime, grpc_server, health_servicer)
    for name in server.health_names():
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(settings.address)
        else:
            port = grpc_server.add_secure_port(settings.address, credentials)
    except RuntimeError as error:
        raise BindError(f"cannot listen on {settings.address}: {error}") from None
    return server, port


async def serve(settings: ServerSettings, registry: ModelRegistry) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    server, port = await create_server(settings, registry)
    await server.start()
    log.info(
        "serving %s on %s:%d (max_batch_size %d, device %s)",
        ", ".join(registry.names()),
        settings.host,
        port,
        settings.max_batch_size,
        settings.device,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("stopping: calls in flight have %g s to finish", settings.grace_period_s)
    await server.stop(settings.grace_period_s)
    log.info("stopped")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level)
    try:
        providers = resolve_providers(settings.device)  # fails here when CUDA is asked for and absent
        log.info("onnxruntime providers for --device %s: %s", settings.device, providers)
        registry = load_repository(settings)
    except (RepositoryError, EngineError) as error:
        log.error("%s", error)
        return 2
    try:
        asyncio.run(serve(settings, registry))
    except BindError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
