"""What a benchmark run leaves behind: the targets met or missed, a table, JSON and a PNG.

Results are one JSON-ready dict. Each scenario's section maps a label (a model name, or "echo")
to its figures; a label whose figures hold a "sweep" (a list of load points against
concurrency) or a "point" is tabulated and plotted without further code, so a new scenario
(say, three replicas behind nginx) shows up in the table and the PNG by following that shape.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """One row of the issue's Targets table, evaluated on one model."""

    key: str  # stable identifier: single_stream, streams64_vs_echo, ...
    name: str  # what is compared, in words
    model: str
    ratio: float | None  # measured / reference; None when a figure is missing
    goal: str  # "<= 1.25", ">= 0.8", or "report"
    met: bool | None  # None when not measured or only reported
    detail: str  # the figures behind the ratio

    @property
    def verdict(self) -> str:
        if self.goal == "report":
            return "reported"
        if self.met is None:
            return "not measured"
        return "met" if self.met else "missed"


def _get(figures: Any, *keys: str) -> Any:
    """figures[k1][k2]..., or None where any level is missing."""
    for key in keys:
        if not isinstance(figures, dict):
            return None
        figures = figures.get(key)
    return figures


def _figures(results: dict[str, Any], scenario: str, label: str) -> dict[str, Any] | None:
    figures = _get(results, "scenarios", scenario, label)
    return figures if figures and "error" not in figures else None


def _point(results: dict[str, Any], scenario: str, label: str, streams: int) -> dict[str, Any] | None:
    sweep = _get(_figures(results, scenario, label), "sweep") or []
    return next((point for point in sweep if point["streams"] == streams), None)


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value / MIB:,.1f}"


def _sum(*values: float | None) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) if len(present) == len(values) else None


def compute_targets(results: dict[str, Any]) -> list[Target]:
    """The issue's Targets table, per model, from one run's figures."""
    config = _get(results, "meta", "config") or {}
    echo_p50 = _get(_point(results, "echo", "echo", 1), "p50_us")
    echo_64 = _get(_point(results, "echo", "echo", 64), "messages_per_s")
    targets: list[Target] = []
    for label in results.get("models", {}):
        engine = _figures(results, "engine", label)
        step_p50 = _get(engine, "batch1_step", "p50_us")
        served_p50 = _get(_point(results, "stream", label, 1), "p50_us")
        served_64 = _get(_point(results, "stream", label, 64), "messages_per_s")
        unbatched_64 = _get(_point(results, "unbatched", label, 64), "messages_per_s")
        generate_rate = _get(_figures(results, "generate", label), "point", "tokens_per_s")
        batch_rate = _get(engine, "batch_step", "tokens_per_s")
        prompt_rate = _get(_figures(results, "prompt", label), "tokens_per_s_p50")
        raw_prompt_rate = _get(engine, "prompt", "tokens_per_s_p50")
        growth = _get(_figures(results, "sessions", label), "growth_bytes")
        state = _get(_figures(results, "sessions", label), "state_bytes")
        # (key, what, measured, reference, goal, the figures behind the ratio)
        comparisons = [
            ("single_stream", "single stream p50 per token vs (echo p50 + raw batch-1 step)",
             served_p50, _sum(echo_p50, step_p50), "<= 1.25",
             f"{_num(served_p50)} µs vs {_num(echo_p50)} + {_num(step_p50)} µs"),
            ("streams64_vs_echo", "64 streams msgs/s vs echo server at 64",
             served_64, echo_64, ">= 0.8", f"{_num(served_64)} vs {_num(echo_64)} msgs/s"),
            ("streams64_vs_unbatched", "64 streams msgs/s vs batching disabled at 64",
             served_64, unbatched_64, ">= 3", f"{_num(served_64)} vs {_num(unbatched_64)} msgs/s"),
            ("generate", f"Generate x{config.get('generations', '?')} tokens/s vs raw ORT batch "
             f"{config.get('batch_size', '?')}",
             generate_rate, batch_rate, ">= 0.5", f"{_num(generate_rate)} vs {_num(batch_rate)} tokens/s"),
            ("prompt", f"{config.get('prompt_tokens', '?')}-token prompt tokens/s vs raw ORT one call",
             prompt_rate, raw_prompt_rate, ">= 0.7",
             f"{_num(prompt_rate)} vs {_num(raw_prompt_rate)} tokens/s (each from its p50)"),
            ("idle_sessions", f"{_num(config.get('sessions'))} idle sessions: RSS growth vs raw state bytes",
             growth, state, "<= 1.5", f"{_mib(growth)} vs {_mib(state)} MiB"),
        ]  # fmt: skip
        for key, name, measured, reference, goal, detail in comparisons:
            if measured is None or reference is None:
                targets.append(
                    Target(key, name, label, None, goal, None, "a figure it needs was not measured")
                )
                continue
            ratio = measured / reference
            bound = float(goal.split()[1])
            met = ratio <= bound if goal.startswith("<=") else ratio >= bound
            targets.append(Target(key, name, label, ratio, goal, met, detail))

        int8 = _get(engine, "int8_batch1_step")
        if int8:
            loss = (
                "no validation loss (synthetic model)"
                if int8["val_loss"] is None
                else f"val loss {int8['val_loss']:.4f} vs fp32 {int8['val_loss_fp32']}"
            )
            detail = f"{_num(int8['p50_us'])} vs {_num(step_p50)} µs p50; {loss}"
            name = "int8 single step speed-up over fp32 (raw ORT)"
            targets.append(Target("int8", name, label, int8["speedup_vs_fp32"], "report", None, detail))
    return targets


