"""Prometheus metrics: hook values, /metrics over HTTP, the request interceptor on a real grpc.aio
server, and a real rnnserve server whose metrics change as requests run."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from serving.ops.metrics import LATENCY_BUCKETS, MetricsBindError, MetricsObserver, start_metrics_server

SERVICE = "test.Echo"


def value(metrics: MetricsObserver, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# ----- hooks -----------------------------------------------------------------------------------------


def test_batch_and_token_hooks() -> None:
    metrics = MetricsObserver()
    metrics.batch_completed(
        "m", 1, rows=3, tokens=7, padded_tokens=9, queue_waits_s=[0.001, 0.002], compute_s=0.004
    )
    metrics.batch_completed("m", 1, rows=1, tokens=1, padded_tokens=1, queue_waits_s=[], compute_s=0.002)
    metrics.batch_failed("m", 1, rows=2)
    metrics.tokens_processed("m", 1, tokens_in=7, tokens_out=0)
    metrics.tokens_processed("m", 1, tokens_in=1, tokens_out=5)
    assert value(metrics, "rnnserve_batch_size_count", model="m") == 2
    assert value(metrics, "rnnserve_batch_size_sum", model="m") == 4
    assert value(metrics, "rnnserve_batch_size_bucket", model="m", le="1.0") == 1
    assert value(metrics, "rnnserve_batch_size_bucket", model="m", le="4.0") == 2
    assert value(metrics, "rnnserve_batch_tokens_total", model="m") == 8
    assert value(metrics, "rnnserve_batch_padded_tokens_total", model="m") == 10
    assert value(metrics, "rnnserve_queue_wait_seconds_count", model="m") == 2
    assert value(metrics, "rnnserve_queue_wait_seconds_sum", model="m") == pytest.approx(0.003)
    assert value(metrics, "rnnserve_batch_compute_seconds_count", model="m") == 2
    assert value(metrics, "rnnserve_batch_failures_total", model="m") == 1
    assert value(metrics, "rnnserve_tokens_in_total", model="m") == 8
    assert value(metrics, "rnnserve_tokens_out_total", model="m") == 5


def test_batch_histograms_are_exposed_exactly_like_prometheus_clients() -> None:
    waits = [0.0001, 0.00025, 0.0003, 0.001, 0.7, 5.0, 10.0]  # on bounds, between them, past the last
    metrics = MetricsObserver(process_metrics=False)
    metrics.batch_completed("m", 1, rows=7, tokens=7, padded_tokens=7, queue_waits_s=waits, compute_s=0.002)
    reference = CollectorRegistry()
    histogram = Histogram(
        "rnnserve_queue_wait_seconds", "", ["model"], registry=reference, buckets=LATENCY_BUCKETS
    )
    for wait in waits:
        histogram.labels("m").observe(wait)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            if family.name == "rnnserve_queue_wait_seconds"
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    assert samples(metrics.registry) == samples(reference)


def test_batch_hooks_from_many_threads_lose_nothing() -> None:
    metrics = MetricsObserver(process_metrics=False)

    def run() -> None:
        for _ in range(500):
            metrics.batch_completed("m", 1, 2, 3, 4, [0.001, 0.002], 0.001)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert value(metrics, "rnnserve_batch_size_count", model="m") == 2000
    assert value(metrics, "rnnserve_queue_wait_seconds_count", model="m") == 4000
    assert value(metrics, "rnnserve_batch_padded_tokens_total", model="m") == 8000


def test_session_hooks() -> None:
    metrics = MetricsObserver()
    for _ in range(4):
        metrics.session_opened("m", 2)
    metrics.session_ended("m", 2, "closed")
    metrics.session_ended("m", 2, "expired")
    metrics.session_ended("m", 2, "evicted")
    metrics.session_restored("m", 2, "store")
    assert value(metrics, "rnnserve_sessions_active", model="m", version="2") == 1
    assert value(metrics, "rnnserve_sessions_opened_total", model="m") == 4
    for reason in ("closed", "expired", "evicted"):
        assert value(metrics, "rnnserve_sessions_ended_total", model="m", reason=reason) == 1
    assert value(metrics, "rnnserve_sessions_restored_total", model="m", source="store") == 1


def test_model_hooks_count_loads_reloads_and_drop_unloaded_series() -> None:
    metrics = MetricsObserver()
    cpu = ["CPUExecutionProvider"]
    metrics.model_loaded("m", 1, cpu)
    metrics.model_loaded("other", 1, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    metrics.model_loaded("m", 2, cpu)  # hot reload: version 1 is still loaded
    metrics.model_refused("/repo/m/3", "model.onnx is truncated")
    assert value(metrics, "rnnserve_model_loads_total", model="m") == 2
    assert value(metrics, "rnnserve_model_reloads_total", model="m") == 1
    assert value(metrics, "rnnserve_model_reloads_total", model="other") is None
    assert value(metrics, "rnnserve_model_refusals_total") == 1
    info = {"providers": "CUDAExecutionProvider,CPUExecutionProvider", "provider": "CUDAExecutionProvider"}
    assert value(metrics, "rnnserve_model_info", model="other", version="1", **info) == 1
    assert value(metrics, "rnnserve_sessions_active", model="m", version="2") == 0  # present from load on

    metrics.model_unloaded("m", 1)
    assert value(metrics, "rnnserve_model_unloads_total", model="m") == 1
    cpu_info = {"provider": "CPUExecutionProvider", "providers": "CPUExecutionProvider"}
    assert value(metrics, "rnnserve_model_info", model="m", version="1", **cpu_info) is None
    assert value(metrics, "rnnserve_sessions_active", model="m", version="1") is None
    assert value(metrics, "rnnserve_model_info", model="m", version="2", **cpu_info) == 1
    metrics.model_unloaded("m", 2)
    metrics.model_loaded("m", 3, cpu)  # nothing of m is loaded: a load, not a reload
    assert value(metrics, "rnnserve_model_reloads_total", model="m") == 1


def test_persistence_hooks() -> None:
    metrics = MetricsObserver()
    assert value(metrics, "rnnserve_state_store_up") is None  # no store: no gauge claiming it is down
    metrics.state_store_operation("save", "ok", 0.001)
    metrics.state_store_operation("save", "failed", 0.25)
    metrics.state_store_operation("save", "skipped", 0.0)
    metrics.state_store_operation("load", "miss", 0.0005)
    metrics.state_store_availability(False)
    assert value(metrics, "rnnserve_state_store_operations_total", operation="save", outcome="ok") == 1
    assert value(metrics, "rnnserve_state_store_operations_total", operation="save", outcome="skipped") == 1
    assert (
        value(metrics, "rnnserve_state_store_seconds_count", operation="save") == 2
    )  # skipped calls take no time
    assert value(metrics, "rnnserve_state_store_up") == 0
    metrics.state_store_availability(True)
    assert value(metrics, "rnnserve_state_store_up") == 1

    metrics.snapshot_written("/data/snap", sessions=12, size_bytes=4096, seconds=0.02)
    metrics.snapshot_failed("/data/snap", "the disk is full")
    assert value(metrics, "rnnserve_snapshot_writes_total", outcome="ok") == 1
    assert value(metrics, "rnnserve_snapshot_writes_total", outcome="failed") == 1
    assert value(metrics, "rnnserve_snapshot_sessions") == 12
    assert value(metrics, "rnnserve_snapshot_size_bytes") == 4096
    assert (value(metrics, "rnnserve_snapshot_last_success_timestamp_seconds") or 0) > 1.6e9


def test_observers_have_separate_registries() -> None:
    first, second = MetricsObserver(), MetricsObserver(process_metrics=False)
    first.tokens_processed("m", 1, 5, 0)
    assert value(first, "rnnserve_tokens_in_total", model="m") == 5
    assert value(second, "rnnserve_tokens_in_total", model="m") is None
    assert value(first, "process_resident_memory_bytes") is not None
    assert value(second, "process_resident_memory_bytes") is None
    shared = CollectorRegistry()
    MetricsObserver(shared, process_metrics=False)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        MetricsObserver(shared, process_metrics=False)  # one observer per registry


# ----- /metrics over HTTP ------------------------------------------------------------------------


def test_metrics_are_scraped_over_http_and_servers_stop_cleanly() -> None:
    metrics = MetricsObserver()
    for _ in range(3):  # start and stop several, as tests and restarts do
        with start_metrics_server(metrics.registry, "127.0.0.1", 0) as endpoint:
            assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
            metrics.tokens_processed("m", 1, 4, 1)
            samples = scrape(endpoint.url)
            tokens = samples[("rnnserve_tokens_in_total", (("model", "m"),))]
            metrics.tokens_processed("m", 1, 6, 0)
            assert scrape(endpoint.url)[("rnnserve_tokens_in_total", (("model", "m"),))] == tokens + 6
            assert samples[("process_resident_memory_bytes", ())] > 0
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", endpoint.port), timeout=1):
            pass  # the port is closed once the server stopped


def test_a_busy_metrics_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_metrics_server(CollectorRegistry(), "127.0.0.1", port)


# ----- the request interceptor --------------------------------------------------------------------


class EchoHandlers:
    """A tiny service over raw bytes: every kind of RPC, and ways to end each."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        if request == b"raise":
            raise ValueError("a bug")
        if request == b"set-code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("nothing here")
            return b""
        if request == b"wait":
            await self.release.wait()
        return request

    async def server_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for index in range(3):
            if request == b"abort" and index == 1:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too much")
            if request == b"wait" and index == 1:
                await self.release.wait()
            yield bytes([index])

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def client_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"".join([request async for request in requests])

    async def write_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        # A coroutine behind a streaming response writes with context.write (as health's Watch).
        await context.write(b"1")
        await context.write(b"2")

    def sync_unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        if request == b"set-code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        return request

    def sync_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        # (No abort case: grpc.aio itself hangs the call when a synchronous streaming handler aborts
        # after yielding, with or without interceptors; rnnserve's handlers are all asynchronous.)
        if request == b"set-code":
            context.set_code(grpc.StatusCode.OUT_OF_RANGE)
        yield b"x"
        yield b"y"

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "WriteStream": grpc.unary_stream_rpc_method_handler(self.write_stream),
                "SyncUnary": grpc.unary_unary_rpc_method_handler(self.sync_unary),
                "SyncStream": grpc.unary_stream_rpc_method_handler(self.sync_stream),
            },
        )


