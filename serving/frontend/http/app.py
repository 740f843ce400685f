"""The HTTP front end's routes (Starlette): KServe v2 REST, Triton's generate extension, the playground.

    GET  /v2/health/live, /v2/health/ready, /v2               server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}]                     model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready, .../config   readiness, Triton model configuration
    GET  /v2/models[/{name}[/versions/{v}]]/stats             statistics (Triton's extension)
    POST /v2/repository/index                                 the loaded model versions
    POST /v2/models/{name}[/versions/{v}]/infer               inference, sequences as in kserve_common
    POST /v2/models/{name}[/versions/{v}]/generate            text generation, one JSON answer
    POST /v2/models/{name}[/versions/{v}]/generate_stream     the same as server-sent events
    GET  /                                                    the playground page

Errors answer the HTTP status of the gRPC code the other doors give (400 INVALID_ARGUMENT,
401 UNAUTHENTICATED, 404 NOT_FOUND, 409 ALREADY_EXISTS, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE,
500 INTERNAL) and `{"error": "...", "reason": "..."}`, the reason being the ErrorInfo reason gRPC
answers for the same case. With bearer tokens configured, every route but the health checks and the
playground page needs `Authorization: Bearer TOKEN`, and a token's identity owns its sessions,
as on gRPC.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ResourceExhaustedError,
    ServingError,
    UnauthenticatedError,
    status_code,
)
from serving.core.runtime import Generation
from serving.frontend.affinity import check_affinity, proposed_session_id
from serving.frontend.http import codec
from serving.frontend.http.generate import GenerateRequest, parse_generate
from serving.frontend.kserve_common import SERVER_EXTENSIONS, SERVER_NAME, SERVER_VERSION, KServeFrontend
from serving.ops.auth import TokenTable, bearer_token
from serving.settings import ServerSettings

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
# The largest body the door reads (`body_limit`): a token id or a character of text takes at most
# this many bytes of JSON (a non-BMP character escaped as two \\uXXXX; an id and its comma are
# shorter), and the other fields at most FIXED_BODY_BYTES.
JSON_BYTES_PER_TOKEN = 12
FIXED_BODY_BYTES = 4096
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer events

Handler = Callable[[Request], Awaitable[Response]]


def body_limit(settings: ServerSettings) -> int:
    """The largest request body read: --max-message-bytes when set, else the largest legal request,
    a generate body whose text_input and stop_token_ids each hold --max-tokens-per-request
    characters or ids:

        2 * max_tokens_per_request * JSON_BYTES_PER_TOKEN + FIXED_BODY_BYTES

    (a KServe infer body of as many INT64 ids, as JSON or as binary data, is smaller). A larger
    body is refused before it is read whole: its declared Content-Length first, else as it arrives.
    """
    if settings.max_message_bytes:
        return settings.max_message_bytes
    return 2 * settings.max_tokens_per_request * JSON_BYTES_PER_TOKEN + FIXED_BODY_BYTES


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes; ResourceExhaustedError beyond that."""

    def too_large(size: str) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"the request body has {size} bytes, over this server's limit of {limit} "
            f"(from --max-tokens-per-request, or --max-message-bytes)",
            Reason.TOO_MANY_TOKENS,
            limit=limit,
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def error_body(error: ServingError) -> dict[str, str]:
    """The JSON of a refusal: the message, and the ErrorInfo reason gRPC answers for the same case."""
    return {"error": str(error), "reason": error.reason.value}


def error_response(error: ServingError) -> JSONResponse:
    """A refusal with the HTTP status of the error's gRPC code (the table above)."""
    return JSONResponse(error_body(error), status_code=HTTP_STATUS.get(status_code(error), 500))


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value), status_code=status, media_type="application/json")


def playground_html() -> str:
    return resources.files("serving.frontend.http").joinpath("static/playground.html").read_text("utf-8")


