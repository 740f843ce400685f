"""Metrics read from the running server at scrape time, beside serving.ops.metrics' event counters.

    rnnserve_queue_depth{model,version}  requests waiting for a batch (Batcher.backlog): the
                                         signal to scale out on, before latency grows
    rnnserve_draining                    1 from SIGTERM until the process exits
    rnnserve_sessions_open               open sessions, all models (sessions_active splits them)

Scrapes run on the metrics HTTP thread while the event loop changes the registry; the values
are read with operations that are atomic under the GIL (dict copies, a length), so a scrape sees
a recent state, never a broken one.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.core.runtime import Runtime
from serving.ops.metrics import PREFIX


class RuntimeCollector(Collector):
    """Collects the gauges above from `runtime` on every scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for a batch", labels=("model", "version")
        )
        for model in runtime.registry.all_loaded():
            depth.add_metric((model.name, str(model.version)), model.batcher.backlog)
        yield depth
        yield GaugeMetricFamily(
            f"{PREFIX}_draining", "1 while the server drains for shutdown", value=1 if runtime.draining else 0
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_sessions_open", "Open sessions, all models", value=len(runtime.sessions)
        )


def register_runtime_metrics(registry: CollectorRegistry, runtime: Runtime) -> RuntimeCollector:
    collector = RuntimeCollector(runtime)
    registry.register(collector)
    return collector
