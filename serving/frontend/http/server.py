"""The HTTP front end's server: uvicorn on the gRPC server's own event loop.

`HttpFrontend(app, host, port, tls)` binds at once (port 0: a free one; see `.port`), so a port in
use fails before anything starts; `start()` serves as a task of the running loop and `stop()` ends
it. uvicorn's own signal handling stays off: `rnnserve serve` handles SIGTERM and stops every door.
With `tls` (the gRPC server's --tls-cert and --tls-key, and --tls-client-ca when set) it serves
HTTPS with the same certificate, and asks for client certificates as gRPC does: a door never
serves in plaintext what the other serves encrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from serving.settings import ServerSettings

STOP_WAIT_S = 1  # open connections (an SSE stream) get this long to finish at shutdown


class HttpBindError(OSError):
    """The HTTP address cannot be bound; the message says which and why."""


@dataclass(frozen=True)
class HttpTls:
    """The certificate and key the HTTP door serves HTTPS with; `client_ca` asks for client
    certificates signed by it."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def of(cls, settings: ServerSettings) -> HttpTls | None:
        """The gRPC server's TLS files, or None when it serves plaintext."""
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


class _LoopServer(uvicorn.Server):
    """uvicorn.Server without its signal handlers (the rnnserve server owns the signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise HttpBindError(f"cannot listen on HTTP {host}:{port}: {error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise HttpBindError(f"cannot listen on HTTP {host}:{port}: {error}") from None
    sock.setblocking(False)
    return sock


class HttpFrontend:
    """An ASGI app served by uvicorn on a socket bound at construction."""

    def __init__(self, app: Starlette, host: str, port: int, tls: HttpTls | None = None) -> None:
        self.socket = bind_socket(host, port)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        self.tls = tls
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=STOP_WAIT_S,
            ssl_certfile=None if tls is None else tls.cert,
            ssl_keyfile=None if tls is None else tls.key,
            ssl_ca_certs=None if tls is None or tls.client_ca is None else str(tls.client_ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED
            if tls is not None and tls.client_ca is not None
            else ssl.CERT_NONE,
        )
        self.server = _LoopServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'http' if self.tls is None else 'https'}://{shown}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=[self.socket]), name="rnnserve-http"
        )
        while not self.server.started:
            if self._task.done():
                await self._task  # raises why it could not start
                raise HttpBindError(f"the HTTP server on {self.url} stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            self.socket.close()
            return
        self.server.should_exit = True
        await asyncio.wait({self._task})
        self.socket.close()
