"""Servers under test, each in its own process, so the benchmark's client does not share its CPU.

The bench process is the client (one grpc.aio event loop); every server it measures (the echo
server, the real server with batching on or off) runs in a child started with the `spawn`
method, which reports its port through a pipe and serves until told to stop. A separate process
gives the server its own interpreter and GIL, so client and server work in parallel on the two
cores as they would on two machines, and the server's resident memory can be read on its own.

A child's target is a module-level function `target(conn, *args)` that calls `run_child` with a
coroutine function starting its grpc.aio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import sys
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

# How long a child may take to start serving, and to stop after being asked.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
_STOP = "stop"


class ServerProcessError(RuntimeError):
    """A server under test failed to start, or died while being measured."""


def run_child(conn: Connection, start: Callable[[], Awaitable[tuple[Any, int]]], log_level: str) -> None:
    """Body of a child: start the server, send ("ready", port), serve until "stop" arrives.

    `start` returns a started grpc.aio server and its bound port. A failure to start is sent to
    the parent as ("error", traceback) so that the bench reports it instead of a timeout.
    """
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s [{multiprocessing.current_process().name}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve_until_stopped(conn, start))
    except Exception:
        # Reported to the parent, which raises ServerProcessError with this text.
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        conn.close()


async def _serve_until_stopped(conn: Connection, start: Callable[[], Awaitable[tuple[Any, int]]]) -> None:
    server, port = await start()
    conn.send(("ready", port))
    loop = asyncio.get_running_loop()
    # conn.recv blocks, so it waits in a thread; the event loop keeps serving meanwhile. An EOF
    # (the parent died) stops the server as well.
    with contextlib.suppress(EOFError):
        await loop.run_in_executor(None, conn.recv)
    await server.stop(grace=2.0)


def resident_bytes(pid: int) -> int | None:
    """Resident set size of process PID (Linux /proc), or None where /proc is not available."""
    status = Path(f"/proc/{pid}/status")
    try:
        lines = status.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


class ServerProcess:
    """A server under test in a child process; a context manager that always stops it."""

    def __init__(self, label: str, target: Callable[..., None], args: tuple[Any, ...], host: str) -> None:
        self.label = label
        self.host = host
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=target, args=(child_conn, *args), name=label, daemon=True)
        self._process.start()
        child_conn.close()
        self.port = self._wait_ready()
        # The pid lets a profiler attach while the bench drives the server (py-spy record --pid).
        print(f"[bench] {label} serving on {self.address} (pid {self.pid})", flush=True)

    def _wait_ready(self) -> int:
        if not self._conn.poll(START_TIMEOUT_S):
            self.stop()
            raise ServerProcessError(f"{self.label} did not start serving within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(STOP_TIMEOUT_S)
            raise ServerProcessError(
                f"{self.label} exited while starting (exit code {self._process.exitcode})"
            ) from None
        if kind != "ready":
            self.stop()
            raise ServerProcessError(f"{self.label} failed to start:\n{payload}")
        return int(payload)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        pid = self._process.pid
        if pid is None:
            raise ServerProcessError(f"{self.label} has no process id")
        return pid

    def check_alive(self) -> None:
        if not self._process.is_alive():
            raise ServerProcessError(f"{self.label} died (exit code {self._process.exitcode})")

    def resident_bytes(self) -> int | None:
        self.check_alive()
        return resident_bytes(self.pid)

    def stop(self) -> None:
        """Ask the child to stop gracefully; terminate, then kill it if it does not."""
        if self._process.is_alive():
            # An OSError here means the child already closed its end: it is exiting anyway.
            with contextlib.suppress(OSError):
                self._conn.send(_STOP)
            self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            print(
                f"[bench] {self.label} did not stop within {STOP_TIMEOUT_S:.0f} s; terminating it",
                file=sys.stderr,
            )
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
