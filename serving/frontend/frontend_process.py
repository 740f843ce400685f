"""One front-end process of `rnnserve serve --frontends N`: gRPC on the shared port, the engine
core over IPC (serving.engine.remote.RemoteRuntime).

It does the protocol work (parsing, auth, validation of the request's shape, building responses,
streaming) and holds no session: any front end serves any session. Each call's trailing
metadata names the front end's pid (`x-rnnserve-frontend`), so a client or a test can tell
which process answered. Health follows the engine core: SERVING while the core answers, is not
draining and serves a model (polled every HEALTH_POLL_S).

On SIGTERM (the supervisor's, serving.frontend.supervisor): health turns NOT_SERVING, calls in
flight get --grace-period-s to finish (the core, told to drain, refuses new sessions meanwhile),
then the gRPC server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from protos.rnnserve.v1 import inference_pb2
from serving.core.errors import ServingError
from serving.engine.remote import EngineConnection, RemoteRuntime
from serving.frontend.servicer import Identity, InferenceServicer, add_inference_servicer, no_identity
from serving.frontend.standard_services import HealthServicer, add_health_servicer, enable_reflection
from serving.ops.auth import AuthInterceptor, load_tokens, server_credentials
from serving.ops.heap import HeapTrimmer
from serving.ops.logs import REQUEST_ID_KEY, CallTracker, request_id
from serving.settings import ServerSettings, join_host_port

log = logging.getLogger("rnnserve.frontend")

FRONTEND_KEY = "x-rnnserve-frontend"  # trailing metadata: the pid of the front end that answered
HEALTH_POLL_S = 0.5
STOP_SETTLE_S = 0.5  # after the grace period: time for calls to write their last answers
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
CORE_WAIT_S = 600.0  # at start: how long to wait for the engine core to load its models


class FrontendCallTracker(CallTracker):
    """CallTracker whose trailing metadata also names this front end's pid."""

    def begin(self, context: Any, method: str, metadata: Any, call_type: str) -> tuple[bool, float]:
        token = super().begin(context, method, metadata, call_type)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id.get()), (FRONTEND_KEY, str(os.getpid()))))
        return token


def frontend_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.receive_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1),  # the N front ends share the port; the kernel spreads connections
    ]


async def _follow_health(api: RemoteRuntime, health: HealthServicer, stopping: asyncio.Event) -> None:
    statuses = health_pb2.HealthCheckResponse
    known: set[str] = set()
    while not stopping.is_set():
        try:
            report = await api.health()
            serving = not report.draining and bool(report.open_models)
            names = set(report.models)
        except ServingError:
            serving, names = False, set()
        overall = statuses.SERVING if serving else statuses.NOT_SERVING
        await health.set("", overall)
        await health.set(INFERENCE_SERVICE, overall)
        known |= names
        for name in sorted(known):
            up = serving and name in names and name in report.open_models
            await health.set(name, statuses.SERVING if up else statuses.NOT_SERVING)
        try:
            await asyncio.wait_for(stopping.wait(), HEALTH_POLL_S)
        except asyncio.TimeoutError:  # the same class from Python 3.11
            continue


async def run_frontend(settings: ServerSettings, engine_socket: str) -> int:
    """Serve gRPC on settings.port (shared) until SIGTERM; see the module docstring."""
    connection = EngineConnection(engine_socket)
    await connection.start(wait_s=CORE_WAIT_S)
    api = RemoteRuntime(connection)
    tokens = load_tokens(settings)
    identity: Identity = no_identity
    interceptors: list[grpc.aio.ServerInterceptor] = []
    calls = FrontendCallTracker(settings.log_requests)
    if settings.metrics_port:  # recorded for the supervisor's summed /metrics
        from serving.ops.metrics import MetricsObserver

        interceptors.append(MetricsObserver(process_metrics=False).interceptor())
    if tokens is not None:
        auth = AuthInterceptor(tokens)
        interceptors.append(auth)
        identity = auth.identity
        calls.caller = lambda context: tokens.identify_metadata(context.invocation_metadata())
    server = grpc.aio.server(options=frontend_options(settings), interceptors=[calls, *interceptors])
    add_inference_servicer(InferenceServicer(api, identity, settings), server)
    health_servicer = HealthServicer(settings.max_health_watches_per_peer)
    add_health_servicer(health_servicer, server)
    enable_reflection((INFERENCE_SERVICE, health.SERVICE_NAME), server)
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    follower = loop.create_task(_follow_health(api, health_servicer, stopping))
    trimming = None
    if settings.heap_trim_interval_s > 0:  # large requests are parsed here: give their memory back
        trimming = loop.create_task(HeapTrimmer(settings.heap_trim_interval_s).run())
    log.info("front end %d serving on %s", os.getpid(), join_host_port(settings.host, port))
    await stopping.wait()
    await follower
    await health_servicer.enter_graceful_shutdown()
    if not await calls.wait_idle(settings.grace_period_s):
        log.info("grace period over: %d calls still open", calls.in_flight)
    await server.stop(STOP_SETTLE_S)
    if trimming is not None:
        trimming.cancel()
        await asyncio.gather(trimming, return_exceptions=True)
    await connection.close()
    return 0
