"""Prometheus metrics: a ServerObserver that records them, a gRPC interceptor, and /metrics over HTTP.

    metrics = MetricsObserver()                       # its own CollectorRegistry
    registry = load_repository(settings, metrics)     # batch, session and model hooks
    server, port = await create_server(settings, registry, observer=metrics,
                                       interceptors=[metrics.interceptor()])
    endpoint = start_metrics_server(metrics.registry, host, metrics_port)
    ...
    endpoint.close()

Each observer has its own registry (never prometheus_client's global one), so tests and several
servers in one process do not collide. Hooks are cheap on the hot path: a batch's statistics
are added under one lock (serving.ops.metrics_batches; about 15 µs for a 64-row batch, against 130
µs with prometheus_client's Histogram), other label children are bound once per model or RPC
and cached, and no label carries per-request values (session ids, tokens, paths). Every hook is
thread-safe, so batch hooks may run on the models' worker threads.

gRPC metrics, from RequestMetricsInterceptor, under the names and labels go-grpc-prometheus and
py-grpc-prometheus use, so that existing dashboards and alerts work unchanged (calls in flight
are started minus handled):
    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method} (histogram; a stream's
        seconds span the whole call)
    grpc_server_msg_received_total{grpc_type,grpc_service,grpc_method}
    grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}
grpc_type is unary, client_stream, server_stream or bidi_stream.

Domain metrics (all prefixed rnnserve_):
    tokens_in_total{model}, tokens_out_total{model}
    sessions_active{model,version}, sessions_opened_total{model},
    sessions_ended_total{model,reason} (closed, expired, evicted), sessions_restored_total{model,source}
    batch_size{model} (rows), batch_tokens_total{model}, batch_padded_tokens_total{model},
    batch_failures_total{model}, queue_wait_seconds{model}, batch_compute_seconds{model}
    model_loads_total{model}, model_reloads_total{model}, model_unloads_total{model},
    model_refusals_total, model_info{model,version,provider,providers}
    state_store_operations_total{operation,outcome}, state_store_seconds{operation}, state_store_up
    snapshot_writes_total{outcome}, snapshot_sessions, snapshot_size_bytes, snapshot_seconds,
    snapshot_last_success_timestamp_seconds
plus the process_*, python_gc_* and python_info collectors.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from serving.core.observers import ServerObserver
from serving.ops.interceptor import CallInterceptor
from serving.ops.metrics_batches import BatchMetrics

PREFIX = "rnnserve"
# fmt: off
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# From 100 µs (a small batch on a fast CPU) to seconds (a deep queue or a huge prompt piece).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)
# A whole call: a unary Step takes milliseconds, a Stream or a long Generate minutes.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# fmt: on
UNKNOWN_METHOD = ("unknown", "unknown")  # labels of calls to methods the server does not have
UNKNOWN_TYPE = "unknown"  # a method the server does not have: its kind is unknown too


@dataclass(frozen=True)
class _ModelSeries:
    """One model's label children, bound once (labels() costs a lock and a dict lookup per call)."""

    tokens_in: Any
    tokens_out: Any
    batch_failures: Any
    sessions_opened: Any


@dataclass(frozen=True)
class _RpcSeries:
    """One RPC's label children, bound once."""

    started: Any
    seconds: Any
    received: Any  # request messages the handler took
    sent: Any  # response messages the handler gave
    handled: Counter  # the parent; its children by code are cached in `codes`
    labels: tuple[str, str, str]  # grpc_type, grpc_service, grpc_method
    codes: dict[grpc.StatusCode, Any] = field(default_factory=dict)

    def begin(self) -> float:
        self.started.inc()
        return time.perf_counter()

    def finish(self, code: grpc.StatusCode, started: float) -> None:
        self.seconds.observe(time.perf_counter() - started)
        child = self.codes.get(code)
        if child is None:
            child = self.codes[code] = self.handled.labels(*self.labels, code.name)
        child.inc()


