"""`rnnserve serve --frontends N`: one engine-core process and N front-end processes, supervised.

The supervisor reserves the gRPC port (a socket bound with SO_REUSEPORT that never listens, so
`--port 0` picks one port for all), starts the engine core (serving.engine.core_process) and N
front ends (serving.frontend.frontend_process) that listen on that port with SO_REUSEPORT, and
keeps them running:

- a front end that dies is started again; its open calls ended with it (clients see UNAVAILABLE
  and resume their sessions by id, on any front end);
- an engine core that dies is started again, restoring the sessions from --state-snapshot or
  Redis where configured; meanwhile the front ends answer UNAVAILABLE at once.

Metrics (--metrics-port): every process records into prometheus_client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, a private temporary directory), and the supervisor serves their sum
on one /metrics: the front ends' request series, the core's batch, session and model series.

SIGTERM/SIGINT: the core drains (SIGUSR1: new sessions refused), the front ends stop (they give
calls in flight --grace-period-s), then the core freezes, saves its snapshot and exits. SIGHUP
goes to the core (look for new model versions now). The exit status is the core's.

The front ends serve rnnserve.v1.Inference, health and reflection; KServe v2 (gRPC and HTTP)
still calls the in-process Runtime and runs with `--frontends 0` only (a warning says so).

The processes are this module run as `python -m serving.frontend.supervisor ROLE SOCKET ARGS...`
with the `rnnserve serve` arguments, so each parses the same settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from serving.settings import ServerSettings, join_host_port, parse_settings

log = logging.getLogger("rnnserve.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
POLL_S = 0.05
RESTART_PAUSE_S = 0.2  # between a process's death and its restart
STOP_MARGIN_S = 10.0  # beyond the grace period: most time a process gets to exit before SIGKILL


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: it holds the port
    (port 0: a free one) for the front ends, which bind it with SO_REUSEPORT too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder


class Supervisor:
    """Starts, restarts and stops the engine core and the front ends (see the module docstring)."""

    def __init__(self, settings: ServerSettings, argv: Sequence[str], port: int, workdir: str) -> None:
        self.settings = settings
        self.argv = [*argv, "--port", str(port)]
        self.port = port
        self.socket_path = os.path.join(workdir, "engine.sock")
        self.environment = dict(os.environ)
        self.metrics_dir: str | None = None
        if settings.metrics_port:
            self.metrics_dir = os.path.join(workdir, "metrics")
            os.mkdir(self.metrics_dir)
            self.environment[MULTIPROC_ENV] = self.metrics_dir
        self.core: subprocess.Popen[bytes] | None = None
        self.frontends: list[subprocess.Popen[bytes] | None] = [None] * settings.frontends
        self.stopping = False
        self.restarts = 0

    def _start(self, role: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "serving.frontend.supervisor", role, self.socket_path, *self.argv]
        return subprocess.Popen(command, env=self.environment)

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        """Drop a dead process's live gauges from the summed metrics."""
        if self.metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self.metrics_dir)

    def start(self) -> None:
        self.core = self._start("core")
        self.frontends = [self._start("frontend") for _ in self.frontends]

    def check(self) -> None:
        """Restart whatever died (not while stopping)."""
        if self.stopping:
            return
        if self.core is not None and self.core.poll() is not None:
            log.error("the engine core exited with status %s: starting it again", self.core.returncode)
            self._forget(self.core)
            time.sleep(RESTART_PAUSE_S)
            self.restarts += 1
            self.core = self._start("core")
        for index, process in enumerate(self.frontends):
            if process is not None and process.poll() is not None:
                log.error(
                    "front end %d exited with status %s: starting it again", process.pid, process.returncode
                )
                self.restarts += 1
                self.frontends[index] = self._start("frontend")

    def reload(self) -> None:
        if self.core is not None:
            self.core.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        self.stopping = True
        timeout = self.settings.grace_period_s + STOP_MARGIN_S
        if self.core is not None:
            self.core.send_signal(signal.SIGUSR1)  # drain: refuse new sessions
        for process in self.frontends:
            if process is not None:
                process.send_signal(signal.SIGTERM)
        for process in self.frontends:
            if process is not None:
                _wait(process, timeout)
        if self.core is None:
            return 0
        self.core.send_signal(signal.SIGTERM)
        return _wait(self.core, timeout)


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("process %d did not exit within %.0f s: killing it", process.pid, timeout)
        process.kill()
        return process.wait()


def supervise(settings: ServerSettings, argv: Sequence[str]) -> int:
    """Run `rnnserve serve --frontends N` until SIGTERM/SIGINT; returns the exit status."""
    try:
        holder = reserve_port(settings.host, settings.port)
    except OSError as error:
        log.error("cannot listen on %s: %s", join_host_port(settings.host, settings.port), error)
        return 1
    port = holder.getsockname()[1]
    if settings.http_port:
        log.warning(
            "--frontends %d serves rnnserve.v1, health and reflection on port %d; the KServe v2 "
            "service and the HTTP door (--http-port %d) run with --frontends 0 only, so neither is open",
            settings.frontends,
            port,
            settings.http_port,
        )
    workdir = tempfile.mkdtemp(prefix="rnnserve-engine-")  # mode 0700: only this user
    supervisor = Supervisor(settings, argv, port, workdir)
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: received.append(number))
    metrics_endpoint = None
    try:
        if supervisor.metrics_dir is not None:
            metrics_endpoint = _serve_summed_metrics(settings, supervisor.metrics_dir)
        supervisor.start()
        log.info(
            "serving on %s with %d front ends and one engine core",
            join_host_port(settings.host, port),
            settings.frontends,
        )
        while True:
            while received:
                if received.pop(0) == signal.SIGHUP:
                    supervisor.reload()
                else:
                    return supervisor.stop()
            supervisor.check()
            time.sleep(POLL_S)
    finally:
        if metrics_endpoint is not None:
            metrics_endpoint.close()
        holder.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _serve_summed_metrics(settings: ServerSettings, directory: str) -> Any:
    from prometheus_client import CollectorRegistry, multiprocess

    from serving.ops.metrics import start_metrics_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    endpoint = start_metrics_server(registry, settings.metrics_bind_host, settings.metrics_port)
    log.info("metrics of all processes on %s", endpoint.url)
    return endpoint


def _child(role: str, engine_socket: str, argv: Sequence[str]) -> int:
    from serving.ops.logs import configure_logging

    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    if role == "frontend":
        from serving.frontend.frontend_process import run_frontend

        return asyncio.run(run_frontend(settings, engine_socket))
    from serving.core.registry import load_repository
    from serving.engine.core_process import run_engine_core
    from serving.ops.metrics import MetricsObserver

    # With --metrics-port the supervisor serves the sum of every process's series (see above).
    metrics = MetricsObserver(process_metrics=False) if settings.metrics_port else None
    registry = load_repository(settings, metrics, allow_empty=True)
    return asyncio.run(run_engine_core(settings, registry, engine_socket))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
