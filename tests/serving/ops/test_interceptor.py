"""The interceptor base: one final status per call, which the access log and /metrics share.

The interceptors are chained as a server chains them (CallTracker outside, the metrics one
inside) and driven with a stand-in for grpc.aio's context whose deadline runs out between the
two interceptors' ends: each would have judged the cancelled call differently on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from serving.ops.interceptor import DEADLINE_SLACK_S, final_status
from serving.ops.logs import CallTracker
from serving.ops.metrics import MetricsObserver

METHOD = "/rnnserve.v1.Inference/Step"


class Context:
    """What the interceptors read of grpc.aio's context; time_remaining() answers from a script."""

    def __init__(
        self, code: grpc.StatusCode | None = None, remaining: Iterator[float | None] | None = None
    ) -> None:
        self._code = code
        self._remaining = remaining if remaining is not None else iter(())
        self.trailing: Any = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return next(self._remaining, 60.0)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata


@pytest.mark.parametrize(
    ("code", "error", "remaining", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, None, None, grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.INVALID_ARGUMENT, Exception("aborted"), None, grpc.StatusCode.INVALID_ARGUMENT),
        (None, None, None, grpc.StatusCode.OK),
        (None, ValueError("bug"), None, grpc.StatusCode.UNKNOWN),
        (None, asyncio.CancelledError(), None, grpc.StatusCode.CANCELLED),
        (None, asyncio.CancelledError(), 30.0, grpc.StatusCode.CANCELLED),
        (None, asyncio.CancelledError(), DEADLINE_SLACK_S / 2, grpc.StatusCode.DEADLINE_EXCEEDED),
        (None, GeneratorExit(), 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_final_status_rules(
    code: grpc.StatusCode | None,
    error: BaseException | None,
    remaining: float | None,
    expected: grpc.StatusCode,
) -> None:
    assert final_status(Context(code, iter([remaining])), error) == expected


def chain(behavior: Any, streaming: bool) -> tuple[Any, MetricsObserver]:
    """`behavior` behind the metrics interceptor, behind the call tracker (outermost first)."""
    metrics = MetricsObserver(process_metrics=False)
    tracker = CallTracker(log_requests=True)
    details = SimpleNamespace(method=METHOD, invocation_metadata=())
    factory = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    handler = factory(behavior)

    async def build() -> Any:
        async def innermost(_: Any) -> Any:
            return handler

        inner = await metrics.interceptor().intercept_service(innermost, details)

        async def then_inner(_: Any) -> Any:
            return inner

        return await tracker.intercept_service(then_inner, details)

    return asyncio.run(build()), metrics


def counted(metrics: MetricsObserver, code: str) -> float:
    """Calls to Step ended with `code`, of either kind `chain` builds (unary or server stream)."""
    total = 0.0
    for grpc_type in ("unary", "server_stream"):
        labels = {"grpc_service": "rnnserve.v1.Inference", "grpc_method": "Step", "grpc_type": grpc_type}
        total += (
            metrics.registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})
            or 0.0
        )
    return total


def logged_codes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.code for record in caplog.records if record.name == "rnnserve.access"]  # type: ignore[attr-defined]


def test_a_unary_call_cancelled_at_its_deadline_is_one_status_in_the_log_and_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def cancelled(request: Any, context: Any) -> Any:
        raise asyncio.CancelledError

    handler, metrics = chain(cancelled, streaming=False)
    # The first interceptor to end sees the deadline (about) gone, the second would not.
    context = Context(remaining=iter([0.1, 30.0]))
    caplog.set_level(logging.INFO, logger="rnnserve.access")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(handler.unary_unary(b"", context))
    assert counted(metrics, "DEADLINE_EXCEEDED") == 1 and counted(metrics, "CANCELLED") == 0
    assert logged_codes(caplog) == ["DEADLINE_EXCEEDED"]
    assert context.trailing and context.trailing[0][0] == "x-request-id"


def test_a_streaming_call_gets_one_status_too(caplog: pytest.LogCaptureFixture) -> None:
    async def one_then_cancelled(request: Any, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise asyncio.CancelledError

    handler, metrics = chain(one_then_cancelled, streaming=True)
    context = Context(remaining=iter([30.0, 0.1]))  # now the first to end finds time left
    caplog.set_level(logging.INFO, logger="rnnserve.access")

    async def consume() -> list[bytes]:
        return [response async for response in handler.unary_stream(b"", context)]

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(consume())
    assert counted(metrics, "CANCELLED") == 1 and counted(metrics, "DEADLINE_EXCEEDED") == 0
    assert logged_codes(caplog) == ["CANCELLED"]


def test_each_call_computes_its_own_status(caplog: pytest.LogCaptureFixture) -> None:
    """Even calls run one after another on one task (grpc.aio gives each its own) do not share."""

    async def answer(request: Any, context: Any) -> bytes:
        return b"ok"

    async def refuse(request: Any, context: Any) -> bytes:
        raise ValueError("a bug")

    caplog.set_level(logging.INFO, logger="rnnserve.access")
    ok, metrics = chain(answer, streaming=False)
    failing, _ = chain(refuse, streaming=False)

    async def both() -> None:
        assert await ok.unary_unary(b"", Context()) == b"ok"
        with pytest.raises(ValueError, match="a bug"):
            await failing.unary_unary(b"", Context())
        assert await ok.unary_unary(b"", Context()) == b"ok"

    asyncio.run(both())
    assert counted(metrics, "OK") == 2
    assert logged_codes(caplog) == ["OK", "UNKNOWN", "OK"]
