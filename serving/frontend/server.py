"""`rnnserve serve`: the gRPC server (rnnserve.v1.Inference, KServe v2's
inference.GRPCInferenceService, grpc.health.v1.Health, reflection v1 and v1alpha; see
serving.frontend.standard_services) and the HTTP front end.

main() reads top to bottom: parse the settings, check the security files, load the models,
build the server (metrics, auth, TLS, hot reload, snapshots), restore saved sessions, serve until
SIGTERM/SIGINT (SIGHUP: look for new model versions now), then shut down gracefully.

Graceful shutdown (`RnnserveServer.stop(grace)`), in order:
1. Health turns NOT_SERVING for every service name, and new sessions are refused with
   UNAVAILABLE; open sessions keep working, so calls in flight can finish their exchange.
2. Wait up to `grace` seconds for the rnnserve.v1.Inference calls in flight to end.
3. Freeze the sessions: steps in flight finish; any later request is refused with UNAVAILABLE
   before it changes a session, then the gRPC server stops (calls still open get STOP_SETTLE_S
   to write their last answers, then are cancelled).
4. With --state-snapshot, save every session (exactly the answered steps); with --redis-url,
   save every session to Redis, where the other replicas find them; then stop the models.

With --redis-url, sessions are also saved while serving and restored on a miss by any replica
sharing the Redis (serving.state.recovery); the server creates that store on its event loop.

Health: the overall service ("") and rnnserve.v1.Inference are SERVING while the server is not
draining and serves at least one model; each model name is SERVING while one of its versions
takes new sessions. A server started on an empty repository is therefore up but NOT_SERVING until
a model is exported into it (hot reload), which keeps it out of load balancers meanwhile. A model
name the server never served answers NOT_FOUND, as grpc.health.v1 specifies.

`create_server(settings, registry)` builds the gRPC part alone (tests and the bench use it);
`build_server` adds what `rnnserve serve` runs besides: the HTTP front end (`attach_http`),
Prometheus /metrics, bearer tokens, TLS, the plaintext health port, hot reload and snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2

from protos.rnnserve.v1 import inference_pb2
from serving.core.engine import EngineError, resolve_providers
from serving.core.local import LocalEngine
from serving.core.observers import ServerObserver
from serving.core.registry import ModelRegistry, load_repository
from serving.core.repository import RepositoryError
from serving.core.runtime import Runtime
from serving.frontend.http.app import HttpApi
from serving.frontend.http.server import HttpBindError, HttpFrontend, HttpTls
from serving.frontend.kserve_common import KServeFrontend
from serving.frontend.kserve_grpc import SERVICE_NAME as KSERVE_SERVICE
from serving.frontend.kserve_grpc import KServeServicer, add_kserve_servicer
from serving.frontend.servicer import Identity, InferenceServicer, add_inference_servicer, no_identity
from serving.frontend.standard_services import (
    HealthServicer,
    add_health_servicer,
    enable_reflection,
)
from serving.ops.auth import (
    AuthInterceptor,
    SecurityConfigError,
    TokenTable,
    load_tokens,
    metrics_tls_context,
    server_credentials,
)
from serving.ops.heap import HeapTrimmer
from serving.ops.logs import CallTracker, configure_logging
from serving.ops.metrics import MetricsBindError, MetricsObserver, MetricsServer, start_metrics_server
from serving.ops.reload import RepositoryWatcher
from serving.ops.runtime_metrics import register_runtime_metrics
from serving.settings import ServerSettings, join_host_port, parse_settings
from serving.state.recovery import recovery_for
from serving.state.snapshot import SessionSnapshots

log = logging.getLogger("rnnserve.server")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
STOP_SETTLE_S = 0.5  # after the freeze: time for calls to write their last answers
QUIET_WAIT_S = 5.0  # after the gRPC stop: most time for cancelled work to leave the workers


class BindError(RuntimeError):
    """The server's address cannot be bound (in use, or not an address of this machine)."""


