"""`rnnserve serve --frontends N` measured: closed-loop Stream load on several connections against
N = 0 (one process), 1, 2, ..., with the server's CPU summed over all of its processes.

Each stream sends one token per message and waits for its prediction (greedy feedback is not
needed for the server's cost); streams are spread over `--connections` gRPC channels, because one
channel is one TCP connection and so reaches one front end. Server CPU comes from /proc (user +
system time of the supervisor and every process it started), read around the counted window.

    python -m bench.frontends --repository REPO --model NAME [--frontends 0,1,2] [--streams 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and its direct children (the supervisor's processes)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) * TICK_S
    return total


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _ready(target: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                await pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise RuntimeError(f"the server at {target} did not answer within {timeout_s:g} s")


async def closed_loop(
    target: str, model: str, streams: int, connections: int, warmup_s: float, duration_s: float, pid: int
) -> dict[str, float]:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(min(connections, streams))
    ]
    latencies: list[int] = []
    counted = 0
    start = time.perf_counter_ns() + int(warmup_s * 1e9)
    end = start + int(duration_s * 1e9)

    async def client(index: int) -> None:
        nonlocal counted
        stub = pb_grpc.InferenceStub(channels[index % len(channels)])
        call = stub.Stream()
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=model)))
        await call.read()
        token = index % 7
        while True:
            sent = time.perf_counter_ns()
            if sent >= end:
                break
            await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[token])))
            reply = await call.read()
            received = time.perf_counter_ns()
            token = reply.prediction.top_ids[0]
            if start <= sent and received < end:
                counted += 1
                latencies.append(received - sent)
        await call.write(pb.StreamRequest(control=pb.CONTROL_END))
        await call.done_writing()
        while isinstance(await call.read(), pb.StreamResponse):
            pass

    tasks = [asyncio.create_task(client(i)) for i in range(streams)]
    await asyncio.sleep(warmup_s)
    cpu_before = process_tree_cpu_s(pid)
    await asyncio.sleep(duration_s)
    cpu_after = process_tree_cpu_s(pid)
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close(None)
    latencies.sort()
    return {
        "streams": streams,
        "messages_per_s": counted / duration_s,
        "tokens_per_s": counted / duration_s,
        "p50_ms": statistics.median(latencies) / 1e6 if latencies else float("nan"),
        "p50_us": statistics.median(latencies) / 1e3 if latencies else float("nan"),
        "p99_us": latencies[int(len(latencies) * 0.99)] / 1e3 if latencies else float("nan"),
        "cpu_us_per_token": (cpu_after - cpu_before) / max(counted, 1) * 1e6,
    }


class ServeProcess:
    """`rnnserve serve --frontends N` in a child process, on a free port; a context manager."""

    def __init__(self, repository: Path, host: str, frontends: int) -> None:
        self.port = _free_port()
        self.target = f"{host}:{self.port}"
        command = [
            sys.executable, "-m", "serving.cli", "serve", "--repository", str(repository), "--host", host,
            "--port", str(self.port), "--frontends", str(frontends), "--metrics-port", "0",
            "--reload-interval-s", "0", "--log-level", "WARNING",
        ]  # fmt: skip
        self.process = subprocess.Popen(command)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


FRONTEND_COUNTS = (1, 2)
SCALING_STREAMS = 256


async def run_frontends_scenario(bench: Any) -> dict[str, Any]:
    """The `frontends` scenario of `rnnserve bench`: SCALING_STREAMS streams (and 1) against
    `--frontends 1` and `--frontends 2`, server CPU summed over all server processes."""
    bench.stop_server()  # the in-process server would compete for the cores
    config = bench.config
    section: dict[str, Any] = {}
    for model in bench.models:
        for frontends in FRONTEND_COUNTS:
            with ServeProcess(bench.repository, config.host, frontends) as server:
                await _ready(server.target)
                sweep = [
                    await closed_loop(
                        server.target,
                        model.name,
                        streams,
                        8,
                        config.warmup_s,
                        config.duration_s,
                        server.process.pid,
                    )
                    for streams in (1, SCALING_STREAMS)
                ]
            section[f"{model.name} --frontends {frontends}"] = {
                "sweep": sweep,
                "note": "server CPU µs/token: " + ", ".join(f"{p['cpu_us_per_token']:.0f}" for p in sweep),
            }
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--frontends", default="0,1,2", help="comma-separated N values")
    parser.add_argument("--streams", default="1,64", help="comma-separated stream counts")
    parser.add_argument("--connections", type=int, default=8, help="gRPC connections the streams share")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    print("| --frontends | streams | tokens/s | p50 ms | server CPU µs/token |")
    print("|---|---|---|---|---|")
    for frontends in (int(n) for n in args.frontends.split(",")):
        port = _free_port()
        command = [
            sys.executable, "-m", "serving.cli", "serve", "--repository", str(args.repository),
            "--port", str(port), "--frontends", str(frontends), "--metrics-port", "0",
            "--reload-interval-s", "0", "--log-level", "WARNING",
        ]  # fmt: skip
        server = subprocess.Popen(command)
        target = f"127.0.0.1:{port}"
        try:
            asyncio.run(_ready(target))
            for streams in (int(n) for n in args.streams.split(",")):
                point = asyncio.run(
                    closed_loop(
                        target, args.model, streams, args.connections, args.warmup, args.duration, server.pid
                    )
                )
                print(
                    f"| {frontends} | {streams} | {point['tokens_per_s']:,.0f} | {point['p50_ms']:.2f} "
                    f"| {point['cpu_us_per_token']:.0f} |",
                    flush=True,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
