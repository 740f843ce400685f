"""What the scale-out tests share: replicas behind nginx with Redis on loopback, and what nginx saw.

    cluster = Cluster(tmp / "cluster", repository, redis, [{"state-save-every-steps": "1"}] * 3)
    cluster.start()                    # the replicas side by side, then nginx in front of them
    cluster.nginx.address              # where clients connect (gRPC, cleartext HTTP/2)
    cluster.routes()                   # nginx's access log: which replica took each call
    cluster.replicas[0].kill()         # SIGKILL; .restart() brings it back on its port
    cluster.stop()

The processes come from bench.cluster (the scale bench runs the same ones); Redis is
tests.support.redis_server's RedisServer, which can be stopped and started again on its port. The
tests skip, saying which, when nginx or redis-server is not installed (.ci/run installs both).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.cluster import NginxProcess, ReplicaProcess, nginx_binary, start_all, stop_all
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.redis_server import RedisServer, redis_server_path


def missing_services() -> str | None:
    """Why the scale-out tests cannot run here, or None when nginx and redis-server are installed."""
    missing = [name for name, found in (("nginx", nginx_binary()), ("redis-server", redis_server_path()))
               if found is None]  # fmt: skip
    if not missing:
        return None
    return f"needs {' and '.join(missing)} (apt-get install {' '.join(missing)}; .ci/run installs them)"


# One line of the deployed `grpc` log format (deploy/nginx/nginx.conf). $upstream_addr lists every
# replica nginx tried, comma-separated, when it moved on from one that failed.
_ACCESS_LINE = re.compile(
    r'^\S+ \[[^\]]+\] "\S+ /rnnserve\.v1\.Inference/(?P<method>\w+) [^"]*" \d+ '
    r"grpc-status=(?P<status>\S+) session=(?P<session>\S+) upstream=(?P<upstream>.*) time=\S+$"
)


@dataclass(frozen=True)
class Route:
    """How nginx routed one rnnserve.v1.Inference call (one access-log line, at the call's end)."""

    method: str  # "Step", "CreateSession", "Stream", ...
    session_id: str | None  # its x-session-id metadata
    ports: tuple[int, ...]  # the replicas nginx tried, in order; the last one answered
    grpc_status: str  # from the trailers; "-" when the reply had none in trailers (an error)

    @property
    def port(self) -> int:
        return self.ports[-1]


def read_routes(access_log: Path) -> list[Route]:
    """Every rnnserve.v1.Inference call in nginx's access log, oldest first."""
    routes = []
    text = access_log.read_text() if access_log.exists() else ""
    for line in text.splitlines():
        match = _ACCESS_LINE.match(line)
        if match is None:
            continue  # health checks and the like
        session = match["session"]
        ports = tuple(int(address.rpartition(":")[2]) for address in match["upstream"].split(", "))
        routes.append(Route(match["method"], None if session == "-" else session, ports, match["status"]))
    return routes


class Cluster:
    """Replicas of `rnnserve serve` on one repository, nginx in front, Redis behind."""

    def __init__(
        self,
        work_dir: Path,
        repository: Path,
        redis: RedisServer,
        replica_flags: Sequence[Mapping[str, str]],
    ) -> None:
        self.work_dir = work_dir
        self.redis = redis
        self.replicas = [
            ReplicaProcess(
                repository,
                work_dir / "replicas",
                index,
                # A loaded CI machine can stall a process longer than the default Redis timeout.
                {"redis-url": redis.url, "redis-timeout-s": "2", "grace-period-s": "1", **flags},
            )
            for index, flags in enumerate(replica_flags)
        ]
        self.nginx: NginxProcess | None = None

    @property
    def address(self) -> str:
        assert self.nginx is not None, "start() the cluster first"
        return self.nginx.address

    def start(self) -> None:
        start_all(self.replicas)
        self.nginx = NginxProcess(self.work_dir / "nginx", [replica.port for replica in self.replicas])
        try:
            self.nginx.start()
        except BaseException:
            stop_all(self.replicas)
            raise

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        stop_all(self.replicas)

    def index_of(self, port: int) -> int:
        """The replica listening on `port`."""
        (index,) = [i for i, replica in enumerate(self.replicas) if replica.port == port]
        return index

    def routes(self, count_at_least: int = 0, timeout: float = 5.0) -> list[Route]:
        """nginx's routes so far, waiting (bounded) until there are `count_at_least`: nginx logs
        a call just after its last byte, so a client may see the reply before the line exists."""
        assert self.nginx is not None
        deadline = time.monotonic() + timeout
        while True:
            routes = read_routes(self.nginx.access_log)
            if len(routes) >= count_at_least or time.monotonic() > deadline:
                return routes
            time.sleep(0.02)

    def active_sessions(self, index: int) -> int:
        """Open sessions on one replica, all models (ListModels, straight to the replica)."""
        with grpc.insecure_channel(self.replicas[index].address) as channel:
            reply = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5.0)
        return sum(version.active_sessions for model in reply.models for version in model.versions)

    def logs(self) -> str:
        """Every replica's log tail and nginx's error log, for a failing assertion's message."""
        parts = [
            f"--- replica {replica.index} (port {replica.port})\n{replica.log()}" for replica in self.replicas
        ]
        if self.nginx is not None and self.nginx.error_log.exists():
            parts.append(f"--- nginx\n{self.nginx.error_log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)
