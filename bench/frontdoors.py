"""Front doors against rnnserve.v1 on one server: the cost of speaking KServe v2 and HTTP.

    python bench/frontdoors.py                       # 64 sequences / generations, 3 x 4 s per door
    python bench/frontdoors.py --duration 3 --concurrency 16 --arch gru

The server (gRPC and HTTP doors, CPU) runs in a child process on a synthetic seed-size model with
random weights; this process is the client, one asyncio loop. Four runs, one after the other:

1. rnnserve.v1 Stream: `--concurrency` streams, each a session fed one token per chunk (closed
   loop: the next chunk leaves when the prediction is back); answers have the top 5.
2. KServe v2 ModelStreamInfer: as many streams, each one Triton sequence (sequence_start on the
   first request), one token per request; parameter top_k 5 (top_ids, top_logprobs, next_token).
3. rnnserve.v1 Generate: `--concurrency` generations of `--new-tokens` tokens at a time, again
   and again; generated tokens per second.
4. HTTP generate_stream (server-sent events): the same generations over HTTP.

The four runs repeat `--repeat` times, interleaved. Prints, and writes as JSON to --out (default
bench/results/frontdoors-latest.json), every round's rates, their medians and the ratios of the
medians that the front doors are held to: KServe/v1 >= 0.8 and HTTP/gRPC >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.model import ModelSizes, write_synthetic_model
from bench.procs import ServerProcess, run_child
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc

MODEL = "bench-model"
HOST = "127.0.0.1"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def server_main(conn: Connection, repository: Path, http_port: int, options: Mapping[str, Any]) -> None:
    """Child process: the real server with its HTTP door on `http_port`."""

    async def start() -> tuple[Any, int]:
        from serving.frontend.server import attach_http, create_server
        from serving.settings import ServerSettings

        settings = ServerSettings(repository=repository, host=HOST, port=0, device="cpu", **options)
        server, port = await create_server(settings)
        attach_http(server, HOST, http_port)
        await server.start()
        return server, port

    run_child(conn, start, log_level="WARNING")


Tally = Callable[[int], None]


async def timed(
    workers: int, duration: float, warmup: float, work: Callable[[Tally], Awaitable[None]]
) -> float:
    """Run `workers` loops of `work`, which reports units done (steps, tokens) as they arrive
    through its tally; units per second in the counted window after the warm-up."""
    counted = 0
    counting = False
    stop = False

    def tally(units: int) -> None:
        nonlocal counted
        if counting:
            counted += units

    async def loop() -> None:
        while not stop:
            await work(tally)

    tasks = [asyncio.create_task(loop()) for _ in range(workers)]
    await asyncio.sleep(warmup)
    counting, started = True, time.perf_counter()
    await asyncio.sleep(duration)
    counting, elapsed = False, time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return counted / elapsed


async def v1_stream(target: str, args: argparse.Namespace, vocab: int) -> float:
    channel = grpc.aio.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    calls = []
    rng = np.random.default_rng(0)

    async def open_stream() -> Any:
        call = stub.Stream()
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
        await call.read()
        calls.append(call)
        return call

    streams = await asyncio.gather(*(open_stream() for _ in range(args.concurrency)))
    free = list(streams)

    async def step(tally: Tally) -> None:
        call = free.pop()
        await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[int(rng.integers(vocab))])))
        await call.read()
        free.append(call)
        tally(1)

    rate = await timed(args.concurrency, args.duration, args.warmup, step)
    for call in calls:
        await call.write(pb.StreamRequest(control=pb.CONTROL_END))
        await call.read()
        await call.done_writing()
    await channel.close(None)
    return rate


async def kserve_stream(target: str, args: argparse.Namespace, vocab: int) -> float:
    channel = grpc.aio.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(0)
    calls = []
    free: list[tuple[Any, int]] = []

    def request(sequence: int, start: bool, end: bool = False) -> service_pb2.ModelInferRequest:
        parameters = {
            "sequence_id": service_pb2.InferParameter(uint64_param=sequence),
            "sequence_start": service_pb2.InferParameter(bool_param=start),
            "sequence_end": service_pb2.InferParameter(bool_param=end),
            "top_k": service_pb2.InferParameter(int64_param=5),
        }
        return service_pb2.ModelInferRequest(
            model_name=MODEL,
            parameters=parameters,
            inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=[1, 1])
            ],
            raw_input_contents=[np.array([rng.integers(vocab)], np.int64).tobytes()],
        )

    # Each stream's continuing request is built once; only its token changes (as perf_analyzer does).
    token_bytes = [np.array([t], np.int64).tobytes() for t in range(vocab)]
    prepared: dict[int, service_pb2.ModelInferRequest] = {}

    async def open_sequence(sequence: int) -> None:
        call = stub.ModelStreamInfer()
        await call.write(request(sequence, start=True))
        answer = await call.read()
        if answer.error_message:
            raise RuntimeError(answer.error_message)
        calls.append(call)
        free.append((call, sequence))

    await asyncio.gather(*(open_sequence(1000 + i) for i in range(args.concurrency)))

    async def step(tally: Tally) -> None:
        call, sequence = free.pop()
        message = prepared.get(sequence)
        if message is None:
            message = prepared[sequence] = request(sequence, start=False)
        message.raw_input_contents[0] = token_bytes[int(rng.integers(vocab))]
        await call.write(message)
        answer = await call.read()
        if answer.error_message:
            raise RuntimeError(answer.error_message)
        free.append((call, sequence))
        tally(1)

    rate = await timed(args.concurrency, args.duration, args.warmup, step)
    for call, sequence in list(free):
        await call.write(request(sequence, start=False, end=True))
        await call.read()
        await call.done_writing()
    await channel.close(None)
    return rate


async def grpc_generate(target: str, args: argparse.Namespace) -> float:
    channel = grpc.aio.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    seeds = iter(range(10**9))

    async def generation(tally: Tally) -> None:
        request = pb.GenerateRequest(
            model=MODEL,
            prompt_tokens=[1, 2, 3],
            max_new_tokens=args.new_tokens,
            sampling=pb.SamplingOptions(seed=next(seeds)),
        )
        async for answer in stub.Generate(request):
            tally(len(answer.tokens))

    rate = await timed(args.concurrency, args.duration, args.warmup, generation)
    await channel.close(None)
    return rate


class SseConnection:
    """A minimal keep-alive HTTP/1.1 client of generate_stream on raw asyncio streams.

    httpx in this process costs more CPU than the server's whole HTTP door (measured: 4.3 s of
    client CPU against 3.2 s of server CPU for the same run), and client and server share the
    machine; this reader keeps the client's share small, as gRPC's C core does for the gRPC runs.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def generate(self, body: bytes, tally: Tally) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST /v2/models/{MODEL}/generate_stream HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"generate_stream answered {status!r}")
        while (await self.reader.readline()) != b"\r\n":  # headers; the body comes chunked
            pass
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: "):
                    tally(len(json.loads(line[6:])["token_ids"]))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def http_generate(host: str, port: int, args: argparse.Namespace) -> float:
    seeds = iter(range(10**9))
    connections = [SseConnection(host, port) for _ in range(args.concurrency)]
    free = list(connections)

    async def generation(tally: Tally) -> None:
        connection = free.pop()
        body = {"input_ids": [1, 2, 3], "parameters": {"max_tokens": args.new_tokens, "seed": next(seeds)}}
        await connection.generate(json.dumps(body).encode(), tally)
        free.append(connection)

    rate = await timed(args.concurrency, args.duration, args.warmup, generation)
    for connection in connections:
        await connection.close()
    return rate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency", type=int, default=64, help="streams / sequences / generations at once"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds counted per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before counting, per run")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--arch", choices=["lstm", "gru"], default="lstm")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of the four runs, interleaved; medians are reported"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontdoors-latest.json"))
    return parser.parse_args(argv)


