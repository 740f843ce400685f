"""The scenarios of `rnnserve bench`: what each measures, against which server, and how.

A scenario is an async function of the run (`Bench`: its config, models, model repository and
servers) returning its section of the results, {label: figures}. Figures holding a "sweep" (a
list of LoadPoint dicts) or a "point" are tabulated and plotted by bench.report without
further code. Scenarios run in the order of SCENARIOS, which lets consecutive ones share a
server: `bench.server(**settings)` reuses the running server when the settings match. A
scenario that needs more than this package (`scale`: nginx and redis-server) is left out of the
default run and runs when asked for by name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import load as bench_load
from bench.cluster import NginxProcess, RedisProcess, ReplicaProcess, start_all, stop_all
from bench.echo import echo_process_main
from bench.engine import EngineSettings, measure_engine, quantize_int8
from bench.model import BenchModel, ModelSizes, read_model, resolve_spec
from bench.procs import ServerProcess
from bench.server import make_settings, server_process_main


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run does; built by main() from the command line."""

    archs: tuple[str, ...]  # synthetic models to build (ignored with a source repository)
    sizes: ModelSizes  # sizes of synthetic models
    source_repository: Path | None  # a real model repository, with model_specs
    model_specs: tuple[str, ...]  # "name" or "name:version" in source_repository
    int8_specs: tuple[str, ...]  # exported int8 models in source_repository, paired by arch and sizes
    scenarios: tuple[str, ...]
    streams: tuple[int, ...]  # concurrency sweep of `stream`, `unbatched` and `echo`
    duration_s: float  # counted time per figure
    warmup_s: float  # uncounted time before each load figure
    batch_size: int  # rows of the raw engine throughput figure
    prompt_tokens: int
    generations: int  # concurrent Generate calls
    generate_tokens: int  # max_new_tokens of each Generate call
    generate_prompt_tokens: int
    sessions: int  # idle sessions of `sessions`
    session_concurrency: int  # CreateSession/Step calls in flight while making them
    device: str  # "cpu" or "cuda", for the server and the raw engine
    server_options: tuple[tuple[str, str], ...]  # ServerSettings overrides for every server
    host: str
    out_dir: Path
    png: bool
    document: Path | None  # a Markdown page whose marked section gets the report (bench.document)
    seed: int
    server_logs: bool  # let the servers log at their own level (default: WARNING)


@dataclass(frozen=True)
class Scenario:
    """One measurement: run(bench) returns its section, {label: figures}, for the results."""

    name: str
    summary: str
    run: Callable[[Bench], Awaitable[dict[str, Any]]]
    by_default: bool = True  # part of a run without --scenarios


class Bench:
    """One run's models and servers. A server is reused by consecutive scenarios that need the
    same settings, and replaced (stopped, then a new one started) when the settings change."""

    def __init__(
        self, config: BenchConfig, models: list[BenchModel], repository: Path, work_dir: Path
    ) -> None:
        self.config = config
        self.models = models
        self.repository = repository
        self.work_dir = work_dir
        self._server: ServerProcess | None = None
        self._server_options: dict[str, str] | None = None

    def server(self, **options: str) -> ServerProcess:
        """A running server with the run's --server-option settings plus OPTIONS."""
        # The servers log warnings only, unless --server-logs or a log_level option says otherwise.
        quiet = {} if self.config.server_logs else {"log_level": "WARNING"}
        wanted = {**quiet, **dict(self.config.server_options), **options}
        if self._server is not None and self._server_options == wanted:
            self._server.check_alive()
            return self._server
        self.stop_server()
        label = "rnnserve server" + "".join(f" {key}={value}" for key, value in options.items())
        self._server = ServerProcess(
            label,
            server_process_main,
            (self.repository, self.config.host, self.config.device, wanted),
            self.config.host,
        )
        self._server_options = wanted
        return self._server

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._server_options = None

    def engine_settings(self) -> EngineSettings:
        """Raw onnxruntime runs with the thread settings the server under test uses."""
        settings = make_settings(
            self.repository, self.config.host, self.config.device, dict(self.config.server_options)
        )
        return EngineSettings(
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            device=self.config.device,
            duration_s=self.config.duration_s,
            batch_size=self.config.batch_size,
            prompt_tokens=self.config.prompt_tokens,
            seed=self.config.seed,
        )


