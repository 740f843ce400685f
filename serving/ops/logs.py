"""The server's logs: text or JSON lines, each carrying the request id of the call it belongs to.

Every gRPC call gets a request id: the client's `x-request-id` metadata when it is a plausible
id (1-128 characters of letters, digits and `._:-`), else a fresh random one. The id is sent
back in the call's trailing metadata (`x-request-id`) and appears in every log line written
while the call is handled (`request_id` in JSON, `[request_id=...]` in text), so one request
can be followed through the logs of a busy server. Lines from the model worker threads belong
to batches of many requests and carry none.

Nothing a client sends is logged: no token ids, no prompt or generated text, no bearer tokens.
`--log-requests` adds one line per finished call (method, status code, duration, request id,
caller identity), never its contents.

`CallTracker` is the gRPC interceptor behind this; it also counts the rnnserve.v1.Inference calls
in flight, which a graceful shutdown waits for (`wait_idle`).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving.ops.interceptor import CallInterceptor

REQUEST_ID_KEY = "x-request-id"
INFERENCE_PREFIX = "/rnnserve.v1.Inference/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_PLAUSIBLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("rnnserve_request_id", default=None)

access_log = logging.getLogger("rnnserve.access")

# Attributes of a LogRecord that JSON lines carry when a call site passes them in `extra`.
_EXTRA_FIELDS = ("rpc", "code", "duration_ms", "peer", "caller")


class RequestIdFilter(logging.Filter):
    """Puts the current call's request id on every record (None outside calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, and the
    access-log fields when present; `exception` holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level`, as "text" or "json" lines, with request ids. Replaces any
    handlers the root logger had (so calling it twice does not duplicate lines)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def choose_request_id(metadata: Any) -> str:
    """The client's x-request-id when plausible, else a new random id (16 hex characters)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _PLAUSIBLE_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


Caller = Callable[[Any], "str | None"]


class CallTracker(CallInterceptor):
    """Request ids, the access log, and the count of Inference calls in flight.

    `caller(context)` names the authenticated caller for the access log (None without auth).
    Health checks are neither counted nor access-logged (probes would flood the log). The access
    log's status is the call's final_status, the one /metrics counts.
    """

    def __init__(self, log_requests: bool = False, caller: Caller | None = None) -> None:
        self.log_requests = log_requests
        self.caller = caller
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no Inference call is in flight, at most `timeout` s; True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # the same class as TimeoutError from Python 3.11
            return False
        return True

    def watches(self, method: str) -> bool:
        return not method.startswith(HEALTH_PREFIX)

    def begin(self, context: Any, method: str, metadata: Any, call_type: str) -> tuple[bool, float]:
        rid = choose_request_id(metadata)
        counted = method.startswith(INFERENCE_PREFIX)
        if counted:
            self.in_flight += 1
            self._idle.clear()
        # Set now: `errors.refuse` keeps it beside the status details it adds.
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        # grpc.aio handles each call in its own task, whose context is its own: the id is seen
        # by everything this call runs, and by nothing else.
        request_id.set(rid)
        return counted, time.perf_counter()

    def end(self, context: Any, method: str, token: tuple[bool, float], code: grpc.StatusCode) -> None:
        counted, started = token
        if counted:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        failed = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        if self.log_requests or failed:
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            caller = self.caller(context) if self.caller is not None else None
            access_log.log(
                logging.WARNING if failed else logging.INFO,
                "%s %s %.1f ms%s",
                method,
                code.name,
                duration_ms,
                f" caller={caller}" if caller else "",
                extra={"rpc": method, "code": code.name, "duration_ms": duration_ms, "caller": caller},
            )
