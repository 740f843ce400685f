"""Soak benchmark: many concurrent streams for a long while against one server, with nothing lost.

    python bench/soak.py --streams 1000 --duration 60
    python bench/soak.py --streams 20 --duration 3 --warmup 1 --sizes tiny     # a quick look

The server runs in a child process (built from ServerSettings by bench.server, as the
bench builds it), on synthetic models with random weights. This process is the client: one
grpc.aio event loop driving every stream over a few channels. Each stream is an open-loop
conversation, like a user typing: it opens a session, sends one token every `--interval-ms`
(jittered by +-50%), and after about `--session-tokens` tokens ends the session and opens
another (so sessions churn all along). When the time is up, every stream ends its session.

Figures (written as JSON to --out/soak-<UTC time>.json and soak-latest.json, and printed):
- requests answered in the counted window (after --warmup) and their rate; errors by status
  over the whole run (target 0);
- per-message latency p50/p99, from writing a chunk to reading its prediction;
- the server's resident memory at start (models loaded, no client), after warm-up, at the end
  of the run and after the clients closed; growth from warm-up to end (target <= 5%);
- sessions left behind once every client has ended its sessions, read from the server's
  ListModels active_sessions (target 0);
- every prediction's position is checked (a lost or repeated step shows there), and the final
  prediction of every session of every --verify-every-th stream is compared with the offline
  model on the session's whole history.
Exit status: 0 when the run completed with no error, no wrong prediction and no session left
behind; 1 otherwise (the memory target is reported, not enforced: the allocator is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.model import BenchModel, ModelSizes, write_synthetic_model
from bench.procs import ServerProcess
from bench.server import server_process_main
from contract import signature as sig
from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc

SIZES = {
    "seed": ModelSizes(),  # the seed preset's LSTM/GRU: vocabulary 65, embedding 256, hidden 512
    "tiny": ModelSizes(vocab_size=32, embedding_size=16, hidden_size=32, num_layers=1),
}
EOF_MARKER = grpc.aio.EOF  # type: ignore[attr-defined]
REPLY_TIMEOUT_S = 30.0  # a reply slower than this is an error, not a hang
RSS_SAMPLE_S = 2.0
TARGET_RSS_GROWTH_PCT = 5.0


@dataclass(frozen=True)
class SoakConfig:
    streams: int = 1000
    duration_s: float = 60.0  # counted
    warmup_s: float = 10.0  # uncounted, before the counted window
    interval_ms: float = 400.0  # mean time between one stream's tokens
    session_tokens: int = 100  # mean session length before it ends and a new one opens
    channels: int = 10  # client connections the streams share
    archs: tuple[str, ...] = ("lstm", "gru")  # one model per arch; streams alternate between them
    sizes: str = "seed"
    verify_every: int = 50  # every N-th stream's sessions are checked against the offline model
    host: str = "127.0.0.1"
    server_options: tuple[tuple[str, str], ...] = ()
    out: Path = Path("bench/results")

    @property
    def ramp_s(self) -> float:
        """Streams start spread over this long, so that opens do not all land at once."""
        return min(self.warmup_s, max(1.0, self.streams / 500))


@dataclass
class Tally:
    """What the streams saw; updated on the one event loop only."""

    requests: int = 0  # predictions received, whole run
    counted: int = 0  # predictions received in the counted window
    latencies_ns: array = field(default_factory=lambda: array("q"))  # counted window
    errors: Counter[str] = field(default_factory=Counter)  # status name -> count
    wrong: list[str] = field(default_factory=list)  # predictions that broke an invariant
    opened: int = 0
    ended: int = 0
    # (model name, token history, logits after it) to compare with the offline model afterwards
    samples: list[tuple[str, list[int], list[float]]] = field(default_factory=list)


class Clock:
    """The run's shared timeline, in time.perf_counter_ns."""

    def __init__(self, config: SoakConfig) -> None:
        self.start_ns = time.perf_counter_ns()
        self.counted_from_ns = self.start_ns + int(config.warmup_s * 1e9)
        self.stop_ns = self.counted_from_ns + int(config.duration_s * 1e9)

    def running(self) -> bool:
        return time.perf_counter_ns() < self.stop_ns

    def counts(self, at_ns: int) -> bool:
        return self.counted_from_ns <= at_ns < self.stop_ns


# ----- one stream -----------------------------------------------------------------------------------


async def _reply(call: grpc.aio.StreamStreamCall) -> pb.StreamResponse:
    response = await asyncio.wait_for(call.read(), REPLY_TIMEOUT_S)
    if response is EOF_MARKER:
        raise ConnectionError("the server ended the stream early")
    assert isinstance(response, pb.StreamResponse)
    return response