def _log_point(scenario: str, label: str, point: dict[str, Any]) -> None:
    print(
        f"[bench] {scenario:<9} {label:<16} {point['streams']:>4} streams"
        f"  {point['messages_per_s']:>9,.0f} msgs/s  {point['tokens_per_s']:>9,.0f} tokens/s"
        f"  p50 {point['p50_us']:>8,.0f} µs  p99 {point['p99_us']:>8,.0f} µs",
        flush=True,
    )


async def _sweep(
    bench: Bench, scenario: str, address: str, model: str, vocab_size: int, label: str | None = None
) -> dict[str, Any]:
    """A stream_load point (one token per message) at each --streams concurrency; `label` names
    the figures in the progress lines (default: the model)."""
    config = bench.config
    points = []
    async with bench_load.open_channel(address) as channel:
        for streams in config.streams:
            point = await bench_load.stream_load(
                channel, model=model, vocab_size=vocab_size, streams=streams, tokens_per_message=1,
                warmup_s=config.warmup_s, duration_s=config.duration_s, seed=config.seed,
            )  # fmt: skip
            points.append(point.to_dict())
            _log_point(scenario, label or model, points[-1])
    return {"sweep": points}


async def run_engine(bench: Bench) -> dict[str, Any]:
    settings = bench.engine_settings()
    section: dict[str, Any] = {}
    for model in bench.models:
        section[model.name] = figures = measure_engine(model, settings, _int8_model(bench, model))
        print(
            f"[bench] engine    {model.name:<16} batch 1 p50 {figures['batch1_step']['p50_us']:,.0f} µs, "
            f"batch {settings.batch_size} {figures['batch_step']['tokens_per_s']:,.0f} tokens/s, "
            f"{settings.prompt_tokens}-token prompt {figures['prompt']['tokens_per_s_p50']:,.0f} tokens/s",
            flush=True,
        )
    return section


def _int8_model(bench: Bench, model: BenchModel) -> BenchModel:
    """MODEL's int8 variant: an exported one from --int8-model of the same shape, else quantized here
    (as `rnnserve export --precision int8` does, but without a validation loss)."""
    if bench.config.source_repository is not None:
        for spec in bench.config.int8_specs:
            candidate = read_model(resolve_spec(bench.config.source_repository, spec))
            if (candidate.arch, candidate.num_layers, candidate.hidden_size, candidate.vocab_size) == (
                model.arch,
                model.num_layers,
                model.hidden_size,
                model.vocab_size,
            ):
                return candidate
    return quantize_int8(model, bench.work_dir / "int8" / model.name)


async def run_echo(bench: Bench) -> dict[str, Any]:
    config = bench.config
    vocab_size = bench.models[0].vocab_size
    with ServerProcess("echo server", echo_process_main, (config.host, vocab_size), config.host) as server:
        sweep = await _sweep(bench, "echo", server.address, "echo", vocab_size)
    return {"echo": {**sweep, "note": "transport only: canned replies, no inference"}}


async def run_stream(bench: Bench) -> dict[str, Any]:
    server = bench.server()
    return {m.name: await _sweep(bench, "stream", server.address, m.name, m.vocab_size) for m in bench.models}


async def run_unbatched(bench: Bench) -> dict[str, Any]:
    server = bench.server(max_batch_size="1")
    section = {}
    for model in bench.models:
        section[model.name] = {
            **await _sweep(bench, "unbatched", server.address, model.name, model.vocab_size),
            "note": "max_batch_size=1",
        }
    return section


async def run_prompt(bench: Bench) -> dict[str, Any]:
    config = bench.config
    server = bench.server()
    section = {}
    async with bench_load.open_channel(server.address) as channel:
        for model in bench.models:
            point = await bench_load.stream_load(
                channel, model=model.name, vocab_size=model.vocab_size, streams=1,
                tokens_per_message=config.prompt_tokens, warmup_s=config.warmup_s,
                duration_s=config.duration_s, seed=config.seed,
            )  # fmt: skip
            figures = point.to_dict()
            _log_point("prompt", model.name, figures)
            section[model.name] = {
                "point": figures,
                "prompt_tokens": config.prompt_tokens,
                "tokens_per_s_p50": config.prompt_tokens * 1e6 / point.latency.p50_us,
                "note": f"{config.prompt_tokens} tokens per message; latency per prompt",
            }
    return section