def _load_rows(results: dict[str, Any]) -> Iterator[list[str]]:
    for scenario, section in results.get("scenarios", {}).items():
        for label, figures in section.items():
            if "error" in figures:
                yield [scenario, label, "-", "-", "-", "-", "-", f"error: {figures['error'].splitlines()[0]}"]
                continue
            points = figures.get("sweep") or ([figures["point"]] if "point" in figures else [])
            for index, point in enumerate(points):
                yield [
                    scenario,
                    label,
                    str(point["streams"]),
                    f"{point['messages_per_s']:,.0f}",
                    f"{point['tokens_per_s']:,.0f}",
                    f"{point['p50_us']:,.0f}",
                    f"{point['p99_us']:,.0f}",
                    figures.get("note", "") if index == 0 else "",
                ]


def _engine_rows(results: dict[str, Any]) -> Iterator[list[str]]:
    for label, engine in results.get("scenarios", {}).get("engine", {}).items():
        if "error" in engine:
            yield [label, f"error: {engine['error'].splitlines()[0]}", "-", "-", "-"]
            continue
        rows = [
            ("batch 1, 1 token", engine["batch1_step"]),
            (f"batch {engine['batch_step']['batch_size']}, 1 token", engine["batch_step"]),
            (f"batch 1, {engine['prompt']['prompt_tokens']} tokens", engine["prompt"]),
        ]
        if "int8_batch1_step" in engine:
            rows.append(("int8, batch 1, 1 token", engine["int8_batch1_step"]))
        for what, figures in rows:
            rate = figures.get("tokens_per_s")
            yield [
                label,
                what,
                f"{figures['p50_us']:,.0f}",
                f"{figures['p99_us']:,.0f}",
                "-" if rate is None else f"{rate:,.0f}",
            ]


def _session_rows(results: dict[str, Any]) -> Iterator[list[str]]:
    for label, figures in results.get("scenarios", {}).get("sessions", {}).items():
        if "error" in figures:
            yield [label, "error", "-", "-", "-", figures["error"].splitlines()[0]]
            continue
        yield [
            label,
            f"{figures['sessions']:,}",
            f"{figures['growth_after_create_bytes'] / MIB:,.1f}",
            f"{figures['growth_bytes'] / MIB:,.1f}",
            f"{figures['state_bytes'] / MIB:,.1f}",
            f"{figures['growth_bytes'] / figures['state_bytes']:.2f}",
        ]