class MetricsObserver(ServerObserver):
    """Records the server's hooks as Prometheus metrics in `self.registry`.

    It overrides ServerObserver's hooks, and has the request counters fed by `interceptor()`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._models: dict[str, _ModelSeries] = {}
        self._rpcs: dict[tuple[str, str], _RpcSeries] = {}
        self._loaded: dict[str, set[int]] = {}  # model -> loaded versions (reload detection)
        self._providers: dict[tuple[str, int], tuple[str, str]] = {}  # (model, version) -> labels

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=self.registry, buckets=buckets)

        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpcs_started = Counter(
            "grpc_server_started_total", "RPCs started on the server", rpc, registry=self.registry
        )
        self.rpcs_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure",
            (*rpc, "grpc_code"),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server (a stream's spans the whole call)",
            rpc,
            registry=self.registry,
            buckets=REQUEST_BUCKETS,
        )
        self.rpc_received = Counter(
            "grpc_server_msg_received_total",
            "RPC stream messages received on the server",
            rpc,
            registry=self.registry,
        )
        self.rpc_sent = Counter(
            "grpc_server_msg_sent_total",
            "gRPC stream messages sent by the server",
            rpc,
            registry=self.registry,
        )
        self.tokens_in = counter(
            "tokens_in", "Tokens consumed by the model (chunks, steps, prompts)", ("model",)
        )
        self.tokens_out = counter("tokens_out", "Tokens generated or sampled", ("model",))
        self.sessions_active = gauge("sessions_active", "Open sessions", ("model", "version"))
        self.sessions_opened = counter("sessions_opened", "Sessions opened", ("model",))
        self.sessions_ended = counter(
            "sessions_ended", "Sessions ended, by reason (closed, expired, evicted)", ("model", "reason")
        )
        self.sessions_restored = counter(
            "sessions_restored", "Sessions restored from saved state, by source", ("model", "source")
        )
        # batch_size, batch_compute_seconds, queue_wait_seconds, batch_(padded_)tokens_total:
        # aggregated under one lock per batch (serving.ops.metrics_batches), for the worker threads.
        self.batches = BatchMetrics(PREFIX, BATCH_SIZE_BUCKETS, LATENCY_BUCKETS)
        self.registry.register(self.batches)
        self.batch_failures = counter("batch_failures", "onnxruntime runs that raised", ("model",))
        self.model_loads = counter("model_loads", "Model versions loaded (reloads included)", ("model",))
        self.model_reloads = counter(
            "model_reloads", "Model versions loaded while another version of the model was loaded", ("model",)
        )
        self.model_unloads = counter("model_unloads", "Retired model versions unloaded", ("model",))
        self.model_refusals = counter("model_refusals", "Versions in the repository refused (see the logs)")
        self.model_info = gauge(
            "model_info",
            "1 per loaded model version: provider runs it, providers lists onnxruntime's order",
            ("model", "version", "provider", "providers"),
        )
        self.store_operations = counter(
            "state_store_operations",
            "Session state store calls by outcome (ok, miss, corrupt, failed, skipped)",
            ("operation", "outcome"),
        )
        self.store_seconds = histogram(
            "state_store_seconds", "State store call duration", ("operation",), STORE_BUCKETS
        )
        # Registered by the first state_store_availability call, so a server without a store
        # exports no misleading 0.
        self.store_up: Gauge | None = None
        self.snapshot_writes = counter(
            "snapshot_writes", "Session snapshot writes by outcome (ok, failed)", ("outcome",)
        )
        self.snapshot_sessions = gauge("snapshot_sessions", "Sessions in the last snapshot written")
        self.snapshot_size = gauge("snapshot_size_bytes", "Size of the last snapshot written")
        self.snapshot_seconds = gauge("snapshot_seconds", "Time the last snapshot write took")
        self.snapshot_last_success = gauge(
            "snapshot_last_success_timestamp_seconds", "Wall-clock time of the last snapshot written"
        )

    # ----- cached label children -----------------------------------------------------------

    def _model(self, model: str) -> _ModelSeries:
        series = self._models.get(model)
        if series is None:
            with self._lock:
                series = self._models.get(model)
                if series is None:
                    series = _ModelSeries(
                        tokens_in=self.tokens_in.labels(model),
                        tokens_out=self.tokens_out.labels(model),
                        batch_failures=self.batch_failures.labels(model),
                        sessions_opened=self.sessions_opened.labels(model),
                    )
                    self._models[model] = series
        return series

    def rpc(self, full_method: str | None, grpc_type: str = UNKNOWN_TYPE) -> _RpcSeries:
        """The series of one RPC ("/package.Service/Method") of a kind (a value of
        serving.ops.interceptor.CALL_TYPES); None: a method the server lacks."""
        key = (full_method or "", grpc_type)
        series = self._rpcs.get(key)
        if series is None:
            labels = (grpc_type, *_split_method(full_method))
            with self._lock:
                series = self._rpcs.get(key)
                if series is None:
                    series = _RpcSeries(
                        started=self.rpcs_started.labels(*labels),
                        seconds=self.rpc_seconds.labels(*labels),
                        received=self.rpc_received.labels(*labels),
                        sent=self.rpc_sent.labels(*labels),
                        handled=self.rpcs_handled,
                        labels=labels,
                    )
                    self._rpcs[key] = series
        return series

    def interceptor(self) -> RequestMetricsInterceptor:
        """A grpc.aio server interceptor feeding the grpc_server_* metrics of this observer."""
        return RequestMetricsInterceptor(self)

    # ----- ServerObserver hooks: worker threads ---------------------------------------------

    def batch_completed(
        self,
        model: str,
        version: int,
        rows: int,
        tokens: int,
        padded_tokens: int,
        queue_waits_s: Sequence[float],
        compute_s: float,
    ) -> None:
        self.batches.record(model, rows, tokens, padded_tokens, queue_waits_s, compute_s)

    def batch_failed(self, model: str, version: int, rows: int) -> None:
        self._model(model).batch_failures.inc()

    # ----- ServerObserver hooks: event loop --------------------------------------------------

    def session_opened(self, model: str, version: int) -> None:
        self._model(model).sessions_opened.inc()
        self.sessions_active.labels(model, str(version)).inc()

    def session_ended(self, model: str, version: int, reason: str) -> None:
        self.sessions_active.labels(model, str(version)).dec()
        self.sessions_ended.labels(model, reason).inc()

    def session_restored(self, model: str, version: int, source: str) -> None:
        """A session was brought back from saved state: source "snapshot" or "store" (Redis).

        Call it besides session_opened, which counts the session as open."""
        self.sessions_restored.labels(model, source).inc()

    def tokens_processed(self, model: str, version: int, tokens_in: int, tokens_out: int) -> None:
        series = self._model(model)
        if tokens_in:
            series.tokens_in.inc(tokens_in)
        if tokens_out:
            series.tokens_out.inc(tokens_out)

    def model_loaded(self, model: str, version: int, providers: Sequence[str]) -> None:
        with self._lock:
            loaded = self._loaded.setdefault(model, set())
            reload = bool(loaded - {version})
            loaded.add(version)
            labels = (providers[0] if providers else "none", ",".join(providers))
            self._providers[(model, version)] = labels
        self.model_loads.labels(model).inc()
        if reload:
            self.model_reloads.labels(model).inc()
        self.model_info.labels(model, str(version), *labels).set(1)
        self.sessions_active.labels(model, str(version)).set(0)

    def model_refused(self, path: str, reason: str) -> None:
        self.model_refusals.inc()

    def model_unloaded(self, model: str, version: int) -> None:
        with self._lock:
            self._loaded.get(model, set()).discard(version)
            labels = self._providers.pop((model, version), None)
        self.model_unloads.labels(model).inc()
        # Drop the version's series: versions come and go with hot reloads.
        if labels is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(model, str(version), *labels)
        with contextlib.suppress(KeyError):
            self.sessions_active.remove(model, str(version))

    # ----- persistence hooks -----------------------------------------------------------------

    def state_store_operation(self, operation: str, outcome: str, seconds: float) -> None:
        self.store_operations.labels(operation, outcome).inc()
        if outcome != "skipped":
            self.store_seconds.labels(operation).observe(seconds)

    def state_store_availability(self, available: bool) -> None:
        if self.store_up is None:
            with self._lock:
                if self.store_up is None:
                    self.store_up = Gauge(
                        f"{PREFIX}_state_store_up",
                        "1 while the session state store answers, 0 from a failure until it answers again",
                        registry=self.registry,
                    )
        self.store_up.set(1 if available else 0)

    def snapshot_written(self, path: str, sessions: int, size_bytes: int, seconds: float) -> None:
        self.snapshot_writes.labels("ok").inc()
        self.snapshot_sessions.set(sessions)
        self.snapshot_size.set(size_bytes)
        self.snapshot_seconds.set(seconds)
        self.snapshot_last_success.set(time.time())

    def snapshot_failed(self, path: str, reason: str) -> None:
        self.snapshot_writes.labels("failed").inc()


def _split_method(full_method: str | None) -> tuple[str, str]:
    """("/rnnserve.v1.Inference/Step") -> ("rnnserve.v1.Inference", "Step")."""
    if not full_method:
        return UNKNOWN_METHOD
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service, method) if service and method else UNKNOWN_METHOD


# ----- requests by RPC and status: a grpc.aio server interceptor --------------------------------


class RequestMetricsInterceptor(CallInterceptor):
    """Counts every call by service, method and final status code, with its duration.

    Only methods the server has get their own labels; calls to any other method are counted
    under grpc_service="unknown", grpc_method="unknown", grpc_type="unknown" (code
    UNIMPLEMENTED), so clients cannot create series at will.
    """

    def __init__(self, metrics: MetricsObserver) -> None:
        self.metrics = metrics

    counts_messages = True

    def unimplemented(self, method: str) -> None:
        series = self.metrics.rpc(None)
        series.finish(grpc.StatusCode.UNIMPLEMENTED, series.begin())

    def begin(self, context: Any, method: str, metadata: Any, call_type: str) -> tuple[_RpcSeries, float]:
        series = self.metrics.rpc(method, call_type)
        return series, series.begin()

    def received(self, token: tuple[_RpcSeries, float]) -> None:
        token[0].received.inc()

    def sent(self, token: tuple[_RpcSeries, float]) -> None:
        token[0].sent.inc()

    def end(self, context: Any, method: str, token: tuple[_RpcSeries, float], code: grpc.StatusCode) -> None:
        series, started = token
        series.finish(code, started)


# ----- /metrics over HTTP ------------------------------------------------------------------------


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsBindError(RuntimeError):
    """The metrics address cannot be bound (in use, or not an address of this machine)."""


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (a TLS handshake, a request line) frees its thread

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: a scrape every few seconds would flood the server's stderr."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the process's exit


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def _bearer_guard(app: WSGIApp, accepts: Callable[[str], bool]) -> WSGIApp:
    """`app` behind `Authorization: Bearer TOKEN`: 401 unless `accepts(TOKEN)`."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header[:7].lower() == "bearer " and accepts(header[7:].strip()):
            return app(environ, start_response)
        body = b"/metrics needs 'Authorization: Bearer TOKEN' with one of the server's tokens\n"
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", 'Bearer realm="rnnserve metrics"'),
            ],
        )
        return [body]

    return guarded