async def run_generate(bench: Bench) -> dict[str, Any]:
    config = bench.config
    server = bench.server()
    section = {}
    async with bench_load.open_channel(server.address) as channel:
        for model in bench.models:
            point, first_reply = await bench_load.generate_load(
                channel, model=model.name, vocab_size=model.vocab_size, generations=config.generations,
                prompt_tokens=config.generate_prompt_tokens, max_new_tokens=config.generate_tokens,
                warmup_s=config.warmup_s, duration_s=config.duration_s, seed=config.seed,
            )  # fmt: skip
            figures = point.to_dict()
            _log_point("generate", model.name, figures)
            section[model.name] = {
                "point": figures,
                "first_reply": None if first_reply is None else first_reply.to_dict(),
                "max_new_tokens": config.generate_tokens,
                "tokens_per_message": point.tokens / max(point.messages, 1),
                "note": "latency between replies of a call",
            }
    return section


async def run_sessions(bench: Bench) -> dict[str, Any]:
    """Resident memory growth of a fresh server per model, as idle sessions are made."""
    config = bench.config
    section = {}
    # Refuse rather than evict at the limit: an eviction would hide sessions from the figure.
    limits = {"max_sessions": str(config.sessions + 1024), "session_overflow": "refuse"}
    for model in bench.models:
        bench.stop_server()  # a fresh server per model: its baseline holds no other model's sessions
        server = bench.server(**limits)
        async with bench_load.open_channel(server.address) as channel:
            # Warm-up: let the server reach its steady allocations (pool, arenas, batch shapes)
            # before the baseline is read.
            warm = await bench_load.create_sessions(channel, model.name, 256, config.session_concurrency)
            await bench_load.step_sessions(channel, warm, model.vocab_size, config.session_concurrency)
            await bench_load.close_sessions(channel, warm, config.session_concurrency)
            baseline = _rss(server)
            started = time.perf_counter()
            ids = await bench_load.create_sessions(
                channel, model.name, config.sessions, config.session_concurrency
            )
            created_s = time.perf_counter() - started
            after_create = _rss(server)
            started = time.perf_counter()
            await bench_load.step_sessions(channel, ids, model.vocab_size, config.session_concurrency)
            stepped_s = time.perf_counter() - started
            after_step = _rss(server)
        bench.stop_server()
        state_bytes = config.sessions * model.state_bytes_per_session
        growth = max(after_create, after_step) - baseline
        section[model.name] = {
            "sessions": config.sessions,
            "state_bytes": state_bytes,
            "rss_baseline_bytes": baseline,
            "rss_after_create_bytes": after_create,
            "rss_after_step_bytes": after_step,
            "growth_after_create_bytes": after_create - baseline,
            "growth_bytes": growth,
            "create_per_s": config.sessions / created_s,
            "step_per_s": config.sessions / stepped_s,
            "note": "growth_bytes: after CreateSession and one Step of one token on each session",
        }
        print(
            f"[bench] sessions  {model.name:<16} {config.sessions:,} sessions: RSS +"
            f"{growth / 2**20:,.1f} MiB for {state_bytes / 2**20:,.1f} MiB of state "
            f"({config.sessions / created_s:,.0f} creates/s, {config.sessions / stepped_s:,.0f} steps/s)",
            flush=True,
        )
    return section


def _rss(server: ServerProcess) -> int:
    rss = server.resident_bytes()
    if rss is None:
        raise OSError("resident memory needs /proc/<pid>/status (Linux); it is not available here")
    return rss


SCALE_REPLICAS = 3
SCALE_SAVE_EVERY = 16  # the "every K steps" save policy of `scale`


