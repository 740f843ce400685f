"""The one base of rnnserve's grpc.aio interceptors, and the one rule for a call's final status.

grpc.aio hands an interceptor a method handler of one of four kinds (unary or streaming
request, unary or streaming response; `CALL_TYPES` names them); `CallInterceptor` rebuilds it
around the handler's behaviour, calling `begin` before and `end` after each call with the status
the call ended with, and, if it `counts_messages`, `received` and `sent` for each message.
The request ids and access log (serving.ops.logs) and the request metrics (serving.ops.metrics)
are its subclasses; auth (serving.ops.auth) replaces the behaviour with a refusal through
`rebuild`. Only asynchronous behaviours are wrapped: every handler rnnserve registers is one.

`final_status` is computed once per call and shared by every interceptor of that call, so the
access log and /metrics always report the same code, even for a call cancelled just as its
deadline ran out. The wrappers drop the exception they kept for it once the call has
ended: held by a frame of its own traceback, it would keep the request (up to the receive limit's
size) in a reference cycle until the garbage collector ran.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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

# (request streaming, response streaming) -> the call's type, as go-grpc-prometheus names it
CALL_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
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


def rebuild(
    handler: grpc.RpcMethodHandler,
    behavior: Behavior,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler`, running `behavior`; with
    `request_deserializer`, that one decodes (or ignores) the request bodies instead."""
    factory = HANDLER_KINDS[handler.request_streaming, handler.response_streaming][1]
    return factory(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
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
    """Base of the interceptors that watch calls: override `watches`, `begin` and `end` (and
    `received` and `sent`, with `counts_messages` set)."""

    counts_messages = False  # whether `received` and `sent` are called (it costs a wrapper per call)

    def watches(self, method: str) -> bool:
        """Whether calls to `method` ("/package.Service/Method") are wrapped (default: all)."""
        return True

    def begin(self, context: Any, method: str, metadata: Any, call_type: str) -> Any:
        """Called on the call's task before its behaviour (`call_type`: a value of CALL_TYPES);
        returns what `end`, `received` and `sent` get as `token`."""
        return None

    def received(self, token: Any) -> None:
        """The handler took a request message (only with `counts_messages`)."""

    def sent(self, token: Any) -> None:
        """The handler gave a response message (only with `counts_messages`)."""

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
        call = _Call(
            method,
            handler_call_details.invocation_metadata,
            (handler.request_streaming, handler.response_streaming),
        )
        if inspect.isasyncgenfunction(behavior):
            return rebuild(handler, self._streaming(behavior, call))
        if inspect.iscoroutinefunction(behavior):
            # A unary response, or a stream written with context.write.
            return rebuild(handler, self._unary(behavior, call))
        return handler  # a synchronous (or malformed) handler: none of rnnserve's own

    def _begin(self, request: Any, context: Any, call: _Call) -> tuple[Any, Any, Any]:
        """`begin`, and with `counts_messages` the request (stream) and context that count."""
        token = self.begin(context, call.method, call.metadata, CALL_TYPES[call.kind])
        if self.counts_messages:
            request_streaming, response_streaming = call.kind
            if request_streaming:
                request = _CountedRequests(request, functools.partial(self.received, token))
            else:
                self.received(token)
            if request_streaming or response_streaming:  # it may read or write through its context
                context = _CountingContext(context, self, token)
        return token, request, context

    def _unary(self, behavior: Behavior, call: _Call) -> Behavior:
        async def wrapped(request: Any, context: Any) -> Any:
            _open_call_status()
            token, request, context = self._begin(request, context, call)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                code = final_status(context, error)
                if self.counts_messages and code is grpc.StatusCode.OK and not call.kind[1]:
                    self.sent(token)
                self.end(context, call.method, token, code)
                error = None  # frame -> error -> traceback -> frame: keep the request out of a cycle

        return wrapped

    def _streaming(self, behavior: Behavior, call: _Call) -> Behavior:
        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            _open_call_status()
            token, request, context = self._begin(request, context, call)
            error: BaseException | None = None
            responses = behavior(request, context)
            try:
                async for response in responses:
                    if self.counts_messages:
                        self.sent(token)
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                # Close the handler now: its own `finally` runs here, inside this call's context.
                await responses.aclose()
                self.end(context, call.method, token, final_status(context, error))
                error = None  # as in _unary

        return wrapped


@dataclass(frozen=True, slots=True)
class _Call:
    method: str  # "/package.Service/Method"
    metadata: Any  # the invocation metadata
    kind: tuple[bool, bool]  # (request streaming, response streaming)


class _CountingContext:
    """A grpc.aio context that reports the messages a handler reads and writes through it (a
    coroutine handler of a streaming response writes with context.write); all else passes through."""

    def __init__(self, context: Any, interceptor: CallInterceptor, token: Any) -> None:
        self._context = context
        self._interceptor = interceptor
        self._token = token

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:  # type: ignore[attr-defined]
            self._interceptor.received(self._token)
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._interceptor.sent(self._token)


class _CountedRequests:
    """A handler's asynchronous request stream, reporting each message the handler takes."""

    def __init__(self, requests: Any, received: Callable[[], None]) -> None:
        self._requests = requests
        self._iterator: Any = None  # made on the first read: grpc's is a generator, never to be left unrun
        self._received = received

    def __aiter__(self) -> _CountedRequests:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = aiter(self._requests)
        request = await anext(self._iterator)
        self._received()
        return request
