"""Scale-out on one machine: rnnserve replicas, nginx in front of them and Redis, all on loopback.

The scale bench (the `scale` scenario of bench.scenarios) and the scale-out tests
(tests/deploy/test_scale_out.py) run the deployed pieces as they are deployed, each as a child
process of the caller:

    with RedisProcess(work / "redis") as redis:
        replicas = [ReplicaProcess(repository, work / "replicas", i, {"redis-url": redis.url})
                    for i in range(3)]
        start_all(replicas)
        with NginxProcess(work / "nginx", [r.port for r in replicas]) as nginx:
            ... drive nginx.address (gRPC, HTTP/2 cleartext) ...
        stop_all(replicas)

- ReplicaProcess is `rnnserve serve` with flags, its log in a file. Its port is chosen free
  before it starts, because nginx's config names it and a replica restarted after a kill must
  come back on the same one.
- NginxProcess runs the installed nginx (Debian 12 ships 1.22) on deploy/nginx/nginx.conf
  rewritten for loopback by `local_nginx_conf`: the upstream lists the replicas' ports instead of
  a DNS name, every path lies in the work directory, and directives newer than the installed
  nginx are spelled the way it knows. Everything else (affinity hash, timeouts, log format) is
  the deployed config's.
- RedisProcess is redis-server without persistence, as deploy/ runs it.

Nothing daemonizes and nothing binds a non-loopback address; `stop()` (or leaving the `with`
block) ends each process: SIGTERM, then SIGKILL after a timeout. The binaries come from the
system (`apt-get install nginx redis-server`); `nginx_binary()` / `redis_binary()` are None where
they are missing. deploy/nginx/nginx.conf is read from the source checkout (it is not package
data), so these processes need a checkout, as the bench and the tests do.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import ServerProcessError

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
HOST = "127.0.0.1"

START_TIMEOUT_S = 60.0  # a replica imports onnxruntime and loads its models first
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
PORT_ATTEMPTS = 3  # a port found free may be taken before the child binds it: try another

# nginx releases that changed the spelling of a directive the deployed config uses.
NGINX_HTTP2_DIRECTIVE = (1, 25, 1)  # `http2 on;` (before: `listen ... http2;`)
NGINX_UPSTREAM_RESOLVE = (1, 27, 3)  # `server NAME resolve;` in open-source nginx


class ClusterError(ServerProcessError):
    """A process of the local cluster failed to start, or its config could not be made."""


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` now (for children that cannot report a port they bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def accepts_connections(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _system_binary(name: str, sbin: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(sbin, os.X_OK):
        found = sbin
    return found


def nginx_binary() -> str | None:
    """The nginx binary on PATH (or Debian's /usr/sbin/nginx), or None."""
    return _system_binary("nginx", "/usr/sbin/nginx")


def redis_binary() -> str | None:
    """The redis-server binary on PATH (or Debian's /usr/bin/redis-server), or None."""
    return _system_binary("redis-server", "/usr/bin/redis-server")


def nginx_version(binary: str) -> tuple[int, int, int]:
    output = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True, timeout=10).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", output)
    if match is None:
        raise ClusterError(f"cannot read the version of {binary} from {output!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _tail(path: Path, characters: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return "(no log)"


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


# ----- nginx ------------------------------------------------------------------------------------


def _replace(text: str, pattern: str, replacement: str, expected: int | None = 1) -> str:
    """re.subn that fails, naming the pattern, when the deployed config no longer matches it."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if (expected is None and count == 0) or (expected is not None and count != expected):
        raise ClusterError(
            f"{NGINX_CONF} changed: expected {expected or 'some'} match(es) of {pattern!r}, found {count}; "
            f"update bench/cluster.py local_nginx_conf"
        )
    return result


def local_nginx_conf(
    template: str,
    *,
    listen_port: int,
    upstream_ports: Sequence[int],
    work_dir: Path,
    version: tuple[int, int, int],
    workers: int = 1,
    access_log: bool = True,
) -> str:
    """deploy/nginx/nginx.conf (TEMPLATE) for nginx VERSION on loopback, in the foreground.

    Only addresses, paths and spellings change: the upstream lists 127.0.0.1:PORT for each
    upstream port (the deployed `replica:50051 resolve` needs Docker's DNS), nginx listens on
    127.0.0.1:LISTEN_PORT, its pid, temporary files and logs (error.log, access.log) lie in
    WORK_DIR, and it runs WORKERS worker processes without daemonizing. The HTTP door's upstream
    and server are left out: the bench speaks gRPC. Raises ClusterError when
    the template no longer has a line this rewrites.
    """
    if not upstream_ports:
        raise ClusterError("nginx needs at least one upstream port")
    work = str(work_dir.resolve())
    head = f"worker_processes {workers};\ndaemon off;"
    if os.geteuid() == 0:
        # As root, nginx would run its workers as `nobody`, who cannot enter a private work directory.
        head += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name};"
    conf = _replace(template, r"^worker_processes \S+;$", head)
    conf = _replace(conf, r"^pid /tmp/", f"pid {work}/")
    conf = _replace(conf, r"^(\s*\w+_temp_path) /tmp/", rf"\1 {work}/", expected=None)
    conf = _replace(conf, r"^error_log /dev/stderr ", f"error_log {work}/error.log ")
    log_target = f"{work}/access.log grpc" if access_log else "off"
    conf = _replace(conf, r"^(\s*)access_log /dev/stdout grpc;", rf"\1access_log {log_target};")
    # No names to resolve: the replicas are addresses.
    conf = _replace(conf, r"^\s*resolver(_timeout)? [^\n]*\n", "", expected=2)
    # gRPC only: the HTTP door's upstream and server go.
    conf = _replace(conf, r"(?s)^    upstream rnnserve_http \{\n.*?^    \}\n", "")
    conf = _replace(conf, r"(?s)^    server \{\n        listen 8000;\n.*?^    \}\n", "")
    servers = "".join(f"        server {HOST}:{port};\n" for port in upstream_ports)
    conf = _replace(conf, r"^\s*server \S+:\d+ resolve;[^\n]*\n", servers)
    if version < NGINX_HTTP2_DIRECTIVE:
        conf = _replace(conf, r"^\s*http2 on;\n", "")
        conf = _replace(conf, r"^(\s*)listen \d+;", rf"\1listen {HOST}:{listen_port} http2;")
    else:
        conf = _replace(conf, r"^(\s*)listen \d+;", rf"\1listen {HOST}:{listen_port};")
    return conf


class NginxProcess:
    """nginx in front of replicas on loopback (gRPC over cleartext HTTP/2); see local_nginx_conf.

    `access_log` (work_dir/access.log) has one line per finished call in the deployed `grpc`
    format: `... "POST /rnnserve.v1.Inference/Step HTTP/2.0" ... session=ID upstream=HOST:PORT ...`.
    """

    def __init__(
        self,
        work_dir: Path,
        upstream_ports: Sequence[int],
        *,
        workers: int = 1,
        access_log: bool = True,
        binary: str | None = None,
    ) -> None:
        found = binary or nginx_binary()
        if found is None:
            raise ClusterError("nginx is not installed (apt-get install nginx)")
        self.binary = found
        self.version = nginx_version(found)
        self.work_dir = work_dir
        self.upstream_ports = tuple(upstream_ports)
        self.workers = workers
        self.with_access_log = access_log
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.work_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.work_dir / "error.log"

    @property
    def conf_path(self) -> Path:
        return self.work_dir / "nginx.conf"

    def start(self) -> None:
        """Start nginx on a free port and wait until it accepts connections."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        template = NGINX_CONF.read_text()
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.conf_path.write_text(
                local_nginx_conf(
                    template,
                    listen_port=self.port,
                    upstream_ports=self.upstream_ports,
                    work_dir=self.work_dir,
                    version=self.version,
                    workers=self.workers,
                    access_log=self.with_access_log,
                )
            )
            if self._start_once():
                return
            if "Address already in use" not in _tail(self.error_log):
                break
        raise ClusterError(f"nginx did not start on {self.address}:\n{_tail(self.error_log)}")

    def _start_once(self) -> bool:
        command = [self.binary, "-p", f"{self.work_dir.resolve()}/", "-e", str(self.error_log), "-c",
                   str(self.conf_path)]  # fmt: skip
        with (self.work_dir / "nginx.out").open("ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts_connections(HOST, self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(POLL_S)
        return True

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: open streams are cut), then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is not None:
            _terminate(process, STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same config. A new nginx forgets
        which upstreams failed (it would otherwise avoid one for fail_timeout, 10 s)."""
        self.stop()
        if not self._start_once():
            raise ClusterError(f"nginx did not restart on {self.address}:\n{_tail(self.error_log)}")

    def __enter__(self) -> NginxProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


# ----- rnnserve replicas --------------------------------------------------------------------------


def serve_command() -> list[str]:
    """`rnnserve serve` with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-m", "serving.cli", "serve"]


class ReplicaProcess:
    """One `rnnserve serve` child on 127.0.0.1; start, stop (graceful), kill (SIGKILL), restart.

    `flags` are extra `rnnserve serve` flags without their dashes, e.g. {"redis-url": URL,
    "state-save-every-steps": "1"}; the replica never exposes /metrics (other replicas would
    want the same port) and never polls the repository. Its log (work_dir/replica-N.log, kept
    across restarts) is quoted when it fails to start.
    """

    def __init__(
        self,
        repository: Path,
        work_dir: Path,
        index: int,
        flags: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.repository = repository
        self.work_dir = work_dir
        self.index = index
        self.flags = dict(flags or {})
        self.environment = dict(environment or {})
        self.port = 0  # chosen at the first start, kept by restarts
        self.process: subprocess.Popen[bytes] | None = None
        self._settled = False  # a start succeeded: the port is this replica's for good

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"replica-{self.index}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ClusterError(f"replica {self.index} is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        flags = {
            "repository": str(self.repository),
            "host": HOST,
            "port": str(self.port),
            "metrics-port": "0",
            "reload-interval-s": "0",
            **self.flags,
        }
        return [*serve_command(), *(item for name, value in flags.items() for item in (f"--{name}", value))]

    def launch(self) -> None:
        """Start the process without waiting for it (see wait_ready); picks a port the first time."""
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        environment = {**os.environ, **self.environment}
        with self.log_path.open("ab") as log:
            log.write(f"----- {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Wait until health says SERVING; False when the process exited first (see the log)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not accepts_connections(HOST, self.port):
            if self.process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"replica {self.index} did not listen within {timeout:.0f} s:\n{self.log()}"
                )
            time.sleep(POLL_S)
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                if self.process.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"replica {self.index} is not SERVING after {timeout:.0f} s:\n{self.log()}"
                    )
                time.sleep(POLL_S)

    def start(self) -> None:
        """Start and wait until SERVING. Until a first start succeeded, a port another process took
        meanwhile is replaced by a free one; restarts keep the port."""
        for _ in range(PORT_ATTEMPTS):
            self.launch()
            if self.wait_ready():
                self._settled = True
                return
            self.process = None
            if not self._port_was_taken():
                break
            self.port = free_port()
        raise ClusterError(f"replica {self.index} exited while starting:\n{self.log()}")

    def _port_was_taken(self) -> bool:
        return not self._settled and "cannot listen on" in self.log()

    def log(self) -> str:
        return _tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved on the way out."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Graceful stop (SIGTERM: drain, save sessions, exit); SIGKILL after `timeout` s.
        Returns the exit status (None when it was not running)."""
        process, self.process = self.process, None
        if process is None:
            return None
        _terminate(process, timeout)
        return process.returncode

    def restart(self, flags: Mapping[str, str] | None = None) -> None:
        """Start again on the same port, with FLAGS replacing those given (a crashed one too)."""
        self.stop()
        self.flags.update(flags or {})
        self.start()


def start_all(replicas: Iterable[ReplicaProcess]) -> None:
    """Start replicas side by side (their start-ups overlap), then wait for each."""
    started = list(replicas)
    try:
        for replica in started:
            replica.launch()
        for replica in started:
            if replica.wait_ready():
                replica._settled = True
                continue
            replica.process = None
            if not replica._port_was_taken():
                raise ClusterError(f"replica {replica.index} exited while starting:\n{replica.log()}")
            replica.port = free_port()
            replica.start()
    except BaseException:
        stop_all(started)
        raise


def stop_all(replicas: Iterable[ReplicaProcess]) -> None:
    """Stop every replica gracefully, all at once (their drains overlap)."""
    running = [replica for replica in replicas if replica.process is not None]
    for replica in running:
        if replica.running:
            assert replica.process is not None
            replica.process.terminate()
    for replica in running:
        replica.stop()


# ----- Redis ---------------------------------------------------------------------------------------


class RedisProcess:
    """redis-server on 127.0.0.1 without persistence (as deploy/ runs it), in the foreground."""

    def __init__(self, work_dir: Path, binary: str | None = None) -> None:
        found = binary or redis_binary()
        if found is None:
            raise ClusterError("redis-server is not installed (apt-get install redis-server)")
        self.binary = found
        self.work_dir = work_dir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "redis.log"

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            command = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                       "--appendonly", "no", "--dir", str(self.work_dir), "--logfile", str(self.log_path),
                       "--daemonize", "no"]  # fmt: skip
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.process.poll() is None and time.monotonic() < deadline:
                if accepts_connections(HOST, self.port):
                    return
                time.sleep(POLL_S)
            self.stop()
        raise ClusterError(f"redis-server did not start:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _terminate(process, STOP_TIMEOUT_S)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