def _markdown(header: list[str], rows: Iterator[list[str]] | list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    start, end = meta.get("load_average_at_start"), meta.get("load_average_at_end")
    load = (
        ""
        if start is None or end is None
        else f", 1-minute load average {start[0]:.1f} at start, {end[0]:.1f} at end"
    )
    return (
        f"rnnserve bench, {meta.get('started_at', '?')}: {meta.get('cpu_count', '?')} CPUs"
        f" ({meta.get('processor', '?')}){load}; "
        + ", ".join(f"{package} {version}" for package, version in meta.get("versions", {}).items())
    )


def format_report(results: dict[str, Any], targets: list[Target]) -> str:
    """Markdown tables: raw engine, load points, idle sessions, targets."""
    parts = [
        _machine_line(results),
        "### Raw onnxruntime",
        _markdown(["model", "run", "p50 µs", "p99 µs", "tokens/s"], list(_engine_rows(results))),
        "### Load (closed loop; one request in flight per stream)",
        _markdown(
            ["scenario", "model", "streams", "msgs/s", "tokens/s", "p50 µs", "p99 µs", "note"],
            list(_load_rows(results)),
        ),
        "### Idle sessions (server resident memory)",
        _markdown(
            [
                "model",
                "sessions",
                "growth after create MiB",
                "growth after one step MiB",
                "raw state MiB",
                "ratio",
            ],
            list(_session_rows(results)),
        ),
        "### Targets",
        _markdown(
            ["target", "model", "ratio", "goal", "result", "figures"],
            [
                [t.name, t.model, "-" if t.ratio is None else f"{t.ratio:.2f}", t.goal, t.verdict, t.detail]
                for t in targets
            ],
        ),
    ]
    return "\n\n".join(parts) + "\n"


def write_outputs(
    results: dict[str, Any], targets: list[Target], out_dir: Path, stamp: str, png: bool
) -> dict[str, str | None]:
    """bench-STAMP.{json,md,png} in OUT_DIR, each copied to latest.*; returns the paths written.

    The JSON is RESULTS with two keys added: "targets" (each Target and its verdict) and
    "outputs" (these paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str | None] = {"json": None, "markdown": None, "png": None}
    png_path = out_dir / f"bench-{stamp}.png"
    if png:
        drawn = write_png(results, png_path)
        if drawn is not None:
            shutil.copyfile(drawn, out_dir / "latest.png")
            written["png"] = str(drawn)
    results["targets"] = [{**asdict(t), "verdict": t.verdict} for t in targets]
    results["outputs"] = written
    markdown_path = out_dir / f"bench-{stamp}.md"
    markdown_path.write_text(format_report(results, targets))
    shutil.copyfile(markdown_path, out_dir / "latest.md")
    written["markdown"] = str(markdown_path)
    json_path = out_dir / f"bench-{stamp}.json"
    written["json"] = str(json_path)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    shutil.copyfile(json_path, out_dir / "latest.json")
    return written


def write_png(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and latency against concurrency for every sweep; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(
            "[bench] PNG skipped: matplotlib is not installed (it is in the 'train' extra; "
            "`pip install matplotlib` adds it to a serving environment)"
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput_axes, latency_axes) = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    all_streams: set[int] = set()
    for scenario, section in results.get("scenarios", {}).items():
        for label, figures in section.items():
            sweep = figures.get("sweep") if isinstance(figures, dict) else None
            if not sweep:
                continue
            color = next(colors)
            name = label if scenario == label else f"{scenario} {label}"
            streams = [p["streams"] for p in sweep]
            all_streams.update(streams)
            throughput_axes.plot(streams, [p["messages_per_s"] for p in sweep], "o-", color=color, label=name)
            latency_axes.plot(streams, [p["p50_us"] for p in sweep], "o-", color=color, label=f"{name} p50")
            latency_axes.plot(streams, [p["p99_us"] for p in sweep], "x--", color=color, label=f"{name} p99")
    for label, engine in results.get("scenarios", {}).get("engine", {}).items():
        if "batch_step" in engine:
            throughput_axes.axhline(
                engine["batch_step"]["tokens_per_s"],
                linestyle=":",
                color=next(colors),
                label=f"raw ORT batch {engine['batch_step']['batch_size']} {label}",
            )
    for axes in (throughput_axes, latency_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(all_streams), [str(streams) for streams in sorted(all_streams)])
        axes.minorticks_off()
        axes.set_xlabel("concurrent streams (one token per message)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    throughput_axes.set_ylabel("messages/s (= tokens/s)")
    throughput_axes.set_title("Throughput")
    latency_axes.set_yscale("log")
    latency_axes.set_ylabel("latency per message, µs")
    latency_axes.set_title("Latency")
    meta = results.get("meta", {})
    figure.suptitle(f"rnnserve bench {meta.get('started_at', '')} ({meta.get('cpu_count', '?')} CPUs)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
