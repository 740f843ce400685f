"""`rnnserve health`: ask a server's grpc.health.v1 service whether it is serving (for probes).

Exit status 0 when the service is SERVING; 1 otherwise (NOT_SERVING, unknown service, server
unreachable), with a one-line reason on stderr. `--service ""` (the default) is the whole server;
a model name or "rnnserve.v1.Inference" checks that alone. Against a TLS server give --tls-ca (or
--tls for the system's CAs); health needs no token. A server with `--health-port` also answers
health in plaintext on that port, for probes that cannot speak TLS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.clients.client import (
    Connection,
    ConnectionConfigError,
    add_connection_arguments,
    connection_from,
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve health",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT")
    parser.add_argument("--service", default="", help='service to check; "" = the whole server')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up")
    add_connection_arguments(parser)
    return parser.parse_args(list(argv))


def _channel(target: str, connection: Connection) -> grpc.Channel:
    credentials = connection.credentials()
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials, options=connection.options())


def check(
    target: str, service: str, timeout: float, connection: Connection | None = None
) -> tuple[bool, str]:
    """(serving, message) for one health check. Raises ConnectionConfigError for bad TLS files."""
    shown = repr(service) if service else "the server"
    connection = connection or Connection()
    with _channel(target, connection) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=connection.metadata(),
            )
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
    try:
        serving, message = check(args.target, args.service, args.timeout, connection_from(args))
    except ConnectionConfigError as error:
        print(f"rnnserve health: {error}", file=sys.stderr)
        return 2
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
