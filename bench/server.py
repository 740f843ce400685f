"""The real rnnserve server as a benchmark target: built from ServerSettings in a child process.

The bench starts the server through serving.frontend.server.create_server(settings) in a spawned child
(see bench.procs) rather than through `rnnserve serve`: the child reports the ephemeral
port it bound through a pipe (no log parsing), and the bench sets any ServerSettings field
directly (`--server-option max_batch_size=1`), with the same validation the server applies.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.procs import run_child


class ServerOptionError(ValueError):
    """A --server-option names no ServerSettings field, or its value does not parse."""


def _coerce(field: dataclasses.Field[Any], hints: Mapping[str, Any], text: str) -> Any:
    """TEXT as the type of FIELD (int, float, bool, str, Path, or an Optional of one)."""
    annotation = hints[field.name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ServerOptionError(f"server option {field.name}={text!r}: expected true or false")
    if annotation in (int, float, str, Path):
        try:
            return annotation(text)
        except ValueError:
            raise ServerOptionError(
                f"server option {field.name}={text!r}: expected {annotation.__name__}"
            ) from None
    raise ServerOptionError(f"server option {field.name} has type {annotation!r}, which the bench cannot set")


def settings_with(base: Any, options: Mapping[str, str]) -> Any:
    """BASE (a ServerSettings) with OPTIONS (field name -> text) applied and validated."""
    fields = {field.name: field for field in dataclasses.fields(base)}
    hints = typing.get_type_hints(type(base))
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ServerOptionError(
            f"unknown server option(s) {unknown}; ServerSettings fields are {sorted(fields)}"
        )
    changes = {name: _coerce(fields[name], hints, text) for name, text in options.items()}
    return dataclasses.replace(base, **changes)


def make_settings(repository: Path, host: str, device: str, options: Mapping[str, str]) -> Any:
    """The settings the bench starts a server with: the server's defaults, then OPTIONS."""
    from serving.settings import ServerSettings

    return settings_with(ServerSettings(repository=repository, host=host, port=0, device=device), options)


async def _start(repository: Path, host: str, device: str, options: Mapping[str, str]) -> tuple[Any, int]:
    from serving.frontend.server import create_server

    created = create_server(make_settings(repository, host, device, options))
    server, port = await created if inspect.isawaitable(created) else created
    await server.start()
    return server, int(port)


def server_process_main(
    conn: Connection, repository: Path, host: str, device: str, options: dict[str, str]
) -> None:
    """Child-process target (see bench.procs): the real server until told to stop."""
    log_level = options.get("log_level", "INFO")
    run_child(conn, lambda: _start(repository, host, device, options), log_level=log_level)
