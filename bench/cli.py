"""`rnnserve bench`: the engine, the transport and the server, measured side by side in one run.

On the same models, one run measures (each a scenario, selectable with --scenarios):

  engine     raw onnxruntime: one token at batch 1, at batch 64, and a 256-token prompt in one
             call, with the server's thread settings; plus an int8 copy's batch-1 step
  echo       a grpc.aio echo server with the same proto and message shapes, no inference
  stream     the server: one token per message on 1, 16, 64 and 256 concurrent streams
             (the 1-stream point is the single-stream per-token latency)
  prompt     the server: a 256-token prompt in one message, one stream
  generate   the server: 64 concurrent Generate calls
  unbatched  the server with batching disabled (max_batch_size=1), as `stream`
  sessions   the server's resident memory growth with 100,000 idle sessions
  scale      (only when named) one server against three replicas behind nginx, and the cost
             of saving session state to Redis every step against every 16 steps

then prints Markdown tables and the issue's targets (met or missed, with ratios) and writes
bench/results/bench-<timestamp>.{json,md,png} and latest.*.

Process layout: this process is the client (grpc.aio, one event loop); each server runs in its
own spawned process, so the client's CPU work does not share the server's interpreter. On a
2-core machine the client still takes CPU from the server's machine: the echo server pays the
same, so ratios to the echo are fair, and absolute figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from bench import load as bench_load
from bench.document import DocumentError, replace_section, update_document
from bench.model import BenchModel, BenchModelError, ModelSizes, copy_model, write_synthetic_model
from bench.procs import ServerProcessError
from bench.report import compute_targets, format_report, write_outputs
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, Bench, BenchConfig
from bench.server import ServerOptionError
from serving.core.engine import EngineError

# Failures a scenario records (in its section, and in the exit status) before the run goes on
# with the next one; anything else is a bug in the bench and stops it.
SCENARIO_ERRORS = (
    bench_load.LoadError,
    ServerProcessError,
    BenchModelError,
    grpc.RpcError,
    OSError,
    ValueError,
)


def prepare_models(config: BenchConfig, repository: Path) -> list[BenchModel]:
    """The models under test, in REPOSITORY: copies of real ones, or synthetic ones built here."""
    if config.source_repository is not None:
        return [copy_model(config.source_repository, spec, repository) for spec in config.model_specs]
    return [
        write_synthetic_model(repository, f"bench-{arch}", arch, config.sizes, config.seed + index)
        for index, arch in enumerate(config.archs)
    ]


def _meta(config: BenchConfig, started: datetime) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("grpcio", "protobuf", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
        "layout": "client: this process (grpc.aio, one event loop); each server: a spawned child process",
        "scenario_seconds": {},
        "config": {
            key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()
        },
    }


def _warn_if_busy() -> None:
    """Say so when other work already loads the CPUs: every figure would be lower and noisier."""
    if not hasattr(os, "getloadavg"):
        return
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(
            f"[bench] warning: the 1-minute load average is {load:.1f} on {cpus} CPUs before the bench "
            "starts; its figures will be lower and noisier than on an idle machine",
            flush=True,
        )


async def run_bench(config: BenchConfig) -> int:
    """Run the configured scenarios, then report; 0 when every scenario completed."""
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    failed: list[str] = []
    _warn_if_busy()
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as tmp:
        work_dir = Path(tmp)
        repository = work_dir / "repository"
        repository.mkdir()
        models = prepare_models(config, repository)
        print(
            f"[bench] models: {', '.join(f'{m.name} ({m.arch}, hidden {m.hidden_size})' for m in models)}",
            flush=True,
        )
        bench = Bench(config, models, repository, work_dir)
        results: dict[str, Any] = {
            "meta": _meta(config, started),
            "models": {model.name: model.describe() for model in models},
            "scenarios": {},
        }
        try:
            for name in config.scenarios:
                scenario = SCENARIOS[name]
                print(f"[bench] == {name}: {scenario.summary}", flush=True)
                scenario_clock = time.perf_counter()
                try:
                    results["scenarios"][name] = await scenario.run(bench)
                except SCENARIO_ERRORS as error:
                    # Recorded and reported; the run goes on so that one failure does not cost
                    # the other figures, and the exit status says it failed.
                    traceback.print_exc()
                    failed.append(name)
                    bench.stop_server()
                    labels = ["echo"] if name == "echo" else [model.name for model in models]
                    message = f"{type(error).__name__}: {error}"
                    results["scenarios"][name] = {label: {"error": message} for label in labels}
                results["meta"]["scenario_seconds"][name] = round(time.perf_counter() - scenario_clock, 2)
        finally:
            bench.stop_server()
    results["meta"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["meta"]["elapsed_s"] = time.perf_counter() - clock
    results["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    targets = compute_targets(results)
    written = write_outputs(results, targets, config.out_dir, started.strftime("%Y%m%d-%H%M%S"), config.png)
    report = format_report(results, targets)
    if config.document is not None:
        update_document(config.document, report)
        written["document"] = str(config.document)
    print()
    print(report)
    for kind, path in written.items():
        if path is not None:
            print(f"[bench] {kind}: {path}")
    spent = ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in results["meta"]["scenario_seconds"].items()
    )
    print(f"[bench] done in {results['meta']['elapsed_s']:.0f} s ({spent})")
    if failed:
        print(f"[bench] failed scenarios: {', '.join(failed)} (see the errors above)", file=sys.stderr)
        return 1
    return 0


# --quick replaces these defaults (flags given explicitly still win).
QUICK_DEFAULTS = {"duration": 1.0, "warmup": 0.5, "sessions": 10_000}


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _scenario_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    # Run in the registry's order, which lets consecutive scenarios share a server.
    return tuple(name for name in SCENARIOS if name in names)


def _server_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a ServerSettings field), got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()),
    )
    size = "size of the synthetic models"
    models = parser.add_argument_group("models (synthetic, random weights, unless --repository is given)")
    models.add_argument(
        "--arch",
        nargs="+",
        choices=("lstm", "gru"),
        default=["lstm", "gru"],
        help="synthetic models to build, one per architecture",
    )
    models.add_argument("--vocab-size", type=int, default=ModelSizes.vocab_size, help=size)
    models.add_argument("--embedding-size", type=int, default=ModelSizes.embedding_size, help=size)
    models.add_argument("--hidden-size", type=int, default=ModelSizes.hidden_size, help=size)
    models.add_argument("--num-layers", type=int, default=ModelSizes.num_layers, help=size)
    models.add_argument(
        "--repository", type=Path, help="benchmark exported models from this model repository"
    )
    models.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME[:VERSION]",
        help="a model in --repository (repeatable); its latest version unless given",
    )
    models.add_argument(
        "--int8-model",
        action="append",
        default=[],
        metavar="NAME[:VERSION]",
        help="an exported int8 model in --repository for the int8 figure (matched to a --model "
        "of the same arch and sizes); otherwise each model is quantized on the fly",
    )

    run = parser.add_argument_group("what to run")
    run.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated subset of the scenarios below",
    )
    run.add_argument(
        "--streams",
        type=_positive_ints,
        default="1,16,64,256",
        help="concurrency sweep of echo, stream and unbatched",
    )
    run.add_argument("--duration", type=float, default=3.0, help="seconds counted per figure")
    run.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each load figure")
    run.add_argument(
        "--quick",
        action="store_true",
        help="shorter run: " + ", ".join(f"--{k} {v}" for k, v in QUICK_DEFAULTS.items()),
    )
    run.add_argument("--batch-size", type=int, default=64, help="rows of the raw engine throughput figure")
    run.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the one-message prompt figure")
    run.add_argument("--generations", type=int, default=64, help="concurrent Generate calls")
    run.add_argument("--generate-tokens", type=int, default=256, help="max_new_tokens of each Generate call")
    run.add_argument(
        "--generate-prompt-tokens", type=int, default=8, help="prompt tokens of each Generate call"
    )
    run.add_argument("--sessions", type=int, default=100_000, help="idle sessions of the memory figure")
    run.add_argument(
        "--session-concurrency",
        type=int,
        default=256,
        help="CreateSession/Step calls in flight while making idle sessions",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and sampling")

    server = parser.add_argument_group("servers")
    server.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="onnxruntime device of the servers and the raw engine (auto: CUDA when available)",
    )
    server.add_argument(
        "--server-option",
        type=_server_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a ServerSettings field of every server under test, e.g. max_queue_delay_ms=1 (repeatable)",
    )
    server.add_argument("--host", default="127.0.0.1", help="loopback address the servers bind")
    server.add_argument(
        "--server-logs", action="store_true", help="show the servers' INFO logs, not only warnings"
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="directory for JSON, Markdown, PNG"
    )
    output.add_argument("--no-png", action="store_true", help="skip the PNG")
    output.add_argument(
        "--document",
        type=Path,
        default=None,
        metavar="PAGE",
        help="also write the report into PAGE between its '<!-- rnnserve bench: begin/end -->' lines "
        "(bench/run.sh passes docs/benchmarks.md)",
    )
    return parser


def _resolve_device(device: str) -> str:
    """ "auto" as the device it means here; EngineError when CUDA is asked for and absent."""
    from serving.core.engine import CUDA, resolve_providers

    return "cuda" if resolve_providers(device)[0] == CUDA else "cpu"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(argv: Sequence[str] | None) -> BenchConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.document is not None:
        # Checked before the run, not after minutes of measuring.
        try:
            replace_section(args.document.read_text(), "")
        except (OSError, DocumentError) as error:
            parser.error(f"--document {args.document}: {error}")
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if (args.repository is None) != (not args.model):
        parser.error("--repository and --model go together: give both to benchmark exported models")
    if args.int8_model and args.repository is None:
        parser.error("--int8-model needs --repository")
    if not _is_loopback(args.host):
        parser.error(f"--host {args.host!r} is not a loopback address: the bench runs on loopback only")
    for name in (
        "duration",
        "batch_size",
        "prompt_tokens",
        "generations",
        "generate_tokens",
        "generate_prompt_tokens",
        "sessions",
        "session_concurrency",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        device = _resolve_device(args.device)
    except EngineError as error:
        parser.error(str(error))
    try:
        sizes = ModelSizes(args.vocab_size, args.embedding_size, args.hidden_size, args.num_layers)
    except ValueError as error:
        parser.error(str(error))
    return BenchConfig(
        archs=tuple(dict.fromkeys(args.arch)),
        sizes=sizes,
        source_repository=args.repository,
        model_specs=tuple(args.model),
        int8_specs=tuple(args.int8_model),
        scenarios=tuple(args.scenarios),
        streams=tuple(args.streams),
        duration_s=args.duration,
        warmup_s=args.warmup,
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        generations=args.generations,
        generate_tokens=args.generate_tokens,
        generate_prompt_tokens=args.generate_prompt_tokens,
        sessions=args.sessions,
        session_concurrency=args.session_concurrency,
        device=device,
        server_options=tuple(args.server_option),
        host=args.host,
        out_dir=args.out,
        png=not args.no_png,
        document=args.document,
        seed=args.seed,
        server_logs=args.server_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        return asyncio.run(run_bench(config))
    except (BenchModelError, ServerOptionError) as error:
        print(f"rnnserve bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