async def measure(
    server: ServerProcess, http_port: int, args: argparse.Namespace, vocab: int
) -> dict[str, list[float]]:
    """Every run `--repeat` times, interleaved, so that a busy moment of the machine does not
    fall on one door only."""
    rounds: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        runs = {
            "v1_stream_steps_per_s": v1_stream(server.address, args, vocab),
            "kserve_stream_infer_per_s": kserve_stream(server.address, args, vocab),
            "grpc_generate_tokens_per_s": grpc_generate(server.address, args),
            "http_generate_stream_tokens_per_s": http_generate(HOST, http_port, args),
        }
        for name, run in runs.items():
            rounds.setdefault(name, []).append(await run)
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = ModelSizes()
    with tempfile.TemporaryDirectory(prefix="rnnserve-frontdoors-") as scratch:
        repository = Path(scratch) / "repository"
        model = write_synthetic_model(repository, MODEL, args.arch, sizes, seed=0)
        http_port = free_port(HOST)
        with ServerProcess("frontdoors-server", server_main, (repository, http_port, {}), HOST) as server:
            rounds = asyncio.run(measure(server, http_port, args, sizes.vocab_size))
    rates = {key: float(np.median(values)) for key, values in rounds.items()}
    report = {
        "model": model.describe(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "repeat": args.repeat,
        "new_tokens": args.new_tokens,
        "rounds": {key: [round(value, 1) for value in values] for key, values in rounds.items()},
        **{key: round(value, 1) for key, value in rates.items()},
        "kserve_over_v1": round(rates["kserve_stream_infer_per_s"] / rates["v1_stream_steps_per_s"], 3),
        "http_over_grpc_generate": round(
            rates["http_generate_stream_tokens_per_s"] / rates["grpc_generate_tokens_per_s"], 3
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
