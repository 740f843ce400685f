"""The gRPC servicer of rnnserve.v1.Inference: protobuf in, an InferenceApi call, protobuf out.

Every handler turns a ServingError into its status with `errors.refuse`: the code, the error's
message and an ErrorInfo with its reason, set without raising (so a refused request is freed at
once), after which the handler returns; nothing else is decided here. `identity(context)`
names the caller for session ownership (None while auth is off; the auth layer supplies its own
function).

Register the servicer with `add_inference_servicer`, not the generated
`add_InferenceServicer_to_server`: a request body that is not the method's protobuf message then
answers INVALID_ARGUMENT naming the message type, where grpc's own deserializer answers UNKNOWN
("Unexpected <class 'DecodeError'>"), a code clients cannot act on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from contract.sampling import Sampling
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc
from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ServingError,
    SessionNotFoundError,
    StreamIdleError,
    StreamOrderError,
    UnavailableError,
    refuse,
)
from serving.core.interface import (
    GenerateRequestFields,
    InferenceApi,
    ModelInfo,
    ModelVersionInfo,
    Prediction,
    SessionRef,
    StepOptions,
)
from serving.frontend.affinity import check_affinity, proposed_session_id
from serving.ops.interceptor import HANDLER_KINDS
from serving.settings import ServerSettings

Identity = Callable[[grpc.aio.ServicerContext], "str | None"]


def no_identity(context: grpc.aio.ServicerContext) -> str | None:
    return None


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request body that does not parse as its method's protobuf message.

    The request deserializer returns it instead of raising, so the handler can answer
    INVALID_ARGUMENT (a raising deserializer makes grpc answer UNKNOWN).
    """

    message_type: str  # e.g. "rnnserve.v1.StepRequest"
    reason: str  # protobuf's reason, e.g. "Wire format was corrupt"

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"the request body is not a valid {self.message_type} protobuf message: {self.reason}",
            Reason.MALFORMED_REQUEST,
        )


