"""The one base of rnnserve's grpc.aio interceptors, and the one rule for a call's final status.

grpc.aio hands an interceptor a method handler of one of four kinds (unary or streaming
request, unary or streaming response); `CallInterceptor` rebuilds it around the handler's
behaviour, calling `begin` before and `end` after each call with the status the call ended with.
The request ids and access log (serving.ops.logs) and the request metrics (serving.ops.metrics)
are its subclasses; auth (serving.ops.auth) replaces the behaviour with a refusal through
`rebuild`. Only asynchronous behaviours are wrapped: every handler rnnserve registers is one.

`final_status` is computed once per call and shared by every interceptor of that call, so the
access log and /metrics always report the same code, even for a call cancelled just as its
deadline ran out.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]

# The client's own deadline timer usually fires first and cancels the call slightly before the
# server's copy of the deadline (which started when the headers arrived) runs out.
DEADLINE_SLACK_S = 0.25

# (request streaming, response streaming) -> (the handler's behaviour, the factory of its kind)
HANDLER_KINDS: dict[tuple[bool, bool], tuple[Callable[[Any], Behavior | None], Callable[..., Any]]] = {
    (False, False): (lambda h: h.unary_unary, grpc.unary_unary_rpc_method_handler),
    (False, True): (lambda h: h.unary_stream, grpc.unary_stream_rpc_method_handler),
    (True, False): (lambda h: h.stream_unary, grpc.stream_unary_rpc_method_handler),
    (True, True): (lambda h: h.stream_stream, grpc.stream_stream_rpc_method_handler),
}

# The status of the call this task is handling, once the innermost interceptor has computed it.
# grpc.aio runs each call in a task of its own, so each call sees only its own.
_call_status: contextvars.ContextVar[list[grpc.StatusCode] | None] = contextvars.ContextVar(
    "rnnserve_call_status", default=None
)


def _open_call_status() -> None:
    """At a call's start in the outermost interceptor: a fresh slot for its final status (the
    inner ones find it empty and share it; a finished call's slot is never reused)."""
    shared = _call_status.get()
    if shared is None or shared:
        _call_status.set([])


def behavior_of(handler: grpc.RpcMethodHandler) -> Behavior | None:
    """The handler's behaviour (its unary_unary, unary_stream, ... function of its kind)."""
    return HANDLER_KINDS[handler.request_streaming, handler.response_streaming][0](handler)


def rebuild(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler`, running `behavior`."""
    factory = HANDLER_KINDS[handler.request_streaming, handler.response_streaming][1]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _compute_status(context: Any, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code  # what the handler set or aborted with
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # grpc answers an unexpected exception with UNKNOWN


def final_status(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status a finished call ended with: what the handler set or aborted with; else OK, or
    for an exception UNKNOWN, or for a cancelled call DEADLINE_EXCEEDED when its deadline had
    (about) run out and CANCELLED otherwise. Computed once per call (see the module doc)."""
    shared = _call_status.get()
    if shared:
        return shared[0]
    code = _compute_status(context, error)
    if shared is not None:
        shared.append(code)
    return code


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Base of the interceptors that watch calls: override `watches`, `begin` and `end`."""

    def watches(self, method: str) -> bool:
        """Whether calls to `method` ("/package.Service/Method") are wrapped (default: all)."""
        return True

    def begin(self, context: Any, method: str, metadata: Any) -> Any:
        """Called on the call's task before its behaviour; returns what `end` gets as `token`."""
        return None

    def end(self, context: Any, method: str, token: Any, code: grpc.StatusCode) -> None:
        """Called on the call's task after its behaviour, with the call's final status."""

    def unimplemented(self, method: str) -> None:
        """A call to a method the server does not have (grpc answers UNIMPLEMENTED)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            self.unimplemented(method)
            return handler
        if not self.watches(method):
            return handler
        behavior = behavior_of(handler)
        metadata = handler_call_details.invocation_metadata
        if inspect.isasyncgenfunction(behavior):
            return rebuild(handler, self._streaming(behavior, method, metadata))
        if inspect.iscoroutinefunction(behavior):
            # A unary response, or a stream written with context.write.
            return rebuild(handler, self._unary(behavior, method, metadata))
        return handler  # a synchronous (or malformed) handler: none of rnnserve's own

    def _unary(self, behavior: Behavior, method: str, metadata: Any) -> Behavior:
        async def wrapped(request: Any, context: Any) -> Any:
            _open_call_status()
            token = self.begin(context, method, metadata)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self.end(context, method, token, final_status(context, error))

        return wrapped

    def _streaming(self, behavior: Behavior, method: str, metadata: Any) -> Behavior:
        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            _open_call_status()
            token = self.begin(context, method, metadata)
            error: BaseException | None = None
            responses = behavior(request, context)
            try:
                async for response in responses:
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                # Close the handler now: its own `finally` runs here, inside this call's context.
                await responses.aclose()
                self.end(context, method, token, final_status(context, error))

        return wrapped
