"""The HTTP front end's server: uvicorn on the gRPC server's own event loop.

`HttpFrontend(app, host, port)` binds at once (port 0: a free one; see `.port`), so a port in use
fails before anything starts; `start()` serves as a task of the running loop and `stop()` ends it.
uvicorn's own signal handling stays off: `rnnserve serve` handles SIGTERM and stops every door.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

STOP_WAIT_S = 1  # open connections (an SSE stream) get this long to finish at shutdown


class HttpBindError(OSError):
    """The HTTP address cannot be bound; the message says which and why."""


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

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.socket = bind_socket(host, port)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=STOP_WAIT_S,
        )
        self.server = _LoopServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

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