class HttpApi:
    """The routes over a KServeFrontend; `tokens` (None: auth off) name each caller."""

    def __init__(self, frontend: KServeFrontend, tokens: TokenTable | None = None) -> None:
        self.frontend = frontend
        self.runtime = frontend.runtime
        self.tokens = tokens
        self.body_limit = body_limit(frontend.runtime.settings)

    def app(self) -> Starlette:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        routes = [
            Route("/", self.playground, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/stats", self.statistics, methods=["GET"]),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
        ]
        for prefix in (model, versioned):
            routes += [
                Route(prefix, self.model_metadata, methods=["GET"]),
                Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                Route(prefix + "/config", self.model_config, methods=["GET"]),
                Route(prefix + "/stats", self.statistics, methods=["GET"]),
                Route(prefix + "/infer", self.infer, methods=["POST"]),
                Route(prefix + "/generate", self.generate, methods=["POST"]),
                Route(prefix + "/generate_stream", self.generate_stream, methods=["POST"]),
            ]
        return Starlette(routes=routes)

    def owner(self, request: Request) -> str | None:
        """The caller's identity; raises UnauthenticatedError when tokens are on and it has none."""
        if self.tokens is None:
            return None
        token = bearer_token([("authorization", request.headers.get("authorization", ""))])
        if token is None:
            raise UnauthenticatedError(
                "this server needs a bearer token: send the header 'Authorization: Bearer <token>'",
                Reason.BEARER_TOKEN_MISSING,
            )
        identity = self.tokens.identify(token)
        if identity is None:
            raise UnauthenticatedError(
                "the bearer token is not valid on this server", Reason.BEARER_TOKEN_INVALID
            )
        return identity

    @staticmethod
    def _model(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params.get("version", "")

    # ----- health and descriptions ------------------------------------------------------------

    async def playground(self, request: Request) -> Response:
        return HTMLResponse(playground_html())

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.frontend.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        try:
            self.owner(request)
        except ServingError as error:
            return error_response(error)
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)})

    async def model_metadata(self, request: Request) -> Response:
        try:
            self.owner(request)
            return _json(self.frontend.metadata(*self._model(request)))
        except ServingError as error:
            return error_response(error)

    async def model_ready(self, request: Request) -> Response:
        try:
            self.owner(request)
            name, version = self._model(request)
            ready = self.frontend.model_ready(name, version)
        except ServingError as error:
            return error_response(error)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        try:
            self.owner(request)
            return _json(self.frontend.config(*self._model(request)))
        except ServingError as error:
            return error_response(error)

    async def statistics(self, request: Request) -> Response:
        try:
            self.owner(request)
            name = request.path_params.get("name", "")
            entries = self.frontend.model_statistics(name, request.path_params.get("version", ""))
        except ServingError as error:
            return error_response(error)
        return _json(
            {
                "model_stats": [
                    {
                        "name": model.name,
                        "version": str(model.version),
                        "last_inference": stats.last_inference_ms,
                        "inference_count": stats.inference_count,
                        "execution_count": stats.execution_count,
                        "inference_stats": {
                            "success": {"count": stats.success_count, "ns": stats.success_ns},
                            "fail": {"count": stats.fail_count, "ns": stats.fail_ns},
                        },
                    }
                    for model, stats in entries
                ]
            }
        )

    async def repository_index(self, request: Request) -> Response:
        try:
            self.owner(request)
            body = await read_body(request, self.body_limit)
            options = codec.parse_json(body, "repository index") if body else {}
            if not isinstance(options, dict):
                raise InvalidArgumentError(
                    "the repository index body must be a JSON object", Reason.MALFORMED_REQUEST
                )
        except ServingError as error:
            return error_response(error)
        models = self.frontend.repository_index()
        if options.get("ready") is True:
            models = [model for model in models if model["state"] == "READY"]
        return _json(models)

    # ----- inference --------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        try:
            owner = self.owner(request)
            call, binary_output, choices = codec.decode_request(
                *self._model(request),
                await read_body(request, self.body_limit),
                request.headers.get(codec.HEADER_LENGTH),
            )
            answer = await self.frontend.infer(call, owner)
        except ServingError as error:
            return error_response(error)
        body, header_length = codec.encode_answer(answer, binary_output, choices)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    async def _start_generation(self, request: Request) -> tuple[GenerateRequest, Generation]:
        owner = self.owner(request)
        name, version = self._model(request)
        body = codec.parse_json(await read_body(request, self.body_limit), "generate request")
        parsed = await parse_generate(self.frontend, name, version, body, owner)
        headers = list(request.headers.items())
        if parsed.params.session_id:
            check_affinity(headers, parsed.params.session_id)
        elif parsed.params.keep_session and parsed.params.new_session_id is None:
            parsed = parsed.with_new_session_id(proposed_session_id(headers))
        generation = await self.runtime.generate(parsed.params, owner)
        return parsed, generation

    async def generate(self, request: Request) -> Response:
        try:
            parsed, generation = await self._start_generation(request)
        except ServingError as error:
            return error_response(error)
        tokens: list[int] = []
        texts: list[str] = []
        finish = None
        try:
            async for chunk in generation.chunks():
                tokens += chunk.tokens
                texts.append(chunk.text)
                finish = chunk.finish_reason
            await parsed.finished(self.runtime, generation)
        except ServingError as error:
            return error_response(error)
        finally:
            generation.cancel()
        return _json(parsed.event(generation, "".join(texts), tokens, finish))

    async def generate_stream(self, request: Request) -> Response:
        try:
            parsed, generation = await self._start_generation(request)
        except ServingError as error:
            return error_response(error)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in generation.chunks():
                    if chunk.finish_reason is not None:
                        await parsed.finished(self.runtime, generation)
                    event = parsed.event(generation, chunk.text, chunk.tokens, chunk.finish_reason)
                    yield b"data: " + json.dumps(event).encode() + b"\n\n"
            except ServingError as error:
                yield b"data: " + json.dumps(error_body(error)).encode() + b"\n\n"
            finally:
                generation.cancel()  # a no-op once finished; stops the work when the client left

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