async def one_session(
    stub: pb_grpc.InferenceStub,
    model: BenchModel,
    verify: bool,
    rng: random.Random,
    config: SoakConfig,
    clock: Clock,
    tally: Tally,
) -> None:
    """Open a session, send tokens at the stream's pace, end it (or stop at the end of the run)."""
    call_timeout = (clock.stop_ns - time.perf_counter_ns()) / 1e9 + 2 * REPLY_TIMEOUT_S
    call = stub.Stream(timeout=call_timeout)
    options = pb.PredictionOptions(return_logits=verify)
    await call.write(pb.StreamRequest(open=pb.OpenSession(model=model.name, options=options)))
    opened = await _reply(call)
    if opened.event != pb.STREAM_EVENT_OPENED:
        raise RuntimeError(f"expected OPENED, got {pb.StreamEvent.Name(opened.event)}")
    tally.opened += 1
    history: list[int] = []
    last_logits: list[float] = []
    length = rng.randint(max(1, config.session_tokens // 2), max(1, config.session_tokens * 3 // 2))
    mean_interval_s = config.interval_ms / 1000.0
    while len(history) < length and clock.running():
        await asyncio.sleep(mean_interval_s * rng.uniform(0.5, 1.5))
        token = rng.randrange(model.vocab_size)
        sent_ns = time.perf_counter_ns()
        await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[token])))
        response = await _reply(call)
        done_ns = time.perf_counter_ns()
        history.append(token)
        tally.requests += 1
        if clock.counts(sent_ns) and clock.counts(done_ns):
            tally.counted += 1
            tally.latencies_ns.append(done_ns - sent_ns)
        prediction = response.prediction
        if prediction.position != len(history) or len(prediction.top_ids) != min(5, model.vocab_size):
            tally.wrong.append(
                f"{opened.session_id}: position {prediction.position} after {len(history)} tokens, "
                f"{len(prediction.top_ids)} top ids"
            )
        if verify:
            last_logits = list(prediction.logits)
    await call.write(pb.StreamRequest(control=pb.CONTROL_END))
    ended = await _reply(call)
    if ended.event != pb.STREAM_EVENT_ENDED:
        raise RuntimeError(f"expected ENDED, got {pb.StreamEvent.Name(ended.event)}")
    await call.done_writing()
    if await asyncio.wait_for(call.read(), REPLY_TIMEOUT_S) is not EOF_MARKER:
        raise RuntimeError("a response followed ENDED")
    tally.ended += 1
    if verify and history:
        tally.samples.append((model.name, history, last_logits))


async def run_stream(
    index: int,
    stub: pb_grpc.InferenceStub,
    model: BenchModel,
    config: SoakConfig,
    clock: Clock,
    tally: Tally,
) -> None:
    """Sessions one after another until the run ends; an error is counted and a new session opened."""
    rng = random.Random(index)
    await asyncio.sleep(rng.uniform(0.0, config.ramp_s))
    verify = index % config.verify_every == 0
    while clock.running():
        try:
            await one_session(stub, model, verify, rng, config, clock, tally)
        except grpc.aio.AioRpcError as error:
            tally.errors[error.code().name] += 1
            await asyncio.sleep(config.interval_ms / 1000.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError) as error:
            tally.errors[type(error).__name__] += 1
            await asyncio.sleep(config.interval_ms / 1000.0)


# ----- the server, its memory and its sessions ---------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process PID (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample_memory(server: ServerProcess, timeline: list[tuple[float, int]], start_ns: int) -> None:
    while True:
        rss = server.resident_bytes()
        if rss is not None:
            timeline.append(((time.perf_counter_ns() - start_ns) / 1e9, rss))
        await asyncio.sleep(RSS_SAMPLE_S)


async def open_sessions(channel: grpc.aio.Channel) -> int:
    """Sessions the server holds, all models together (ListModels' active_sessions)."""
    response = await pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    return sum(v.active_sessions for m in response.models for v in m.versions)


def verify_samples(models: dict[str, BenchModel], samples: list[tuple[str, list[int], list[float]]]) -> int:
    """Compare each sampled session's last logits with the model run offline; returns mismatches."""
    sessions = {
        name: ort.InferenceSession(str(model.model_file), providers=["CPUExecutionProvider"])
        for name, model in models.items()
    }
    mismatches = 0
    for name, history, logits in samples:
        model = models[name]
        feeds: dict[str, np.ndarray] = {
            sig.TOKENS: np.array([history], np.int64),
            sig.LENGTHS: np.array([len(history)], np.int32),
        }
        for state in sig.state_input_names(model.arch):
            feeds[state] = np.zeros((1, model.num_layers, model.hidden_size), np.float32)
        expected = sessions[name].run([sig.LAST_LOGITS], feeds)[0][0]
        if not np.allclose(logits, expected, atol=1e-4):
            mismatches += 1
    return mismatches


