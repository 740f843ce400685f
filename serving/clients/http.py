"""A small client of the HTTP door's generate_stream (standard library only): server-sent events
read as they arrive. `rnnserve generate --target http://HOST:PORT` uses it."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit


class HttpGenerateError(RuntimeError):
    """The server refused the generation, or could not be reached; the message says which."""


def is_http_target(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def stream_generate(
    url: str,
    model: str,
    prompt: str,
    parameters: dict[str, Any],
    *,
    version: int = 0,
    token: str | None = None,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[dict[str, Any]]:
    """POST /v2/models/{model}[/versions/{version}]/generate_stream; yields each event's JSON.
    An https:// URL is verified with `tls` (default: the system's CA certificates)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpGenerateError(f"{url!r} is not an http:// or https:// URL with a host")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=tls or ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = f"{parts.path.rstrip('/')}/v2/models/{quote(model, safe='')}"
    if version:
        path += f"/versions/{version}"
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"text_input": prompt, "parameters": parameters})
    try:
        connection.request("POST", path + "/generate_stream", body=body, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise HttpGenerateError(f"HTTP {response.status}: {_error_text(response.read())}")
        while True:
            line = response.readline()
            if not line:
                return
            text = line.decode("utf-8").strip()
            if not text.startswith("data: "):
                continue
            event = json.loads(text.removeprefix("data: "))
            if "error" in event:
                raise HttpGenerateError(event["error"])
            yield event
    except OSError as error:
        raise HttpGenerateError(f"cannot reach an rnnserve HTTP server at {url} ({error})") from None
    finally:
        connection.close()


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]
