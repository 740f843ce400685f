"""The transport's limit: a grpc.aio server that speaks rnnserve's Stream RPC without inference.

It answers each StreamRequest as the real server would, with messages of the same shape, but
the prediction is canned: as many top ids and log-probabilities as the stream's options ask for
(5 by default), the full logits when asked, a sampled token when asked. What it measures is what
gRPC, protobuf and asyncio cost per message on this machine; the real server cannot beat it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.procs import run_child
from contract.session_id import new_session_id
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TOP_K = 5  # the server's default when PredictionOptions.top_k is 0
# A typical position (a varint of 3 bytes), so canned replies are as long as real ones.
CANNED_POSITION = 20_000


def canned_prediction(options: pb.PredictionOptions, vocab_size: int) -> pb.Prediction:
    """A prediction shaped like the real server's reply to OPTIONS (values are arbitrary)."""
    top_k = min(options.top_k or DEFAULT_TOP_K, vocab_size)
    prediction = pb.Prediction(
        top_ids=list(range(top_k)),
        top_logprobs=[-1.5 - 0.25 * rank for rank in range(top_k)],
        position=CANNED_POSITION,
    )
    if options.return_logits:
        prediction.logits.extend([0.125] * vocab_size)
    if options.HasField("sampling"):
        prediction.sampled_token = 0
    return prediction


class EchoServicer(pb_grpc.InferenceServicer):
    """Stream only: opens a pretend session and answers every chunk with a canned prediction."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    async def Stream(  # noqa: N802 (the gRPC method name)
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamResponse]:
        prediction_reply: pb.StreamResponse | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind in ("open", "resume"):
                opening = kind == "open"
                options = request.open.options if opening else request.resume.options
                session_id = new_session_id() if opening else request.resume.session_id
                model = request.open.model if opening else "echo"
                # One reply object per stream, reused for every chunk: the echo measures the
                # transport, not message building.
                prediction_reply = pb.StreamResponse(
                    session_id=session_id,
                    model=model,
                    version=1,
                    event=pb.STREAM_EVENT_PREDICTION,
                    prediction=canned_prediction(options, self.vocab_size),
                )
                event = pb.STREAM_EVENT_OPENED if opening else pb.STREAM_EVENT_RESUMED
                yield pb.StreamResponse(session_id=session_id, model=model, version=1, event=event)
            elif prediction_reply is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the first message of a stream must open or resume a session",
                )
            elif kind == "chunk":
                if not request.chunk.tokens:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a chunk needs at least one token")
                yield prediction_reply
            elif request.control == pb.CONTROL_RESET:
                yield pb.StreamResponse(session_id=prediction_reply.session_id, event=pb.STREAM_EVENT_RESET)
            elif request.control == pb.CONTROL_END:
                yield pb.StreamResponse(session_id=prediction_reply.session_id, event=pb.STREAM_EVENT_ENDED)
                return
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control {request.control}")


async def start_echo_server(host: str, vocab_size: int) -> tuple[grpc.aio.Server, int]:
    """A started echo server on HOST at an ephemeral port."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(EchoServicer(vocab_size), server)
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise RuntimeError(f"could not bind the echo server to {host}")
    await server.start()
    return server, port


def echo_process_main(conn: Connection, host: str, vocab_size: int) -> None:
    """Child-process target (see bench.procs): the echo server until told to stop."""
    run_child(conn, lambda: start_echo_server(host, vocab_size), log_level="WARNING")