# ----- the run ---------------------------------------------------------------------------------------------


async def soak(config: SoakConfig, models: list[BenchModel], server: ServerProcess) -> dict[str, Any]:
    rss_start = server.resident_bytes()
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(config.channels)]
    stubs = [pb_grpc.InferenceStub(channel) for channel in channels]
    tally = Tally()
    clock = Clock(config)
    timeline: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_memory(server, timeline, clock.start_ns))
    streams = [
        asyncio.create_task(
            run_stream(i, stubs[i % len(stubs)], models[i % len(models)], config, clock, tally)
        )
        for i in range(config.streams)
    ]
    await asyncio.sleep(config.warmup_s)
    rss_warm = server.resident_bytes()
    cpu_start = cpu_seconds(server.pid)
    sessions_at_warm = await open_sessions(channels[0])
    await asyncio.sleep(max(0.0, (clock.stop_ns - time.perf_counter_ns()) / 1e9))
    rss_end = server.resident_bytes()
    cpu_end = cpu_seconds(server.pid)
    sessions_at_end = await open_sessions(channels[0])
    # Streams end their sessions within one interval and one reply of the end of the run.
    done, late = await asyncio.wait(streams, timeout=config.interval_ms / 1000.0 * 1.5 + 2 * REPLY_TIMEOUT_S)
    for task in late:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            tally.errors[type(task.exception()).__name__] += 1
    left_behind = await open_sessions(channels[0])
    rss_closed = server.resident_bytes()
    sampler.cancel()
    for channel in channels:
        await channel.close(None)

    latencies_ms = np.frombuffer(tally.latencies_ns, dtype=np.int64) / 1e6
    growth = None
    if rss_warm and rss_end:
        growth = 100.0 * (rss_end - rss_warm) / rss_warm
    mismatches = verify_samples({m.name: m for m in models}, tally.samples)
    error_total = sum(tally.errors.values())
    return {
        "requests": tally.requests,
        "counted_requests": tally.counted,
        "requests_per_s": tally.counted / config.duration_s,
        "offered_per_s": config.streams / (config.interval_ms / 1000.0),
        "errors": dict(tally.errors),
        "error_total": error_total,
        "streams_unfinished": len(late),
        "wrong_predictions": len(tally.wrong),
        "wrong_examples": tally.wrong[:5],
        "latency_ms": {
            "p50": float(np.percentile(latencies_ms, 50)) if len(latencies_ms) else None,
            "p99": float(np.percentile(latencies_ms, 99)) if len(latencies_ms) else None,
            "mean": float(latencies_ms.mean()) if len(latencies_ms) else None,
            "max": float(latencies_ms.max()) if len(latencies_ms) else None,
        },
        "rss_bytes": {
            "start": rss_start,
            "after_warmup": rss_warm,
            "end": rss_end,
            "after_close": rss_closed,
            "growth_after_warmup_pct": growth,
            "timeline": timeline,
        },
        "sessions": {
            "opened": tally.opened,
            "ended": tally.ended,
            "open_after_warmup": sessions_at_warm,
            "open_at_end": sessions_at_end,
            "left_behind": left_behind,
        },
        "verified": {"sessions": len(tally.samples), "mismatches": mismatches},
        "server_cpu_s": None if cpu_start is None or cpu_end is None else cpu_end - cpu_start,
        "targets": {
            "errors == 0": error_total == 0 and not late,
            "wrong predictions == 0": not tally.wrong and mismatches == 0,
            f"rss growth after warm-up <= {TARGET_RSS_GROWTH_PCT:g}%": growth is not None
            and growth <= TARGET_RSS_GROWTH_PCT,
            "sessions left behind == 0": left_behind == 0,
        },
    }


def build_models(config: SoakConfig, repository: Path) -> list[BenchModel]:
    sizes = SIZES[config.sizes]
    return [
        write_synthetic_model(repository, f"soak-{arch}", arch, sizes, seed=i)
        for i, arch in enumerate(config.archs)
    ]


