"""What the operations tests share: the full server in-process or as `rnnserve serve`, metric
scrapes, certificates made with the openssl command, and bounded waiting.

OpsServer runs serving.frontend.server.build_server (metrics, auth, TLS, hot reload, snapshots) on an
event loop in a background thread, like tests.support.servers.ServerThread does for create_server, so tests
talk to it over real channels. ServerProcess runs the real command line, for signals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")
RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for servers whose port 0 means "off")."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def scrape(url: str, token: str | None = None, tls_ca: Path | None = None) -> Samples:
    """Every sample of a /metrics page: (name, sorted labels) -> value. `token`: sent as
    `Authorization: Bearer TOKEN`; `tls_ca`: the CA that signed an https endpoint's certificate."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    context = None if tls_ca is None else ssl.create_default_context(cafile=str(tls_ca))
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class OpsServer:
    """`rnnserve serve`'s server (build_server) on 127.0.0.1:<free port>, metrics on a free port."""

    def __init__(self, repository: Path, state_on_device: bool | None = None, **overrides: Any) -> None:
        from serving.core.registry import load_repository
        from serving.ops.metrics import MetricsObserver
        from serving.settings import ServerSettings

        settings = ServerSettings(repository=repository, port=0, http_port=0)  # no HTTP door: see conftest
        self.settings = dataclasses.replace(settings, **overrides)
        self.state_on_device = state_on_device
        self.metrics = MetricsObserver(process_metrics=False)
        self.registry = load_repository(self.settings, self.metrics, state_on_device, allow_empty=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ops-server", daemon=True)
        self.thread.start()
        self.server, self.port = self.call(self._start())
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> tuple[Any, int]:
        from serving.frontend.server import build_server

        server, port = await build_server(
            self.settings,
            self.registry,
            metrics=self.metrics,
            metrics_port=0 if self.settings.metrics_port else None,
            state_on_device=self.state_on_device,
        )
        await server.start()
        return server, port

    @property
    def metrics_url(self) -> str:
        assert self.server.metrics_endpoint is not None
        return str(self.server.metrics_endpoint.url)

    def scrape(self, token: str | None = None, tls_ca: Path | None = None) -> Samples:
        return scrape(self.metrics_url, token, tls_ca)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_loop(self, function: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the server's loop thread (runtime state is loop-owned)."""

        async def run() -> T:
            return function(*args)

        return self.call(run())

    def versions(self, name: str) -> list[int]:
        return self.on_loop(lambda: [m.version for m in self.registry.versions(name)])

    def stop(self, grace: float = 0.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


class ServerProcess:
    """`rnnserve serve --port 0 ARGS...` in a subprocess; its stderr is collected by a thread."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [RNNSERVE, "serve", "--port", "0", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,  # noqa: PLW1509 (sets a resource limit in the child only)
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
        self._reader.start()
        self.target = ""

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.lines.append(line)

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of `pattern` in the log; fails the test if the server exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.process.poll() is not None:
                self._reader.join(5)
                found = re.search(pattern, self.log)
                if found:
                    return found
                pytest.fail(
                    f"rnnserve serve exited ({self.process.returncode}) before {pattern!r}:\n{self.log}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {pattern!r} in the server log:\n{self.log}")
            time.sleep(0.02)

    def wait_started(self, timeout: float = 60.0) -> str:
        found = self.wait_for_log(r"serving .* on 127\.0\.0\.1:(\d+) ", timeout)
        self.target = f"127.0.0.1:{found.group(1)}"
        return self.target

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def server_processes() -> Any:
    """Start ServerProcess objects with `start(args, ...)`; every one is killed after the test."""
    started: list[ServerProcess] = []

    def start(args: Sequence[str], **kwargs: Any) -> ServerProcess:
        process = ServerProcess(args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@dataclasses.dataclass(frozen=True)
class Certificates:
    """A test CA, a server certificate for localhost and 127.0.0.1, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def make_certificates(directory: Path) -> Certificates:
    """Make the certificates with the openssl command line (EC P-256, valid one day)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    new_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *new_key, "-days", "1", "-subj", f"/CN=rnnserve test {ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=directory,
        )  # fmt: skip
    extensions = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, text in extensions.items():
        (directory / f"{name}.ext").write_text(text)
        _openssl("req", *new_key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 cwd=directory)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory,
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