async def run_scale(bench: Bench) -> dict[str, Any]:
    """One server against three replicas behind nginx, and the cost of saving state to Redis.

    Every server is `rnnserve serve` in a subprocess, as deployed, with the run's --server-option
    settings, serving the run's first model. Streams through nginx carry no session id, so nginx
    spreads them over the replicas at random (deploy/nginx/nginx.conf). The save points are one
    server with Redis saving each session's state after every step (each answer waits for its
    save), then every SCALE_SAVE_EVERY steps (in the background); `redis_sets` counts the writes
    Redis took during the point.
    """
    bench.stop_server()  # every core for the processes of this scenario
    config = bench.config
    model = bench.models[0]
    work_dir = bench.work_dir / "scale"
    flags = {name.replace("_", "-"): value for name, value in config.server_options}
    if not config.server_logs:
        flags.setdefault("log-level", "WARNING")
    flags.setdefault("device", config.device)

    async def sweep(label: str, address: str, note: str, redis_url: str | None = None) -> dict[str, Any]:
        sets_before = _redis_sets(redis_url)
        figures = await _sweep(bench, "scale", address, model.name, model.vocab_size, label)
        figures["note"] = note
        if redis_url is not None:
            figures["redis_sets"] = _redis_sets(redis_url) - sets_before
        return {label: figures}

    def replicas(count: int, extra: Mapping[str, str]) -> list[ReplicaProcess]:
        made = [
            ReplicaProcess(bench.repository, work_dir / "replicas", index, {**flags, **extra})
            for index in range(count)
        ]
        start_all(made)
        for replica in made:
            print(
                f"[bench] replica {replica.index} serving on {replica.address} (pid {replica.pid})",
                flush=True,
            )
        return made

    section: dict[str, Any] = {}
    with _running(replicas(1, {})) as (one,):
        section |= await sweep("one-server", one.address, "one replica, no nginx, no Redis")
        with NginxProcess(work_dir / "nginx-1", [one.port], access_log=False) as nginx:
            section |= await sweep("one-server-nginx", nginx.address, "the same replica behind nginx")
    with _running(replicas(SCALE_REPLICAS, {})) as three:
        ports = [replica.port for replica in three]
        with NginxProcess(work_dir / "nginx-3", ports, access_log=False) as nginx:
            note = f"{SCALE_REPLICAS} replicas behind nginx, streams spread at random"
            section |= await sweep(f"{SCALE_REPLICAS}-replicas-nginx", nginx.address, note)
    with RedisProcess(work_dir / "redis") as store:
        for every, label, note in (
            ("1", "one-server-save-every-step", "one replica; each answer waits for its Redis save"),
            (
                str(SCALE_SAVE_EVERY),
                f"one-server-save-every-{SCALE_SAVE_EVERY}",
                f"one replica; saves every {SCALE_SAVE_EVERY} steps, in the background",
            ),
        ):
            extra = {"redis-url": store.url, "state-save-every-steps": every, "state-save-every-s": "0"}
            with _running(replicas(1, extra)) as (saving,):
                section |= await sweep(label, saving.address, note, store.url)
    return section


@contextlib.contextmanager
def _running(replicas: list[ReplicaProcess]) -> Iterator[list[ReplicaProcess]]:
    try:
        yield replicas
    finally:
        stop_all(replicas)


def _redis_sets(url: str | None) -> int:
    """SET commands Redis has executed since it started (0 without a URL)."""
    if url is None:
        return 0
    with redis.Redis.from_url(url, socket_timeout=5.0) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_set", {}).get("calls", 0))


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "engine", "raw onnxruntime: batch-1 step, batch-N step, one-call prompt, int8 step", run_engine
        ),
        Scenario(
            "echo", "grpc.aio echo server, same messages, no inference: the transport's limit", run_echo
        ),
        Scenario("stream", "server, one token per message, at each --streams concurrency", run_stream),
        Scenario("prompt", "server, a --prompt-tokens prompt in one message", run_prompt),
        Scenario("generate", "server, --generations concurrent Generate calls", run_generate),
        Scenario("unbatched", "server with max_batch_size=1, as `stream`", run_unbatched),
        Scenario("sessions", "server resident memory with --sessions idle sessions", run_sessions),
        Scenario(
            "scale",
            f"one server against {SCALE_REPLICAS} replicas behind nginx, and Redis state saves every "
            f"step vs every {SCALE_SAVE_EVERY} steps (needs nginx and redis-server; only when named)",
            run_scale,
            by_default=False,
        ),
    )
}
# What a run without --scenarios measures.
DEFAULT_SCENARIOS = tuple(name for name, scenario in SCENARIOS.items() if scenario.by_default)