async def eventually(check: Any, timeout: float = 5.0) -> None:
    """Wait until check() is true (a call's end is counted when its handler has finished)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out waiting for the metric"
        await asyncio.sleep(0.01)


GRPC_TYPES = {
    "Unary": "unary",
    "ServerStream": "server_stream",
    "Bidi": "bidi_stream",
    "ClientStream": "client_stream",
    "WriteStream": "server_stream",
    "SyncUnary": "unary",
    "SyncStream": "server_stream",
}


def test_interceptor_counts_calls_by_method_and_status() -> None:
    metrics = MetricsObserver(process_metrics=False)

    def rpc(method: str) -> dict[str, str]:
        return {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": GRPC_TYPES[method]}

    def handled(method: str, code: str) -> float:
        return value(metrics, "grpc_server_handled_total", **rpc(method), grpc_code=code) or 0

    def in_flight(method: str) -> float:
        """Started minus handled, as dashboards built on go-grpc-prometheus compute it."""
        started = value(metrics, "grpc_server_started_total", **rpc(method)) or 0
        codes = [code.name for code in grpc.StatusCode]
        return started - sum(handled(method, code) for code in codes)

    def messages(method: str) -> tuple[float, float]:
        received = value(metrics, "grpc_server_msg_received_total", **rpc(method)) or 0
        sent = value(metrics, "grpc_server_msg_sent_total", **rpc(method)) or 0
        return received, sent

    async def scenario() -> None:
        handlers = EchoHandlers()
        server = grpc.aio.server(
            interceptors=[metrics.interceptor()], migration_thread_pool=ThreadPoolExecutor(max_workers=1)
        )
        server.add_generic_rpc_handlers((handlers.generic_handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary", None, None)
                assert await unary(b"hi") == b"hi"
                for request, code in [
                    (b"abort", grpc.StatusCode.INVALID_ARGUMENT),
                    (b"raise", grpc.StatusCode.UNKNOWN),
                    (b"set-code", grpc.StatusCode.NOT_FOUND),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await unary(request)
                    assert caught.value.code() == code
                stream = channel.unary_stream(f"/{SERVICE}/ServerStream", None, None)
                assert [r async for r in stream(b"")] == [b"\0", b"\1", b"\2"]
                with pytest.raises(grpc.aio.AioRpcError):
                    _ = [r async for r in stream(b"abort")]
                bidi = channel.stream_stream(f"/{SERVICE}/Bidi", None, None)
                assert [r async for r in bidi(iter([b"a", b"b"]))] == [b"a", b"b"]
                assert (
                    await channel.stream_unary(f"/{SERVICE}/ClientStream", None, None)(iter([b"a", b"b"]))
                    == b"ab"
                )
                written = channel.unary_stream(f"/{SERVICE}/WriteStream", None, None)
                assert [r async for r in written(b"")] == [b"1", b"2"]
                sync_unary = channel.unary_unary(f"/{SERVICE}/SyncUnary", None, None)
                assert await sync_unary(b"sync") == b"sync"
                for request, code in [
                    (b"abort", grpc.StatusCode.PERMISSION_DENIED),
                    (b"set-code", grpc.StatusCode.ALREADY_EXISTS),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await sync_unary(request)
                    assert caught.value.code() == code
                sync_stream = channel.unary_stream(f"/{SERVICE}/SyncStream", None, None)
                assert [r async for r in sync_stream(b"")] == [b"x", b"y"]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    _ = [r async for r in sync_stream(b"set-code")]
                assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(f"/{SERVICE}/Nope", None, None)(b"")
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

                # A call the client cancels, and one whose deadline passes, while the handler waits.
                call = stream(b"wait")
                assert await call.read() == b"\0"
                assert in_flight("ServerStream") == 1
                call.cancel()
                await eventually(lambda: handled("ServerStream", "CANCELLED") == 1)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await unary(b"wait", timeout=0.2)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await eventually(lambda: handled("Unary", "DEADLINE_EXCEEDED") == 1)
        finally:
            handlers.release.set()
            await server.stop(0)

    asyncio.run(scenario())
    assert handled("Unary", "OK") == 1
    assert handled("Unary", "INVALID_ARGUMENT") == 1
    assert handled("Unary", "UNKNOWN") == 1
    assert handled("Unary", "NOT_FOUND") == 1
    assert handled("ServerStream", "OK") == 1
    assert handled("ServerStream", "RESOURCE_EXHAUSTED") == 1
    assert handled("Bidi", "OK") == 1
    assert handled("ClientStream", "OK") == 1
    assert handled("WriteStream", "OK") == 1
    # Synchronous handlers (rnnserve registers none) pass through the interceptor unwrapped.
    for method in ("SyncUnary", "SyncStream"):
        assert not value(metrics, "grpc_server_started_total", **rpc(method)), method
    unknown = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_type": "unknown"}
    assert value(metrics, "grpc_server_handled_total", grpc_code="UNIMPLEMENTED", **unknown) == 1
    assert value(metrics, "grpc_server_started_total", **rpc("Unary")) == 5
    assert value(metrics, "grpc_server_handling_seconds_count", **rpc("Unary")) == 5
    for method in ("Unary", "ServerStream", "Bidi", "ClientStream", "WriteStream"):
        assert in_flight(method) == 0, method
    # Received: every request the handler took; sent: every response it gave (a unary one on OK).
    assert messages("Unary") == (5, 1)
    assert messages("ServerStream") == (3, 3 + 1 + 1)  # 3; 1 before the abort; 1 before the cancel
    assert messages("Bidi") == (2, 2)
    assert messages("ClientStream") == (2, 1)
    assert messages("WriteStream") == (1, 2)


# ----- a real rnnserve server --------------------------------------------------------------------


def test_a_real_servers_metrics_change_as_requests_run(model_repository: Path) -> None:
    from serving.clients.client import RnnserveClient
    from serving.core.registry import load_repository
    from serving.frontend.server import create_server
    from serving.settings import ServerSettings

    inference = "rnnserve.v1.Inference"

    def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    async def scenario() -> dict[Any, float]:
        settings = ServerSettings(repository=model_repository, port=0)
        metrics = MetricsObserver()
        registry = load_repository(settings, metrics)
        server, port = await create_server(
            settings, registry, observer=metrics, interceptors=[metrics.interceptor()]
        )
        await server.start()
        endpoint = start_metrics_server(metrics.registry, "127.0.0.1", 0)
        try:
            before = await asyncio.to_thread(scrape, endpoint.url)
            cpu = "CPUExecutionProvider"
            info = sample(
                before, "rnnserve_model_info", model="tiny-lstm", version="1", provider=cpu, providers=cpu
            )
            assert info == 1
            async with RnnserveClient(f"127.0.0.1:{port}") as client:
                async with client.stream("tiny-lstm", top_k=2) as stream:
                    await stream.send([1, 2, 3])
                    await stream.send([4])
                    during = await asyncio.to_thread(scrape, endpoint.url)
                    assert sample(during, "rnnserve_sessions_active", model="tiny-lstm", version="1") == 1
                    stream_labels = {
                        "grpc_service": inference,
                        "grpc_method": "Stream",
                        "grpc_type": "bidi_stream",
                    }
                    assert sample(during, "grpc_server_started_total", **stream_labels) == 1
                    assert sample(during, "grpc_server_handled_total", grpc_code="OK", **stream_labels) == 0
                    await stream.end()  # CONTROL_END closes the session
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.step("0" * 32, [1])  # an unknown session: NOT_FOUND
                _ = [r async for r in client.generate("tiny-gru", prompt_tokens=[1, 2], max_new_tokens=5)]
            # A call is counted when its handler returns, which may be just after the client's last read.
            for _ in range(250):
                after = await asyncio.to_thread(scrape, endpoint.url)
                labels = {"grpc_service": inference, "grpc_method": "Stream", "grpc_type": "bidi_stream"}
                if sample(after, "grpc_server_handled_total", grpc_code="OK", **labels):
                    return after
                await asyncio.sleep(0.02)
            raise AssertionError("the Stream call was never counted")
        finally:
            endpoint.close()
            await server.stop(0)

    after = asyncio.run(scenario())

    def handled(method: str, grpc_type: str, code: str) -> float:
        labels = {"grpc_service": inference, "grpc_method": method, "grpc_type": grpc_type, "grpc_code": code}
        return sample(after, "grpc_server_handled_total", **labels)

    assert handled("Stream", "bidi_stream", "OK") == 1
    assert handled("Step", "unary", "NOT_FOUND") == 1
    assert handled("Generate", "server_stream", "OK") == 1
    assert sample(after, "rnnserve_tokens_in_total", model="tiny-lstm") == 4
    assert sample(after, "rnnserve_tokens_in_total", model="tiny-gru") >= 2
    assert sample(after, "rnnserve_tokens_out_total", model="tiny-gru") == 5
    assert sample(after, "rnnserve_batch_size_count", model="tiny-lstm") >= 2
    assert sample(after, "rnnserve_batch_tokens_total", model="tiny-lstm") == 4
    assert sample(after, "rnnserve_queue_wait_seconds_count", model="tiny-lstm") >= 2
    assert sample(after, "rnnserve_sessions_opened_total", model="tiny-lstm") == 1
    assert sample(after, "rnnserve_sessions_ended_total", model="tiny-lstm", reason="closed") == 1
    assert sample(after, "rnnserve_sessions_active", model="tiny-lstm", version="1") == 0
