"""A real redis-server for tests: started on a free loopback port in a temp dir, no persistence.

    from tests.support.redis_server import REDIS_SKIP_REASON, RedisServer, redis_server_path

    @pytest.fixture
    def redis_server(tmp_path):
        if redis_server_path() is None:
            pytest.skip(REDIS_SKIP_REASON)
        with RedisServer(tmp_path / "redis") as server:
            yield server

    server.url                       # redis://127.0.0.1:PORT/0
    server.stop(); server.start()    # Redis down, then back on the same port (empty: no persistence)
    server.restart()
    server.pause(); server.resume()  # SIGSTOP / SIGCONT: Redis accepts connections but never answers

Debian's redis-server package provides the binary (`apt-get install redis-server`; .ci/run
installs it when missing). The server never daemonizes: the process is this test's child and is
stopped by stop()/__exit__, so no Redis outlives a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

REDIS_SKIP_REASON = "needs redis-server (apt-get install redis-server)"
_PING = b"*1\r\n$4\r\nPING\r\n"
_INFO_SERVER = b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"


def redis_server_path() -> str | None:
    """The redis-server binary on PATH (or Debian's /usr/bin), or None."""
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (redis-server cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def redis_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether a Redis at host:port answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(_PING)
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_process_id(host: str, port: int, timeout: float = 0.2) -> int | None:
    """The process id of the Redis answering at host:port (from INFO server), or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(_INFO_SERVER)
            reply = b""
            while b"process_id:" not in reply or not reply.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = connection.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return int(reply.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])


class RedisServer:
    """One redis-server child process on 127.0.0.1; start/stop/restart/pause/resume."""

    def __init__(self, directory: Path, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        binary = redis_server_path()
        if binary is None:
            raise RuntimeError(REDIS_SKIP_REASON)
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        # A port picked here may be taken by another process before Redis binds it; until the
        # first start succeeds, start() may move to another free port (restarts keep the port).
        self._may_move = port is None
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start on self.port and wait until it answers PING."""
        if self.running:
            return
        for _ in range(3 if self._may_move else 1):
            if self._start_once(timeout):
                self._may_move = False
                return
            if self._may_move:
                self.port = free_port(self.host)
        log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}:\n{log}")

    def _start_once(self, timeout: float) -> bool:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        # Our own process must answer: another test's Redis may hold a port picked as free.
        while redis_process_id(self.host, self.port) != self.process.pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL); its port refuses connections afterwards."""
        process, self.process = self.process, None
        if process is None:
            return
        if self.paused:
            self.resume_process(process)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def restart(self) -> None:
        """Stop, then start again on the same port (empty: there is no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel does), but nothing answers."""
        assert self.process is not None and self.running
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.resume_process(self.process)

    def resume_process(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGCONT)
        self.paused = False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
