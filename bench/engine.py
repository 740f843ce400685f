"""Raw onnxruntime figures: the engine's limit that the server's figures are compared with.

Runs the model exactly as the server does, with nothing around it: the same thread settings, the
same outputs (`logits` dropped from the graph when the model has `last_logits`, since
onnxruntime computes every graph output whether asked for or not), and the state fed back from
one run to the next. Measured: one token at batch 1 (a single session's step), one token at
batch 64 (many sessions' steps in one run), one call on a long prompt, and the same batch-1 step
on an int8 (dynamically quantized) copy of the model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.model import BenchModel
from bench.stats import LatencyStats
from contract import signature as sig

# A measurement loop stops at its duration or after this many runs, whichever comes first.
MAX_RUNS = 1_000_000


@dataclass(frozen=True)
class EngineSettings:
    """How the raw engine is run: the server's onnxruntime settings, and how long to measure."""

    intra_op_threads: int  # onnxruntime intra-op threads (the server's setting)
    inter_op_threads: int  # onnxruntime inter-op threads (the server's setting)
    device: str  # "cpu" or "cuda"
    duration_s: float  # measuring time per figure, after warm-up
    batch_size: int = 64  # rows of the throughput figure
    prompt_tokens: int = 256  # length of the one-call prompt figure
    seed: int = 0


def create_session(model_file: Path, arch: str, settings: EngineSettings) -> Any:
    """An onnxruntime session built as the server builds its own (serving.core.engine): the same
    session options and threads, the same providers, and the same outputs (`logits` dropped
    when the model has `last_logits`)."""
    import onnx
    import onnxruntime as ort

    from serving.core.engine import EngineOptions, host_graph, resolve_providers, session_options

    options = EngineOptions(
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )
    graph = host_graph(onnx.load(str(model_file)), arch)
    return ort.InferenceSession(
        graph.SerializeToString(), session_options(options), providers=resolve_providers(settings.device)
    )


class _Runner:
    """Runs one shape repeatedly, feeding each run's state into the next, like a session does."""

    def __init__(self, session: Any, model: BenchModel, batch_size: int, seq_len: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.state_outputs = [self.outputs.index(name) for name in sig.state_output_names(model.arch)]
        self.state_inputs = sig.state_input_names(model.arch)
        state_shape = (batch_size, model.num_layers, model.hidden_size)
        self.feeds: dict[str, np.ndarray] = {
            sig.TOKENS: rng.integers(0, model.vocab_size, size=(batch_size, seq_len), dtype=np.int64),
            sig.LENGTHS: np.full(batch_size, seq_len, dtype=np.int32),
            **{name: np.zeros(state_shape, dtype=np.float32) for name in self.state_inputs},
        }

    def run_once(self) -> None:
        results = self.session.run(self.outputs, self.feeds)
        for name, index in zip(self.state_inputs, self.state_outputs, strict=True):
            self.feeds[name] = results[index]

    def measure(self, duration_s: float, warmup_runs: int = 5) -> LatencyStats:
        for _ in range(warmup_runs):
            self.run_once()
        samples: list[int] = []
        deadline = time.perf_counter_ns() + int(duration_s * 1e9)
        while len(samples) < MAX_RUNS:
            started = time.perf_counter_ns()
            if started >= deadline:
                break
            self.run_once()
            samples.append(time.perf_counter_ns() - started)
        return LatencyStats.from_ns(samples)


def quantize_int8(model: BenchModel, out_dir: Path) -> BenchModel:
    """MODEL quantized as `rnnserve export --precision int8` does it (export.quantize), written to
    OUT_DIR/model.onnx; described without validation losses (nothing evaluated it)."""
    import onnx

    from export.quantize import quantize_int8 as export_quantize_int8

    out_dir.mkdir(parents=True)
    onnx.save(
        export_quantize_int8(onnx.load(str(model.model_file)), model.arch), str(out_dir / sig.MODEL_FILE)
    )
    return dataclasses.replace(model, precision="int8", path=out_dir, val_loss=None, val_loss_fp32=None)


def _with_rates(stats: LatencyStats, tokens_per_run: int) -> dict[str, Any]:
    """Latency plus token rates: sustained (from the mean run) and typical (from the median run)."""
    return {
        **stats.to_dict(),
        "tokens_per_s": tokens_per_run * 1e6 / stats.mean_us,
        "tokens_per_s_p50": tokens_per_run * 1e6 / stats.p50_us,
    }


def measure_engine(
    model: BenchModel,
    settings: EngineSettings,
    int8: BenchModel | None,
) -> dict[str, Any]:
    """The engine section of one model: batch-1 step, batch-N throughput, one-call prompt, int8."""
    session = create_session(model.model_file, model.arch, settings)
    batch1 = _Runner(session, model, 1, 1, settings.seed).measure(settings.duration_s)
    batched = _Runner(session, model, settings.batch_size, 1, settings.seed).measure(settings.duration_s)
    prompt = _Runner(session, model, 1, settings.prompt_tokens, settings.seed).measure(settings.duration_s)
    section: dict[str, Any] = {
        "threads": {"intra_op": settings.intra_op_threads, "inter_op": settings.inter_op_threads},
        "device": settings.device,
        "batch1_step": _with_rates(batch1, 1),
        "batch_step": {
            "batch_size": settings.batch_size,
            **_with_rates(batched, settings.batch_size),
            "cost_vs_batch1": batched.p50_us / batch1.p50_us,
        },
        "prompt": {"prompt_tokens": settings.prompt_tokens, **_with_rates(prompt, settings.prompt_tokens)},
    }
    if int8 is not None:
        int8_session = create_session(int8.model_file, model.arch, settings)
        int8_step = _Runner(int8_session, model, 1, 1, settings.seed).measure(settings.duration_s)
        section["int8_batch1_step"] = {
            **_with_rates(int8_step, 1),
            "speedup_vs_fp32": batch1.p50_us / int8_step.p50_us,
            "model": str(int8.path),
            "val_loss": int8.val_loss,
            "val_loss_fp32": int8.val_loss_fp32 if int8.val_loss_fp32 is not None else model.val_loss,
        }
    return section
