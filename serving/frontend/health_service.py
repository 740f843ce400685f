"""The server's grpc.health.v1 service: grpc's own, with a cap on Watch streams per client address.

Health needs no token (probes carry no secrets), so anyone who can reach the port can open Watch
streams, and each one stays open for as long as its client likes (measured: about 20 MiB of
server memory per 300 streams). At most `max_watches_per_peer` Watch streams are open per client
address at a time; the next is refused with RESOURCE_EXHAUSTED naming the limit. Check is not
limited: it answers at once and holds nothing.
"""

from __future__ import annotations

from collections import Counter

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string, without its port: "ipv4:10.0.0.7:51234" ->
    "ipv4:10.0.0.7", "ipv6:[::1]:51234" -> "ipv6:[::1]"; other forms (unix:...) as they are."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return f"{kind}:{host}"
    return peer


class LimitedHealthServicer(HealthServicer):
    """grpc_health's asyncio HealthServicer with at most `max_watches_per_peer` open Watch streams
    per client address."""

    def __init__(self, max_watches_per_peer: int) -> None:
        super().__init__()
        self.max_watches_per_peer = max_watches_per_peer
        self._watches: Counter[str] = Counter()  # client address -> open Watch streams

    def open_watches(self, peer: str) -> int:
        return self._watches[peer_address(peer)]

    async def Watch(  # noqa: N802 (a gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        address = peer_address(context.peer())
        if self._watches[address] >= self.max_watches_per_peer:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{address} has {self.max_watches_per_peer} health Watch streams open, the limit "
                f"(--max-health-watches-per-peer); close one, or poll with Check",
            )
        self._watches[address] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches[address] -= 1
            if not self._watches[address]:
                del self._watches[address]