class MetricsServer:
    """/metrics (Prometheus text format, any path) served from a background thread.

    `close()` stops it and frees the port; also a context manager.
    """

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, tls: bool = False) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        self.tls = tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()  # returns once serve_forever's loop has exited
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def start_metrics_server(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: ssl.SSLContext | None = None,
    accepts_token: Callable[[str], bool] | None = None,
) -> MetricsServer:
    """Serve `registry` at http://HOST:PORT/metrics; port 0 picks a free port (see `.port`).

    `tls`: serve HTTPS with this server-side context (the gRPC server's certificate). With
    `accepts_token`, a scrape needs `Authorization: Bearer TOKEN` that it accepts (else 401).
    Raises MetricsBindError when the address cannot be bound.
    """
    server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
    app: WSGIApp = make_wsgi_app(registry)
    if accepts_token is not None:
        app = _bearer_guard(app, accepts_token)
    try:
        httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    except OSError as error:
        raise MetricsBindError(f"cannot serve metrics on {host}:{port}: {error}") from None
    if tls is not None:
        # The handshake runs on the request's own thread (at its first read), so a client that
        # connects and never completes it holds that thread only, not the accept loop.
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    # A short poll interval, so close() returns within 0.1 s rather than serve_forever's 0.5 s.
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.1},
        name=f"metrics-http-{httpd.server_port}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(httpd, thread, tls=tls is not None)