class RnnserveServer:
    """A grpc.aio server with rnnserve's runtime; start(), stop(grace), wait_for_termination().

    The optional parts (`watcher`, `snapshots`, `metrics_endpoint`, `health_server`) are set by
    build_server before start(); start and stop run them.
    """

    def __init__(
        self,
        settings: ServerSettings,
        runtime: Runtime,
        grpc_server: grpc.aio.Server,
        health_servicer: HealthServicer,
        calls: CallTracker,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.calls = calls
        self.watcher: RepositoryWatcher | None = None
        self.snapshots: SessionSnapshots | None = None
        self.metrics_endpoint: MetricsServer | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0  # bound port of health_server
        self.kserve = KServeFrontend(runtime)  # the KServe v2 rules, shared by the gRPC and HTTP doors
        self.http_frontend: HttpFrontend | None = None
        self.snapshot_saved = True  # False when the shutdown snapshot could not be written
        self._serving = False
        self._stopping = False
        self._known_names: set[str] = set()
        self._reload_task: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._trim_task: asyncio.Task[None] | None = None

    def health_names(self) -> list[str]:
        """Health service names: overall (""), the Inference service and every model name."""
        return ["", INFERENCE_SERVICE, *self.runtime.registry.names()]

    async def update_health(self) -> None:
        """Set every health status from the registry and whether the server is serving."""
        registry = self.runtime.registry
        statuses = health_pb2.HealthCheckResponse
        names = registry.names()
        open_names = [name for name in names if registry.latest(name) is not None]
        overall = statuses.SERVING if self._serving and open_names else statuses.NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(INFERENCE_SERVICE, overall)
        for name in sorted(self._known_names | set(names)):
            serving = self._serving and name in open_names
            await self.health.set(name, statuses.SERVING if serving else statuses.NOT_SERVING)
        self._known_names |= set(names)

    async def set_serving(self, serving: bool) -> None:
        self._serving = serving
        await self.update_health()

    async def start(self) -> None:
        """Start the models, restore saved sessions, then take calls and report SERVING."""
        self.runtime.start()
        if self.snapshots is not None:
            self.snapshots.prepare()
            await self.snapshots.restore()
        recovery = self.runtime.recovery
        if recovery is not None:
            await recovery.start()
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http_frontend is not None:
            await self.http_frontend.start()
        await self.set_serving(True)
        loop = asyncio.get_running_loop()
        if self.watcher is not None:
            self._reload_task = loop.create_task(self.watcher.run(), name="rnnserve-hot-reload")
        if self.snapshots is not None and self.settings.snapshot_interval_s > 0:
            periodic = self.snapshots.run_periodic(self.settings.snapshot_interval_s)
            self._snapshot_task = loop.create_task(periodic, name="rnnserve-snapshots")
        if self.settings.heap_trim_interval_s > 0:
            trimmer = HeapTrimmer(self.settings.heap_trim_interval_s)
            self._trim_task = loop.create_task(trimmer.run(), name="rnnserve-heap-trim")

    async def stop(self, grace: float | None = None) -> None:
        """Shut down gracefully (see the module docstring); `grace` None: --grace-period-s."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.grace_period_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.runtime.draining = True
        await self.set_serving(False)
        if self._reload_task is not None:
            self._reload_task.cancel()  # a version being loaded is dropped
            await _finished(self._reload_task)
        if self.snapshots is not None and self._snapshot_task is not None:
            self.snapshots.stop_periodic()  # a save in progress finishes first
            await _finished(self._snapshot_task)
        if self._trim_task is not None:
            self._trim_task.cancel()
            await _finished(self._trim_task)
        if self.calls.in_flight:
            log.info("draining: %d calls in flight have %g s to finish", self.calls.in_flight, grace)
        if not await self.calls.wait_idle(max(0.0, deadline - time.monotonic())):
            log.info(
                "grace period over: %d calls still open; requests from now on are refused with UNAVAILABLE",
                self.calls.in_flight,
            )
        self.runtime.sessions.freeze()
        if self.http_frontend is not None:
            await asyncio.gather(self.grpc_server.stop(min(STOP_SETTLE_S, grace)), self.http_frontend.stop())
        else:
            await self.grpc_server.stop(min(STOP_SETTLE_S, grace))
        await self._wait_quiet()
        if self.snapshots is not None:
            self.snapshot_saved = await self.snapshots.save() is not None
        recovery = self.runtime.recovery
        if recovery is not None:
            await recovery.save_all()  # the sessions resume on the other replicas
        await self.runtime.stop()
        if recovery is not None:
            await recovery.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def _wait_quiet(self) -> None:
        """Wait until no session has a request in flight (cancelled work leaves at the next batch)."""
        deadline = time.monotonic() + QUIET_WAIT_S
        while self.runtime.sessions.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.runtime.sessions.busy:
            log.error("%d sessions still busy after the gRPC server stopped", self.runtime.sessions.busy)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def _finished(task: asyncio.Task[None]) -> None:
    """Wait for a background task to end; log how it failed, if it did (nothing else awaits it)."""
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.receive_message_bytes),
        ("grpc.max_send_message_length", -1),
        # Two servers on one port would split traffic silently; fail to bind instead.
        ("grpc.so_reuseport", 0),
    ]


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise BindError(f"cannot listen on {address}: {error}") from None


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
    session ownership, `interceptors` wrap every RPC (auth, request metrics) inside the request
    ids and call tracking every server has, and `credentials` serve TLS instead of plaintext.
    Raises BindError when the address cannot be bound.
    """
    if registry is None:
        registry = load_repository(settings, observer)
    runtime = Runtime(settings, registry)
    runtime.recovery = recovery_for(settings, runtime.sessions, runtime.observer)
    calls = CallTracker(settings.log_requests)
    grpc_server = grpc.aio.server(options=server_options(settings), interceptors=[calls, *interceptors])
    add_inference_servicer(InferenceServicer(LocalEngine(runtime), identity, settings), grpc_server)
    health_servicer = HealthServicer(settings.max_health_watches_per_peer)
    add_health_servicer(health_servicer, grpc_server)
    enable_reflection((INFERENCE_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME), grpc_server)
    server = RnnserveServer(settings, runtime, grpc_server, health_servicer, calls)
    add_kserve_servicer(KServeServicer(server.kserve, identity), grpc_server)
    await server.update_health()  # NOT_SERVING until start()
    port = _bind(grpc_server, settings.address, credentials)
    return server, port


def attach_http(
    server: RnnserveServer,
    host: str,
    port: int,
    tokens: TokenTable | None = None,
    tls: HttpTls | None = None,
) -> int:
    """Bind the HTTP front end (KServe v2 REST, generate, playground) on host:port, before
    `server.start()`; port 0 picks a free one; `tls` serves HTTPS. Returns the bound port; raises
    BindError."""
    app = HttpApi(server.kserve, tokens).app()
    try:
        server.http_frontend = HttpFrontend(app, host, port, tls)
    except HttpBindError as error:
        raise BindError(str(error)) from None
    return server.http_frontend.port


async def build_server(
    settings: ServerSettings,
    registry: ModelRegistry,
    *,
    metrics: MetricsObserver | None = None,
    metrics_port: int | None = None,
    state_on_device: bool | None = None,
) -> tuple[RnnserveServer, int]:
    """The server `rnnserve serve` runs: create_server plus metrics, auth, TLS, health port, hot
    reload and snapshots, as the settings say. Returns (server, port); call `await server.start()`.

    Metrics are served when `metrics` is given (the observer the registry was loaded with): on
    settings.metrics_port (0 there: no endpoint), or on `metrics_port` when given (0: a free
    port; see `server.metrics_endpoint.port`). Raises BindError (an address cannot be bound) and
    SecurityConfigError (a token or TLS file cannot be used).
    """
    tokens = load_tokens(settings)
    credentials = server_credentials(settings)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:
        interceptors.append(metrics.interceptor())
    identity: Identity = no_identity
    auth = None
    if tokens is not None:
        auth = AuthInterceptor(tokens)
        interceptors.append(auth)
        identity = auth.identity
    server, port = await create_server(
        settings, registry, identity=identity, interceptors=interceptors, credentials=credentials
    )
    if tokens is not None:
        server.calls.caller = lambda context: tokens.identify_metadata(context.invocation_metadata())
    server.watcher = RepositoryWatcher(settings, registry, server.update_health, state_on_device)
    if settings.state_snapshot is not None:
        server.snapshots = SessionSnapshots(settings.state_snapshot, server.runtime, state_on_device)
    port_for_metrics = settings.metrics_port if metrics_port is None else metrics_port
    if metrics is not None and (metrics_port is not None or settings.metrics_port):
        register_runtime_metrics(metrics.registry, server.runtime)
        try:
            server.metrics_endpoint = start_metrics_server(
                metrics.registry,
                settings.metrics_bind_host,
                port_for_metrics,
                tls=metrics_tls_context(settings),
                accepts_token=None if tokens is None else lambda token: tokens.identify(token) is not None,
            )
        except MetricsBindError as error:
            raise BindError(str(error)) from None
    if settings.health_port:
        health_server = grpc.aio.server()
        add_health_servicer(server.health, health_server)
        server.health_port = _bind(health_server, settings.health_address, None)
        server.health_server = health_server
    if settings.http_port:  # bound last: nothing after it can fail and leave its socket open
        attach_http(server, settings.http_bind_host, settings.http_port, tokens, HttpTls.of(settings))
    return server, port


def _describe(settings: ServerSettings, server: RnnserveServer, port: int) -> str:
    names = ", ".join(server.runtime.registry.names()) or "no model yet"
    transport = "plaintext"
    if settings.tls:
        transport = "mutual TLS" if settings.tls_client_ca else "TLS"
    parts = [
        f"serving {names} on {join_host_port(settings.host, port)} "
        f"(max_batch_size {settings.max_batch_size}, device {settings.device})",
        transport,
        "bearer tokens required" if settings.auth else "no authentication",
    ]
    if server.metrics_endpoint is not None:
        parts.append(f"metrics on {server.metrics_endpoint.url}")
    if server.http_frontend is not None:
        parts.append(f"HTTP (KServe v2, generate, playground) on {server.http_frontend.url}")
    if server.health_server is not None:
        parts.append(f"plaintext health on {join_host_port(settings.host, server.health_port)}")
    return "; ".join(parts)


async def serve(settings: ServerSettings, registry: ModelRegistry, metrics: MetricsObserver | None) -> int:
    """Serve until SIGINT or SIGTERM, then stop gracefully. Returns the exit status: 0, or 1 when
    the shutdown snapshot could not be saved."""
    server, port = await build_server(settings, registry, metrics=metrics)
    await server.start()
    log.info("%s", _describe(settings, server, port))
    if len(registry) == 0:
        log.warning(
            "the repository %s has no servable model yet: health is NOT_SERVING until one is "
            "exported into it (%s)",
            settings.repository,
            f"looked for every {settings.reload_interval_s:g} s and on SIGHUP"
            if settings.reload_interval_s
            else "looked for on SIGHUP",
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    watcher = server.watcher
    if watcher is not None:
        loop.add_signal_handler(signal.SIGHUP, watcher.trigger)
    await stopping.wait()
    log.info("stopping: health is NOT_SERVING and new sessions are refused")
    await server.stop(settings.grace_period_s)
    log.info("stopped")
    return 0 if server.snapshot_saved else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if settings.frontends > 0:
        from serving.frontend.supervisor import supervise

        return supervise(settings, args)
    try:
        load_tokens(settings)  # checked before the (slow) model loading
        server_credentials(settings)
        metrics_tls_context(settings)
        providers = resolve_providers(settings.device)  # fails here when CUDA is asked for and absent
        log.info("onnxruntime providers for --device %s: %s", settings.device, providers)
        metrics = MetricsObserver()
        registry = load_repository(settings, metrics, allow_empty=True)
    except (SecurityConfigError, RepositoryError, EngineError) as error:
        log.error("%s", error)
        return 2
    try:
        return asyncio.run(serve(settings, registry, metrics))
    except BindError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