def request_parser(message_class: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that answers a MalformedRequest instead of raising DecodeError."""
    message_type = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            # upb says "Error parsing message with type 'T': <reason>"; T is in our message already.
            return MalformedRequest(message_type, str(error).rpartition("': ")[2] or str(error))

    return parse


def add_inference_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register rnnserve.v1.Inference on `server` (the generated registration, with request
    deserializers that let malformed bodies reach the handler as a MalformedRequest)."""
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    handlers = {
        method.name: HANDLER_KINDS[method.client_streaming, method.server_streaming][1](
            getattr(servicer, method.name),
            request_deserializer=request_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # As the generated code does: calls from generated stubs then skip the generic lookup.
    # (grpc-stubs does not know this grpcio >= 1.62 method.)
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


def _check_parsed(request: object) -> None:
    """Raise InvalidArgumentError for a body that did not parse (see MalformedRequest)."""
    if type(request) is MalformedRequest:
        raise request.error()


def sampling_fields(options: pb.SamplingOptions) -> Sampling:
    return Sampling(
        temperature=options.temperature if options.HasField("temperature") else None,
        top_k=options.top_k,
        top_p=options.top_p if options.HasField("top_p") else None,
        seed=options.seed if options.HasField("seed") else None,
    )


def prediction_message(prediction: Prediction) -> pb.Prediction:
    return pb.Prediction(
        top_ids=prediction.top_ids,
        top_logprobs=prediction.top_logprobs,
        logits=prediction.logits,
        sampled_token=prediction.sampled_token,
        position=prediction.position,
    )


def step_options(options: pb.PredictionOptions) -> StepOptions:
    sampling = sampling_fields(options.sampling) if options.HasField("sampling") else None
    return StepOptions(options.top_k, options.return_logits, sampling)


def version_message(info: ModelVersionInfo) -> pb.ModelVersion:
    return pb.ModelVersion(
        version=info.version,
        arch=info.arch,
        vocab_size=info.vocab_size,
        embedding_size=info.embedding_size,
        hidden_size=info.hidden_size,
        num_layers=info.num_layers,
        pad_id=info.pad_id,
        precision=info.precision,
        tokenizer_json=info.tokenizer_json,
        state=[pb.StateTensor(name=state.name, shape=state.shape) for state in info.state],
        model_sha256=info.model_sha256,
        active_sessions=info.active_sessions,
        metrics_json=info.metrics_json,
    )


def model_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        latest_version=info.latest_version,
        versions=[version_message(version) for version in info.versions],
    )


class IdleDeadline:
    """Cancels the running task when one wait lasts longer than `timeout_s` (0: never).

    A Stream arms it around each read of the next request. A timer per read costs about 3 us;
    asyncio.wait_for, which runs each read in a task of its own, cost 23 us more per message.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def start(self) -> None:
        if self.timeout_s > 0 and self._task is not None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expired(self) -> bool:
        """Whether the deadline cancelled the task; the task then counts as no longer cancelled."""
        if self._expired and self._task is not None:
            self._expired = False
            self._task.uncancel()
            return True
        return False

    def _expire(self) -> None:
        self._timer = None
        if self._task is not None:
            self._expired = True
            self._task.cancel()


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """rnnserve.v1.Inference on an InferenceApi (the core in this process, or the engine core).

    `settings` gives the Stream's timings: --stream-end-linger-s and --stream-idle-timeout-s.
    """

    def __init__(self, api: InferenceApi, identity: Identity, settings: ServerSettings) -> None:
        self.api = api
        self.identity = identity
        self.settings = settings
        self._background: set[asyncio.Task[None]] = set()

    def _release_later(self, ref: SessionRef, ended: bool) -> None:
        """End a stream's hold on its session from a handler that is being torn down (the core
        closes the session when the server closes sessions on disconnect)."""
        task = asyncio.get_running_loop().create_task(self._release_quietly(ref, ended))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_quietly(self, ref: SessionRef, ended: bool) -> None:
        try:
            await self.api.release(ref, ended)
        except SessionNotFoundError:
            # Another request (CloseSession, an expiry) ended the session meanwhile: it is gone,
            # which is what this release wanted. Nobody awaits this task, so the error would
            # otherwise surface as "Task exception was never retrieved".
            return
        except UnavailableError:
            # The server is shutting down (it froze its sessions, which stay open for the
            # shutdown snapshot), or the engine core is gone and with it the stream's binding.
            return

    async def Stream(  # noqa: N802 (a gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamResponse]:
        api = self.api
        owner = self.identity(context)
        metadata = context.invocation_metadata()  # x-session-id: the stream's session (affinity)
        session: SessionRef | None = None
        ended = False
        requests = aiter(request_iterator)
        idle = IdleDeadline(self.settings.stream_idle_timeout_s)
        try:
            while True:
                idle.start()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not idle.expired():
                        raise
                    ended = True  # ended by the server: the session stays, whatever the settings
                    message = f"the stream sent nothing for {idle.timeout_s:g} s (--stream-idle-timeout-s)"
                    if session is None:
                        refuse(context, StreamIdleError(message))
                    else:
                        kept = f"{message}; session {session.id} stays open: resume it"
                        refuse(context, StreamIdleError(kept, sessionId=session.id))
                    return
                finally:
                    idle.stop()
                if type(request) is MalformedRequest:
                    raise request.error()
                kind = request.WhichOneof("kind")
                if kind == "chunk":
                    if session is None:
                        raise StreamOrderError(
                            "a chunk arrived before open or resume: the first message of a stream "
                            "must open or resume a session"
                        )
                    prediction = await api.step(session, request.chunk.tokens)
                    yield pb.StreamResponse(
                        session_id=session.id,
                        model=session.model,
                        version=session.version,
                        event=pb.STREAM_EVENT_PREDICTION,
                        prediction=prediction_message(prediction),
                    )
                elif kind in ("open", "resume"):
                    if session is not None:
                        raise StreamOrderError(
                            f"this stream already carries session {session.id}; "
                            f"one stream carries one session (open another stream)"
                        )
                    if kind == "open":
                        if not request.open.model:
                            raise InvalidArgumentError(
                                "open needs a model name (see ListModels)", Reason.MALFORMED_REQUEST
                            )
                        session = await api.open_session(
                            request.open.model,
                            request.open.version,
                            owner,
                            proposed_session_id(metadata),
                            step_options(request.open.options),  # validated before opening
                        )
                        event = pb.STREAM_EVENT_OPENED
                    else:
                        check_affinity(metadata, request.resume.session_id)
                        session = await api.resume(
                            request.resume.session_id, owner, step_options(request.resume.options)
                        )
                        event = pb.STREAM_EVENT_RESUMED
                    # The position tells a resuming client which of its chunks the session has
                    # consumed (one whose answer a lost connection swallowed, or none).
                    yield pb.StreamResponse(
                        session_id=session.id,
                        model=session.model,
                        version=session.version,
                        event=event,
                        prediction=pb.Prediction(position=session.position),
                    )
                elif kind == "control":
                    if session is None:
                        raise StreamOrderError(
                            "a control arrived before open or resume: the first "
                            "message of a stream must open or resume a session"
                        )
                    if request.control == pb.CONTROL_RESET:
                        await api.reset(session)
                        event = pb.STREAM_EVENT_RESET
                    elif request.control == pb.CONTROL_END:
                        await api.close(session.id, owner)
                        ended, event = True, pb.STREAM_EVENT_ENDED
                    else:
                        raise InvalidArgumentError(
                            "control must be CONTROL_RESET or CONTROL_END", Reason.MALFORMED_REQUEST
                        )
                    yield pb.StreamResponse(
                        session_id=session.id,
                        model=session.model,
                        version=session.version,
                        event=event,
                    )
                    if ended:
                        await self._after_end(requests, session)
                        return
                else:
                    raise InvalidArgumentError(
                        "empty StreamRequest: set one of open, resume, chunk or control",
                        Reason.MALFORMED_REQUEST,
                    )
        except ServingError as error:
            refuse(context, error)
        finally:
            if session is not None:
                self._release_later(session, ended)

    async def _after_end(self, requests: AsyncIterator[pb.StreamRequest], session: SessionRef) -> None:
        """After CONTROL_END the stream ends when the client half-closes (or after the linger);
        a request arriving meanwhile is an error the client should hear about."""
        try:
            await asyncio.wait_for(anext(requests), self.settings.stream_end_linger_s)
        except (StopAsyncIteration, asyncio.TimeoutError):  # the same class from Python 3.11
            return
        raise StreamOrderError(
            f"a request followed CONTROL_END on this stream; session {session.id} "
            f"has ended (open or resume a session on a new stream)"
        )

    async def Generate(  # noqa: N802 (a gRPC method name)
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            _check_parsed(request)
            metadata = context.invocation_metadata()
            if request.session_id:
                check_affinity(metadata, request.session_id)
            fields = GenerateRequestFields(
                model=request.model,
                version=request.version,
                session_id=request.session_id,
                prompt_tokens=request.prompt_tokens,
                prompt_text=request.prompt_text,
                max_new_tokens=request.max_new_tokens,
                sampling=sampling_fields(request.sampling),
                stop_tokens=request.stop_tokens,
                keep_session=request.keep_session,
                new_session_id=proposed_session_id(metadata) if request.keep_session else None,
            )
            generation = await self.api.generate(fields, self.identity(context))
        except ServingError as error:
            refuse(context, error)
            return
        try:
            async for chunk in generation.chunks():
                yield pb.GenerateResponse(
                    session_id=generation.session_id,
                    model=generation.model,
                    version=generation.version,
                    tokens=chunk.tokens,
                    text=chunk.text,
                    finish_reason=pb.FinishReason.Name(chunk.finish_reason),
                )
        except ServingError as error:
            refuse(context, error)
        finally:
            generation.cancel()  # a no-op once finished; stops the work when the client went away

    async def CreateSession(  # noqa: N802 (a gRPC method name)
        self,
        request: pb.CreateSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.CreateSessionResponse | None:
        try:
            _check_parsed(request)
            proposed = proposed_session_id(context.invocation_metadata())
            session = await self.api.open_session(
                request.model, request.version, self.identity(context), proposed
            )
        except ServingError as error:
            refuse(context, error)
            return None
        return pb.CreateSessionResponse(session_id=session.id, model=session.model, version=session.version)

    async def Step(  # noqa: N802 (a gRPC method name)
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse | None:
        try:
            _check_parsed(request)
            check_affinity(context.invocation_metadata(), request.session_id)
            session, prediction = await self.api.step_once(
                request.session_id, self.identity(context), request.tokens, step_options(request.options)
            )
        except ServingError as error:
            refuse(context, error)
            return None
        return pb.StepResponse(
            session_id=session.id,
            model=session.model,
            version=session.version,
            prediction=prediction_message(prediction),
        )

    async def CloseSession(  # noqa: N802 (a gRPC method name)
        self,
        request: pb.CloseSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.CloseSessionResponse | None:
        try:
            _check_parsed(request)
            check_affinity(context.invocation_metadata(), request.session_id)
            await self.api.close(request.session_id, self.identity(context))
        except ServingError as error:
            refuse(context, error)
            return None
        return pb.CloseSessionResponse()

    async def ListModels(  # noqa: N802 (a gRPC method name)
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListModelsResponse | None:
        try:
            _check_parsed(request)
            models = await self.api.list_models()
        except ServingError as error:
            refuse(context, error)
            return None
        return pb.ListModelsResponse(models=[model_message(info) for info in models])

    async def GetModel(  # noqa: N802 (a gRPC method name)
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo | None:
        try:
            _check_parsed(request)
            info = await self.api.get_model(request.name, request.version)
        except ServingError as error:
            refuse(context, error)
            return None
        return model_message(info)