def describe(config: SoakConfig, figures: dict[str, Any]) -> str:
    mib = 1024 * 1024
    rss = figures["rss_bytes"]
    latency = figures["latency_ms"]
    growth = rss["growth_after_warmup_pct"]
    lines = [
        f"soak: {config.streams} streams, {config.duration_s:g} s counted after {config.warmup_s:g} s "
        f"warm-up, one token every {config.interval_ms:g} ms per stream (offered "
        f"{figures['offered_per_s']:.0f}/s), models {', '.join(config.archs)} ({config.sizes})",
        f"  requests      {figures['counted_requests']} in the window ({figures['requests_per_s']:.0f}/s), "
        f"{figures['requests']} in all",
        f"  errors        {figures['error_total']} {figures['errors'] or ''}",
        f"  latency       p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, "
        f"max {latency['max']:.2f} ms"
        if latency["p50"] is not None
        else "  latency       no replies in the window",
        f"  server RSS    start {rss['start'] / mib:.1f} MiB, "
        f"after warm-up {rss['after_warmup'] / mib:.1f} MiB, "
        f"end {rss['end'] / mib:.1f} MiB ({growth:+.2f}% after warm-up), "
        f"after close {rss['after_close'] / mib:.1f} MiB"
        if growth is not None
        else "  server RSS    unavailable",
        f"  sessions      {figures['sessions']['opened']} opened, {figures['sessions']['ended']} ended, "
        f"{figures['sessions']['open_at_end']} open at the end, "
        f"{figures['sessions']['left_behind']} left behind after the clients closed",
        f"  verified      {figures['verified']['sessions']} sessions against the offline model, "
        f"{figures['verified']['mismatches']} mismatches; {figures['wrong_predictions']} wrong positions",
    ]
    if figures["server_cpu_s"] is not None:
        lines.append(
            f"  server CPU    {figures['server_cpu_s']:.1f} s over the counted window "
            f"({1e6 * figures['server_cpu_s'] / max(1, figures['counted_requests']):.0f} us per request)"
        )
    for target, met in figures["targets"].items():
        lines.append(f"  target        {target}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def write_results(config: SoakConfig, figures: dict[str, Any], started: datetime) -> Path:
    config.out.mkdir(parents=True, exist_ok=True)
    settings = asdict(config)
    settings["out"] = str(config.out)
    document = {
        "started_at": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]},
        "config": settings,
        "figures": figures,
    }
    path = config.out / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    shutil.copyfile(path, config.out / "soak-latest.json")
    return path


def parse_config(argv: Sequence[str] | None) -> SoakConfig:
    parser = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description="Many concurrent streams for a long while against one server; nothing may be lost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = SoakConfig()
    parser.add_argument("--streams", type=int, default=defaults.streams, help="concurrent streams")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="counted seconds")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="uncounted seconds before")
    parser.add_argument(
        "--interval-ms", type=float, default=defaults.interval_ms, help="mean time between a stream's tokens"
    )
    parser.add_argument(
        "--session-tokens", type=int, default=defaults.session_tokens, help="mean tokens per session"
    )
    parser.add_argument("--channels", type=int, default=defaults.channels, help="client connections")
    parser.add_argument("--arch", nargs="+", choices=("lstm", "gru"), default=list(defaults.archs))
    parser.add_argument(
        "--sizes", choices=sorted(SIZES), default=defaults.sizes, help="synthetic model sizes"
    )
    parser.add_argument(
        "--verify-every", type=int, default=defaults.verify_every, help="check every N-th stream offline"
    )
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ServerSettings field for the server (repeatable), e.g. max_queue_delay_ms=1",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="directory for the JSON results")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.duration <= 0 or args.warmup < 0 or args.interval_ms <= 0:
        parser.error("--streams must be >= 1, --duration and --interval-ms > 0, --warmup >= 0")
    if args.channels < 1 or args.session_tokens < 1 or args.verify_every < 1:
        parser.error("--channels, --session-tokens and --verify-every must be >= 1")
    options = []
    for option in args.server_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            parser.error(f"--server-option needs KEY=VALUE, got {option!r}")
        options.append((key, value))
    return SoakConfig(
        streams=args.streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
        interval_ms=args.interval_ms,
        session_tokens=args.session_tokens,
        channels=args.channels,
        archs=tuple(args.arch),
        sizes=args.sizes,
        verify_every=args.verify_every,
        server_options=tuple(options),
        out=args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    started = datetime.now(timezone.utc)
    options = {"log_level": "WARNING", **dict(config.server_options)}
    with tempfile.TemporaryDirectory(prefix="rnnserve-soak-") as scratch:
        repository = Path(scratch) / "repository"
        models = build_models(config, repository)
        with ServerProcess(
            "soak-server", server_process_main, (repository, config.host, "cpu", options), config.host
        ) as server:
            figures = asyncio.run(soak(config, models, server))
    path = write_results(config, figures, started)
    print(describe(config, figures))
    print(f"results: {path}")
    hard_targets = [met for target, met in figures["targets"].items() if not target.startswith("rss")]
    return 0 if all(hard_targets) else 1


if __name__ == "__main__":
    sys.exit(main())
