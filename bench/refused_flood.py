"""Refused-request flood: the largest requests a server decodes and then refuses, from many clients.

    python bench/refused_flood.py                                   # 8 clients x 20 s, then 10 s idle
    python bench/refused_flood.py --server-option max_message_bytes=4194304   # the old fixed limit

The server runs in a child process (bench.server, on a synthetic tiny model). Each client
holds one session and sends, back to back, a Step just under the server's receive limit filled
with one-byte token ids: gRPC decodes it (it fits the limit), then the token check refuses it with
RESOURCE_EXHAUSTED (it holds more than --max-tokens-per-request ids). That is the most memory a
refused request can make the server allocate.

Figures (printed, and written as JSON to --out): the server's resident memory before the flood,
its peak during it, and after --idle seconds without requests; requests sent and their statuses.
Afterwards a legal request of the maximal size (--max-tokens-per-request ids) must still succeed.
Targets: peak <= baseline + 100 MiB, after idle <= baseline + 20 MiB. Exit status 0 when both
hold, every flood request was refused with RESOURCE_EXHAUSTED and the legal request succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from bench.model import ModelSizes, write_synthetic_model
from bench.procs import ServerProcess
from bench.server import make_settings, server_process_main
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc

MIB = 1024 * 1024
TARGET_PEAK_MIB = 100.0
TARGET_AFTER_MIB = 20.0
SIZES = ModelSizes(vocab_size=32, embedding_size=16, hidden_size=32, num_layers=1)
STEP_METHOD = "/rnnserve.v1.Inference/Step"


def flood_request(session_id: str, receive_limit: int) -> bytes:
    """A serialized Step for `session_id` with as many one-byte token ids as fit `receive_limit`."""
    overhead = pb.StepRequest(session_id=session_id, tokens=[1]).ByteSize() + 8  # tag and length growth
    request = pb.StepRequest(session_id=session_id, tokens=[1] * (receive_limit - overhead))
    data = request.SerializeToString()
    assert len(data) <= receive_limit, (len(data), receive_limit)
    return data


async def sample_memory(server: ServerProcess, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        rss = server.resident_bytes()
        if rss is not None:
            samples.append((time.monotonic() - start, rss))
        await asyncio.sleep(0.05)


async def client(target: str, receive_limit: int, deadline: float, statuses: Counter[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        opened = await stub.CreateSession(pb.CreateSessionRequest(model="flood-gru"), timeout=30)
        data = flood_request(opened.session_id, receive_limit)
        # Sent as bytes: the client serializes the 300 kB message once, not per request.
        step = channel.unary_unary(STEP_METHOD, request_serializer=None, response_deserializer=None)
        while time.monotonic() < deadline:
            try:
                await step(data, timeout=30)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as error:
                statuses[error.code().name] += 1
        await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=30)


async def legal_maximal_step(target: str, max_tokens: int) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        opened = await stub.CreateSession(pb.CreateSessionRequest(model="flood-gru"), timeout=30)
        top = SIZES.vocab_size - 1
        reply = await stub.Step(
            pb.StepRequest(session_id=opened.session_id, tokens=[top] * max_tokens), timeout=60
        )
        await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=30)
        return bool(reply.prediction.position == max_tokens)


async def flood(args: argparse.Namespace, server: ServerProcess, settings: Any) -> dict[str, Any]:
    receive_limit = settings.receive_message_bytes
    await asyncio.sleep(1.0)  # settle after start
    baseline = server.resident_bytes() or 0
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(server, samples, stop))
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    deadline = started + args.duration
    await asyncio.gather(
        *(client(server.address, receive_limit, deadline, statuses) for _ in range(args.clients))
    )
    flood_end = time.monotonic()
    await asyncio.sleep(args.idle)
    after = server.resident_bytes() or 0
    stop.set()
    await sampler
    peak = max((rss for _, rss in samples), default=baseline)
    legal_ok = await legal_maximal_step(server.address, settings.max_tokens_per_request)
    peak_growth = (peak - baseline) / MIB
    after_growth = (after - baseline) / MIB
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "idle_s": args.idle,
        "receive_limit_bytes": receive_limit,
        "max_tokens_per_request": settings.max_tokens_per_request,
        "requests": sum(statuses.values()),
        "requests_per_s": round(sum(statuses.values()) / (flood_end - started), 1),
        "statuses": dict(statuses),
        "rss_mib": {
            "baseline": round(baseline / MIB, 1),
            "peak": round(peak / MIB, 1),
            "after_idle": round(after / MIB, 1),
            "peak_growth": round(peak_growth, 1),
            "after_idle_growth": round(after_growth, 1),
        },
        "legal_maximal_request_ok": legal_ok,
        "targets": {
            f"peak growth <= {TARGET_PEAK_MIB:g} MiB": peak_growth <= TARGET_PEAK_MIB,
            f"growth after {args.idle:g} s idle <= {TARGET_AFTER_MIB:g} MiB": after_growth
            <= TARGET_AFTER_MIB,
            "every flood request refused with RESOURCE_EXHAUSTED": set(statuses) == {"RESOURCE_EXHAUSTED"},
            "a legal request of the maximal size succeeds": legal_ok,
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/refused_flood.py",
        description="Flood a server with the largest requests it decodes and refuses; report its memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one channel each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of flood")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds without requests before the last reading"
    )
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ServerSettings field for the server (repeatable), e.g. max_message_bytes=4194304",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="directory for the JSON results"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.idle < 0:
        parser.error("--clients must be >= 1, --duration > 0, --idle >= 0")
    options = {}
    for option in args.server_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            parser.error(f"--server-option needs KEY=VALUE, got {option!r}")
        options[key] = value
    args.options = options
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"log_level": "WARNING", **args.options}
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="rnnserve-flood-") as scratch:
        repository = Path(scratch) / "repository"
        write_synthetic_model(repository, "flood-gru", "gru", SIZES, seed=0)
        settings = make_settings(repository, "127.0.0.1", "cpu", options)
        with ServerProcess(
            "flood-server", server_process_main, (repository, "127.0.0.1", "cpu", options), "127.0.0.1"
        ) as server:
            figures = asyncio.run(flood(args, server, settings))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"refused-flood-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({"started": started.isoformat(), **figures}, indent=2) + "\n")
    rss = figures["rss_mib"]
    print(
        f"refused flood: {figures['clients']} clients x {figures['duration_s']:g} s, "
        f"{figures['requests']} requests ({figures['requests_per_s']}/s) "
        f"of {figures['receive_limit_bytes']} bytes, "
        f"statuses {figures['statuses']}\n"
        f"  server RSS: baseline {rss['baseline']} MiB, peak {rss['peak']} MiB (+{rss['peak_growth']}), "
        f"after {figures['idle_s']:g} s idle {rss['after_idle']} MiB (+{rss['after_idle_growth']})\n"
        f"  legal request of {figures['max_tokens_per_request']} tokens: "
        f"{'ok' if figures['legal_maximal_request_ok'] else 'FAILED'}"
    )
    for target, met in figures["targets"].items():
        print(f"  [{'met' if met else 'MISSED'}] {target}")
    print(f"results: {path}")
    return 0 if all(figures["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
