"""`inference.GRPCInferenceService`: the KServe v2 protocol over gRPC, as Triton serves it.

A thin servicer: the messages come from the protobuf modules that `tritonclient` ships; every
rule (sequences, inputs, outputs, model descriptions) is in serving.frontend.kserve_common. It is
registered on the same grpc.aio server and port as rnnserve.v1, so Triton's clients and tools
(tritonclient.grpc, perf_analyzer) reach the same sessions. Errors answer the status of
serving.core.errors (`refuse`: the code, the message and an ErrorInfo with the reason, set
without raising, as rnnserve.v1 does); inside ModelStreamInfer a failed request answers an
`error_message` ("CODE REASON: message") and the stream goes on, as in Triton. A stream that
sends nothing for --stream-idle-timeout-s ends with DEADLINE_EXCEEDED (reason STREAM_IDLE), as
rnnserve.v1's Stream does; its sequences stay open.

ModelStreamInfer runs the requests of different sequences concurrently (they batch together)
and those of one sequence in order; answers carry the request's `id`, and may arrive in another
order than the requests when they belong to different sequences.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ServingError,
    StreamIdleError,
    refuse,
    status_code,
)
from serving.frontend.kserve_common import (
    NUMPY_TYPES,
    SERVER_EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferAnswer,
    InferCall,
    InputTensor,
    KServeFrontend,
    decode_raw,
    element_count,
    sequence_of,
)
from serving.frontend.servicer import Identity, IdleDeadline, MalformedRequest, no_identity, request_parser

log = logging.getLogger(__name__)

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name  # "inference.GRPCInferenceService"
METHODS = (
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStreamInfer",
    "RepositoryIndex",
    "ModelStatistics",
)
# InferTensorContents field of each datatype (FP16 travels raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: service_pb2.InferParameter) -> Any:
    """An InferParameter as a Python value (bool, int, str or float)."""
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgumentError("a request parameter has no value set", Reason.MALFORMED_REQUEST)
    return getattr(parameter, kind)


def decode_inputs(request: service_pb2.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per input",
            Reason.MALFORMED_REQUEST,
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            inputs.append(decode_raw(tensor.name, tensor.datatype, shape, raw[index]))
            continue
        field = CONTENTS_FIELDS.get(tensor.datatype)
        if field is None:
            raise InvalidArgumentError(
                f"input {tensor.name[:64]!r} has datatype {tensor.datatype[:32]!r} without a contents "
                f"field; send it in raw_input_contents",
                Reason.MALFORMED_REQUEST,
            )
        values = getattr(tensor.contents, field)
        count = element_count(tensor.name, shape)
        if len(values) != count:
            raise InvalidArgumentError(
                f"input {tensor.name[:64]!r} has {len(values)} values in {field}; "
                f"shape {shape} needs {count}",
                Reason.MALFORMED_REQUEST,
            )
        if tensor.datatype == "BYTES":
            data = np.empty(count, dtype=object)
            data[:] = list(values)
        else:
            data = np.fromiter(values, NUMPY_TYPES[tensor.datatype], count)
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(shape), data))
    return inputs


def infer_call(request: service_pb2.ModelInferRequest) -> InferCall:
    return InferCall(
        model_name=request.model_name,
        model_version=request.model_version,
        request_id=request.id,
        parameters={key: parameter_value(value) for key, value in request.parameters.items()},
        inputs=decode_inputs(request),
        outputs=[output.name for output in request.outputs],
    )


# Answers of one model version with the same outputs differ only in id and data: each is copied
# from a template (measured: 9 us against 34 us to build one from scratch, most of a request's
# protobuf work). Keyed by (model, version, ((name, datatype, shape), ...)); emptied when full.
_TEMPLATES: dict[tuple[Any, ...], service_pb2.ModelInferResponse] = {}
TEMPLATE_LIMIT = 256


def _template(answer: InferAnswer) -> service_pb2.ModelInferResponse:
    outputs = tuple((output.name, output.datatype, output.shape) for output in answer.outputs)
    key = (answer.model_name, answer.model_version, outputs)
    template = _TEMPLATES.get(key)
    if template is None:
        if len(_TEMPLATES) >= TEMPLATE_LIMIT:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = service_pb2.ModelInferResponse(
            model_name=answer.model_name,
            model_version=answer.model_version,
            outputs=[
                service_pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)
                for name, datatype, shape in outputs
            ],
        )
    return template


def fill_response(response: service_pb2.ModelInferResponse, answer: InferAnswer) -> None:
    """Write `answer` into an empty ModelInferResponse (raw output contents, as Triton answers)."""
    response.CopyFrom(_template(answer))
    if answer.request_id:
        response.id = answer.request_id
    response.raw_output_contents.extend([output.data.tobytes() for output in answer.outputs])


def infer_response(answer: InferAnswer) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse()
    fill_response(response, answer)
    return response


def add_kserve_servicer(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register inference.GRPCInferenceService's methods that rnnserve serves (the others, such as
    shared memory and model load/unload, answer UNIMPLEMENTED). A body that does not parse as its
    message answers INVALID_ARGUMENT (see serving.frontend.servicer.MalformedRequest)."""
    handlers = {}
    for name in METHODS:
        method = SERVICE.methods_by_name[name]
        factory = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = factory(
            getattr(servicer, name),
            request_deserializer=request_parser(getattr(service_pb2, method.input_type.name)),
            response_serializer=getattr(service_pb2, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def _check_parsed(request: object) -> None:
    if type(request) is MalformedRequest:
        raise request.error()


class KServeServicer:
    """inference.GRPCInferenceService on a KServeFrontend; `identity` names the session owner."""

    def __init__(self, frontend: KServeFrontend, identity: Identity = no_identity) -> None:
        self.frontend = frontend
        self.identity = identity

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.frontend.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=SERVER_EXTENSIONS
        )

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            _check_parsed(request)
            ready = self.frontend.model_ready(request.name, request.version)
        except ServingError as error:
            refuse(context, error)
            return None
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            _check_parsed(request)
            metadata = self.frontend.metadata(request.name, request.version)
        except ServingError as error:
            refuse(context, error)
            return None
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            _check_parsed(request)
            config = self.frontend.config(request.name, request.version)
        except ServingError as error:
            refuse(context, error)
            return None
        return service_pb2.ModelConfigResponse(
            config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if type(request) is MalformedRequest:
            refuse(context, request.error())
            return None
        models = self.frontend.repository_index()
        if request.ready:
            models = [model for model in models if model["state"] == "READY"]
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(**model) for model in models]
        )

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            _check_parsed(request)
            entries = self.frontend.model_statistics(request.name, request.version)
        except ServingError as error:
            refuse(context, error)
            return None
        duration = service_pb2.StatisticDuration
        return service_pb2.ModelStatisticsResponse(
            model_stats=[
                service_pb2.ModelStatistics(
                    name=model.name,
                    version=str(model.version),
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.inference_count,
                    execution_count=stats.execution_count,
                    inference_stats=service_pb2.InferStatistics(
                        success=duration(count=stats.success_count, ns=stats.success_ns),
                        fail=duration(count=stats.fail_count, ns=stats.fail_ns),
                    ),
                )
                for model, stats in entries
            ]
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            _check_parsed(request)
            answer = await self.frontend.infer(infer_call(request), self.identity(context))
        except ServingError as error:
            refuse(context, error)
            return None
        return infer_response(answer)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        # Reads with context.read() and answers with context.write() from each request's task
        # (one write at a time): no queue between the tasks and the call (measured: a third less
        # event-loop work per request than an answer queue drained by a response generator).
        owner = self.identity(context)
        tails: dict[object, asyncio.Task[None]] = {}  # sequence key -> its last request's task
        tasks: set[asyncio.Task[None]] = set()
        writing = asyncio.Lock()

        async def answer(request: Any, before: asyncio.Task[None] | None) -> None:
            if before is not None:
                await asyncio.wait({before})  # the sequence's previous request goes first
            try:
                _check_parsed(request)
                result = await self.frontend.infer(infer_call(request), owner)
                response = service_pb2.ModelStreamInferResponse()
                fill_response(response.infer_response, result)
            except ServingError as error:
                response = failed(request, f"{status_code(error).name} {error.reason.value}: {error}")
            except Exception:  # answered, so the client does not wait for this request forever
                log.exception("ModelStreamInfer request failed")
                response = failed(request, "INTERNAL: the request failed inside the server")
            async with writing:
                await context.write(response)

        def failed(request: Any, message: str) -> service_pb2.ModelStreamInferResponse:
            return service_pb2.ModelStreamInferResponse(
                error_message=message,
                infer_response=service_pb2.ModelInferResponse(
                    model_name=getattr(request, "model_name", ""), id=getattr(request, "id", "")
                ),
            )

        def forget(key: object, done: asyncio.Task[None]) -> None:
            if tails.get(key) is done:
                del tails[key]

        loop = asyncio.get_running_loop()
        idle = IdleDeadline(self.frontend.runtime.settings.stream_idle_timeout_s)
        try:
            while True:
                idle.start()
                try:
                    request = await context.read()
                except asyncio.CancelledError:
                    if not idle.expired():
                        raise
                    refuse(
                        context,
                        StreamIdleError(
                            f"the stream sent nothing for {idle.timeout_s:g} s (--stream-idle-timeout-s); "
                            f"its sequences stay open: continue them on a new stream"
                        ),
                    )
                    return
                finally:
                    idle.stop()
                if request is grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lacks EOF
                    break
                key = self._sequence_key(request)
                task = loop.create_task(answer(request, tails.get(key)))
                if key is not None:
                    tails[key] = task
                    task.add_done_callback(functools.partial(forget, key))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):
                task.cancel()

    @staticmethod
    def _sequence_key(request: Any) -> object:
        """Requests with the same key run in order: one per (model, sequence id)."""
        if type(request) is MalformedRequest:
            return None
        try:
            sequence_id = sequence_of(
                {k: parameter_value(v) for k, v in request.parameters.items() if k == "sequence_id"}
            )
        except ServingError:
            return None
        return None if sequence_id is None else (request.model_name, sequence_id)
