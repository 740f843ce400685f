"""`rnnserve health`: ask a server's grpc.health.v1 service whether it is serving (for probes).

Exit status 0 when the service is SERVING; 1 otherwise (NOT_SERVING, unknown service, server
unreachable), with a one-line reason on stderr. `--service ""` (the default) is the whole server;
a model name or "rnnserve.v1.Inference" checks that alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve health",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT")
    parser.add_argument("--service", default="", help='service to check; "" = the whole server')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up")
    return parser.parse_args(list(argv))


def check(target: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving, message) for one health check."""
    shown = repr(service) if service else "the server"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"{target} knows no health service {service!r}"
            if code == grpc.StatusCode.UNAVAILABLE:
                return False, f"cannot reach {target}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"{target} did not answer within {timeout:g} s"
            return False, f"health check of {target} failed: {error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{shown} at {target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    serving, message = check(args.target, args.service, args.timeout)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
