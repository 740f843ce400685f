"""`rnnserve train`: train an LSTM/GRU next-token language model into a checkpoint directory.

    rnnserve train --arch lstm --preset default --out ckpt              # Shakespeare, ~2 minutes
    rnnserve train --arch gru --preset tiny --data notes.txt --out ckpt  # your own UTF-8 text
    rnnserve train --arch lstm --format jsonl --data ids.jsonl --vocab-size 100 --out ckpt
    rnnserve train --out ckpt --resume --max-steps 8000                 # continue a run
    torchrun --nproc-per-node 2 -m models.train --arch lstm --out ckpt  # data parallel (DDP)

The loop: seeded batches (a function of seed, rank and step, so a resumed run sees the batches an
uninterrupted one would), AdamW with warmup and cosine decay over whichever budget ends first
(`--max-steps` or `--max-time`), gradient clipping, periodic validation on a fixed subset of the
held-out split, the best weights kept as the checkpoint's model.safetensors and the latest weights
and optimizer state saved for `--resume`. At the end the best weights are evaluated on the whole
held-out split (the checkpoint's metrics), the training curve is drawn beside the checkpoint, and
a greedy sample is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.nn import functional
from tqdm import tqdm

from contract.hashing import sha256_file
from contract.model_config import ARCHITECTURES
from models import distributed
from models.checkpoint import (
    CHECKPOINT_FILE,
    CURVE_FILE,
    LAST_WEIGHTS_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    load_checkpoint,
    load_optimizer,
    read_checkpoint_json,
    save_checkpoint,
    save_optimizer,
    save_weights,
)
from models.config import ModelConfig
from models.data import (
    FORMATS,
    IGNORE_INDEX,
    SHAKESPEARE,
    TEXT_TOKENIZERS,
    Batch,
    Corpus,
    DataError,
    DataSpec,
    SequenceBatcher,
    TextBatcher,
    corpus_validation_batches,
    load_corpus,
    step_seed,
)
from models.distributed import DistributedContext, DistributedError
from models.model import RNNLanguageModel
from models.presets import LR_SCHEDULES, PRESETS, TrainConfig, preset_config
from models.sample import generate

# Fields fixed by the weights and the data: a resumed run must keep them.
STRUCTURAL_FIELDS = ("arch", "embedding_size", "hidden_size", "num_layers")
DATA_FLAGS = {"data": "paths", "format": "format", "tokenizer": "tokenizer", "vocab_size": "vocab_size",
              "pad_id": "pad_id", "val_fraction": "val_fraction"}  # fmt: skip
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says what to change."""


@dataclass
class History:
    """Loss curves: [step, loss] pairs of the training loss (mean over a few steps) and validation."""

    train: list[list[float]] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)


@dataclass
class Progress:
    """Where a run stands; saved in checkpoint.json["training"] so that --resume continues it."""

    step: int = 0
    elapsed_seconds: float = 0.0  # training-loop time, all runs together (what --max-time limits)
    wall_seconds: float = 0.0  # wall time of all runs together, data loading included
    train_seconds: float = 0.0  # time in optimizer steps only (for tokens/s)
    tokens_seen: int = 0  # training targets over all ranks
    best_step: int = 0
    best_val_loss: float = math.inf  # on the periodic validation subset
    history: History = field(default_factory=History)


# ----------------------------------------------------------------------------- setup


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a CUDA device is an error."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise TrainError(
            f"--device cuda was requested but no CUDA device is available (torch {torch.__version__}); "
            "use --device cpu or --device auto"
        )
    return torch.device("cpu")


def default_threads() -> int:
    """CPU threads per process: the usable cores shared among this node's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def lr_at(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate for `step`; progress in [0, 1] is how much of the step or time budget is spent."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return config.lr * warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warmup * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_batcher(
    corpus: Corpus, config: TrainConfig, context: DistributedContext
) -> TextBatcher | SequenceBatcher:
    if isinstance(corpus.train, list):
        return SequenceBatcher(
            corpus.train,
            config.batch_size,
            corpus.spec.pad_id,
            config.seed,
            rank=context.rank,
            world_size=context.world_size,
            max_len=config.seq_len,
        )
    return TextBatcher(corpus.train, config.batch_size, config.seq_len, config.seed, rank=context.rank)


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, targets, lengths) tensors; lengths stay on the CPU, where packing wants them.

    Rows that are all full need no packing: lengths is then None (same result, faster).
    """
    tokens = torch.from_numpy(batch.tokens).to(device, non_blocking=True)
    targets = torch.from_numpy(batch.targets).to(device, non_blocking=True)
    lengths = None
    if batch.lengths is not None and not (batch.lengths == batch.tokens.shape[1]).all():
        lengths = torch.from_numpy(batch.lengths)
    return tokens, targets, lengths


def sequence_loss(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats) over real targets, and their count.

    With lengths, the rows are packed: padding changes neither the state nor (IGNORE_INDEX) the loss.
    """
    logits, _ = model(tokens, None, lengths)  # (B, T, V)
    loss = functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: RNNLanguageModel,
    batches: Sequence[Batch],
    context: DistributedContext,
    device: torch.device,
) -> tuple[float, int]:
    """Mean loss (nats/token) and target count over `batches`, sharded across ranks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches[context.rank :: context.world_size]:
        loss, batch_count = sequence_loss(model, *to_device(batch, device))
        total += float(loss)
        count += batch_count
    model.train(was_training)
    total, count_sum = distributed.sum_across([total, float(count)], context, device)
    return total / max(count_sum, 1.0), int(count_sum)


def loss_metrics(loss: float) -> dict[str, float]:
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 700.0)),
        "val_bits_per_token": loss / math.log(2.0),
    }


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One training run: model, optimizer, data and progress, on this rank."""

    def __init__(
        self,
        config: TrainConfig,
        corpus: Corpus,
        out: Path,
        device: torch.device,
        context: DistributedContext,
        preset: str,
        progress_bar: bool = True,
    ) -> None:
        self.config = config
        self.corpus = corpus
        self.out = out
        self.device = device
        self.context = context
        self.preset = preset
        self.progress_bar = progress_bar
        self.model_config = ModelConfig(
            arch=config.arch,
            vocab_size=corpus.tokenizer.vocab_size,
            embedding_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout,
            pad_id=corpus.spec.pad_id,
        )
        torch.manual_seed(config.seed)
        self.model = RNNLanguageModel(self.model_config).to(device)
        self.best_model = RNNLanguageModel(self.model_config)  # best weights, kept on the CPU
        self.best_model.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.progress = Progress()
        self.batcher = make_batcher(corpus, config, context)
        self.eval_batches = list(corpus_validation_batches(corpus, config.eval_tokens))

    # -- persistence

    def training_record(self, complete: bool, stop_reason: str | None = None) -> dict[str, Any]:
        """checkpoint.json["training"]: how to reproduce, resume and re-evaluate this run."""
        progress = self.progress
        return {
            "preset": self.preset,
            "config": self.config.to_dict(),
            "data": self.corpus.spec.to_dict(),
            "data_sha256": self.corpus.sha256,
            "data_description": self.corpus.spec.description,
            "train_tokens": self.corpus.num_train_tokens,
            "validation_tokens": self.corpus.num_validation_tokens,
            "world_size": self.context.world_size,
            "device": self.device.type,
            "torch": torch.__version__,
            "last_step": progress.step,
            "elapsed_seconds": progress.elapsed_seconds,
            "wall_seconds": progress.wall_seconds,
            "train_seconds": progress.train_seconds,
            "tokens_seen": progress.tokens_seen,
            "best_step": progress.best_step,
            "best_periodic_val_loss": progress.best_val_loss
            if math.isfinite(progress.best_val_loss)
            else None,
            "history": {"train": progress.history.train, "validation": progress.history.validation},
            "complete": complete,
            "stop_reason": stop_reason,
            "last_weights_sha256": None,
            "optimizer_sha256": None,
        }

    def save(self, metrics: dict[str, Any], complete: bool, stop_reason: str | None = None) -> None:
        """Latest weights and optimizer first, then checkpoint.json (the commit point) with the best
        weights. On rank 0 only."""
        if not self.context.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_weights(self.out / LAST_WEIGHTS_FILE, self.model)
        save_optimizer(self.out, self.optimizer)
        record = self.training_record(complete, stop_reason)
        record["last_weights_sha256"] = sha256_file(self.out / LAST_WEIGHTS_FILE)
        record["optimizer_sha256"] = sha256_file(self.out / OPTIMIZER_FILE)
        save_checkpoint(
            self.out,
            self.best_model,
            self.corpus.tokenizer.to_dict(),
            self.progress.best_step,
            metrics,
            training=record,
        )

    def restore(self, meta: dict[str, Any]) -> None:
        """Continue from the checkpoint in self.out: latest weights, optimizer, progress, best weights."""
        training = meta.get("training", {})
        for file, key in ((LAST_WEIGHTS_FILE, "last_weights_sha256"), (OPTIMIZER_FILE, "optimizer_sha256")):
            path = self.out / file
            if not path.is_file():
                raise CheckpointError(f"cannot resume: {path} is missing")
            if sha256_file(path) != training.get(key):
                raise CheckpointError(
                    f"cannot resume: {path} does not match {CHECKPOINT_FILE} (the run stopped while "
                    "saving?); start again with --overwrite"
                )
        last = load_checkpoint(self.out, weights_file=LAST_WEIGHTS_FILE)
        self.model.load_state_dict(last.model.state_dict())
        self.best_model.load_state_dict(load_checkpoint(self.out).model.state_dict())
        load_optimizer(self.out, self.optimizer)
        history = training.get("history", {})
        best = training.get("best_periodic_val_loss")
        self.progress = Progress(
            step=int(training.get("last_step", 0)),
            elapsed_seconds=float(training.get("elapsed_seconds", 0.0)),
            wall_seconds=float(training.get("wall_seconds", 0.0)),
            train_seconds=float(training.get("train_seconds", 0.0)),
            tokens_seen=int(training.get("tokens_seen", 0)),
            best_step=int(training.get("best_step", 0)),
            best_val_loss=math.inf if best is None else float(best),
            history=History(
                train=list(history.get("train", [])), validation=list(history.get("validation", []))
            ),
        )

    # -- the loop

    def budget_progress(self, step: int, elapsed: float) -> float:
        by_steps = step / self.config.max_steps
        by_time = elapsed / self.config.max_time if self.config.max_time else 0.0
        return max(by_steps, by_time)

    def validate(self, train_loss: float | None) -> float:
        loss, _ = evaluate(self.model, self.eval_batches, self.context, self.device)
        step = self.progress.step
        self.progress.history.validation.append([step, loss])
        if loss < self.progress.best_val_loss:
            self.progress.best_val_loss = loss
            self.progress.best_step = step
            self.best_model.load_state_dict(self.model.state_dict())
        tokens_per_second = self.progress.tokens_seen / max(self.progress.train_seconds, 1e-9)
        train_text = "-" if train_loss is None else f"{train_loss:.3f}"
        # Both budgets, so that a time-limited run does not read as a long way from its end.
        time_budget = f" of {self.config.max_time:g}" if self.config.max_time else ""
        self.log(
            f"step {step}/{self.config.max_steps} | train {train_text} | val {loss:.4f} "
            f"(ppl {math.exp(min(loss, 700.0)):.2f}, {loss / math.log(2):.3f} bits/token) | "
            f"{tokens_per_second:,.0f} tok/s | {self.progress.elapsed_seconds:.0f}{time_budget} s"
        )
        return loss

    def run(self, wall_start: float) -> str:
        """Train until a budget ends or Ctrl-C; returns why it stopped: "max_steps", "max_time" or
        "interrupted" (the latest state is then saved for --resume)."""
        config, progress = self.config, self.progress
        net = distributed.wrap_model(self.model, self.context, self.device)
        net.train()
        log_every = max(1, config.eval_every // 5)
        running_loss = torch.zeros((), device=self.device)
        running_steps, loss_since_eval, steps_since_eval = 0, 0.0, 0
        loop_start = time.monotonic() - progress.elapsed_seconds
        bar = BudgetBar(config, progress, disable=not (self.progress_bar and self.context.is_main))
        stop_reason = "max_steps"
        with _StopOnInterrupt() as interrupt:
            while progress.step < config.max_steps:
                # One all-reduce per step keeps the ranks' clocks and stop requests in agreement.
                elapsed, stop = distributed.max_across(
                    [time.monotonic() - loop_start, float(interrupt.requested)], self.context, self.device
                )
                progress.elapsed_seconds = elapsed
                if stop:
                    stop_reason = "interrupted"
                    break
                if config.max_time is not None and elapsed >= config.max_time:
                    stop_reason = "max_time"
                    break
                lr = lr_at(config, progress.step, self.budget_progress(progress.step, elapsed))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.monotonic()
                # Dropout draws from the global generator: seed it per step so resuming is exact.
                torch.manual_seed(step_seed(config.seed, self.context.rank, progress.step))
                tokens, targets, lengths = to_device(self.batcher.batch(progress.step), self.device)
                loss_sum, count = sequence_loss(net, tokens, targets, lengths)
                loss = loss_sum / max(count, 1)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.optimizer.step()
                running_loss += loss.detach()
                running_steps += 1
                progress.step += 1
                progress.tokens_seen += count * self.context.world_size
                progress.train_seconds += time.monotonic() - step_start
                bar.advance(progress.step, time.monotonic() - loop_start)
                if running_steps == log_every:
                    mean_loss = float(running_loss) / running_steps
                    progress.history.train.append([progress.step, mean_loss])
                    loss_since_eval += mean_loss * running_steps
                    steps_since_eval += running_steps
                    running_loss.zero_()
                    running_steps = 0
                    bar.show(
                        progress.step,
                        loss=f"{mean_loss:.3f}",
                        tok_s=f"{progress.tokens_seen / max(progress.train_seconds, 1e-9):,.0f}",
                        lr=f"{lr:.2e}",
                    )
                if progress.step % config.eval_every == 0:
                    progress.elapsed_seconds = time.monotonic() - loop_start
                    self.validate(loss_since_eval / steps_since_eval if steps_since_eval else None)
                    loss_since_eval, steps_since_eval = 0.0, 0
                    progress.wall_seconds = time.monotonic() - wall_start
                    self.save({"val_loss": progress.best_val_loss, "complete": False}, complete=False)
        bar.close()
        progress.elapsed_seconds = time.monotonic() - loop_start
        progress.wall_seconds = time.monotonic() - wall_start
        if stop_reason == "interrupted":
            self.save({"val_loss": _finite(progress.best_val_loss), "complete": False}, complete=False)
            return stop_reason
        if not progress.history.validation or progress.history.validation[-1][0] != progress.step:
            if running_steps:
                loss_since_eval += float(running_loss)
                steps_since_eval += running_steps
            self.validate(loss_since_eval / steps_since_eval if steps_since_eval else None)
        return stop_reason

    def finish(self, stop_reason: str, wall_start: float) -> dict[str, Any]:
        """Evaluate the best weights on the whole held-out split and write the final checkpoint."""
        self.best_model.to(self.device)
        full = list(corpus_validation_batches(self.corpus))
        val_loss, val_tokens = evaluate(self.best_model, full, self.context, self.device)
        digest = distributed.check_replicas_equal(self.model, self.context, self.device)
        self.progress.wall_seconds = time.monotonic() - wall_start
        metrics: dict[str, Any] = {
            **loss_metrics(val_loss),
            "val_tokens": val_tokens,
            "best_step": self.progress.best_step,
            "steps": self.progress.step,
            "train_tokens_per_second": self.progress.tokens_seen / max(self.progress.train_seconds, 1e-9),
            "tokens_seen": self.progress.tokens_seen,
            "wall_seconds": self.progress.wall_seconds,
            "train_seconds": self.progress.train_seconds,
            "world_size": self.context.world_size,
            "complete": True,
        }
        self.log(f"final weights sha256 {digest}")
        self.best_model.cpu()
        self.save(metrics, complete=True, stop_reason=stop_reason)
        if self.context.is_main:
            plot_curve(
                self.progress.history, self.out / CURVE_FILE, title=f"{self.config.arch} ({self.preset})"
            )
        return metrics

    def sample(self, prompt: str | None) -> str | None:
        """A greedy continuation of `prompt` (default: the start of the held-out text); text data only."""
        if not self.corpus.is_text or self.config.sample_tokens <= 0:
            return None
        tokenizer = self.corpus.tokenizer
        if prompt is None:
            assert not isinstance(self.corpus.validation, list)
            prompt_ids = self.corpus.validation[:32].tolist()
        else:
            prompt_ids = tokenizer.encode(prompt)
        new_ids = generate(self.best_model, prompt_ids, self.config.sample_tokens)
        return tokenizer.decode(prompt_ids) + tokenizer.decode(new_ids)

    def log(self, message: str) -> None:
        if self.context.enabled:
            message = f"[rank {self.context.rank}] {message}"
        tqdm.write(message, file=sys.stderr)


class BudgetBar:
    """The training progress bar, counting the budget that ends the run.

    With a time limit (--max-time) the bar counts seconds of training towards it, the steps done
    shown beside them: a time-limited preset stops long before its step ceiling (e.g. 105 s
    against 50,000 steps), so a bar over steps would show a false total and an ETA of hours.
    Without one it counts steps towards --max-steps.
    """

    def __init__(self, config: TrainConfig, progress: Progress, *, disable: bool, file: Any = None) -> None:
        self.max_steps = config.max_steps
        self.by_time = config.max_time is not None
        common: dict[str, Any] = {
            "file": sys.stderr if file is None else file,
            "disable": disable,
            "mininterval": 1.0,
            "dynamic_ncols": True,
        }
        if config.max_time is not None:
            total = max(1, math.ceil(config.max_time))
            self.bar = tqdm(
                total=total,
                initial=min(int(progress.elapsed_seconds), total),
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]",
                **common,
            )
        else:
            self.bar = tqdm(total=config.max_steps, initial=progress.step, unit="step", **common)
        self.show(progress.step)

    def advance(self, step: int, elapsed: float) -> None:
        """Moves the bar to STEP steps done after ELAPSED seconds of training."""
        target = min(int(elapsed), self.bar.total) if self.by_time else step
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def show(self, step: int, **values: str) -> None:
        """Sets the text after the bar: the steps done (when the bar counts seconds), then VALUES."""
        if self.by_time:
            values = {"step": f"{step}/{self.max_steps}", **values}
        if values:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`, so the loop can finish its
    step and save; a second one interrupts as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def plot_curve(history: History, path: Path, title: str) -> None:
    """Training and validation loss against steps, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if history.train:
        steps, losses = zip(*history.train, strict=True)
        axes.plot(steps, losses, label="train", linewidth=1)
    if history.validation:
        steps, losses = zip(*history.validation, strict=True)
        axes.plot(steps, losses, marker="o", markersize=3, label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {name:<8} embedding {p.embedding_size}, hidden {p.hidden_size}, layers {p.num_layers}, "
        f"batch {p.batch_size}x{p.seq_len}, lr {p.lr:g} ({p.lr_schedule}), max {p.max_steps} steps"
        + (f" / {p.max_time:g} s" if p.max_time else "")
        for name, p in PRESETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="rnnserve train",
        description="Train an LSTM/GRU next-token language model into a checkpoint directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets (every value is also a flag):\n{presets}\n\n"
        "data parallel: torchrun --nproc-per-node N -m models.train ... (gloo on CPU, nccl on GPU)",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--arch", choices=ARCHITECTURES, help="recurrent cell (required unless --resume)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="default", help="sizes and recipe (default: default)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last saved step"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    parser.add_argument("--sample-prompt", help="prompt of the final greedy sample (default: held-out text)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar (default: on)",
    )

    data = parser.add_argument_group(
        "data (default: the Shakespeare corpus)", argument_default=argparse.SUPPRESS
    )
    data.add_argument(
        "--data", nargs="+", metavar="PATH", help="UTF-8 text files, or JSONL files with --format jsonl"
    )
    data.add_argument("--format", choices=FORMATS, help="text or jsonl (default: text)")
    data.add_argument(
        "--tokenizer", choices=TEXT_TOKENIZERS, help="text vocabulary: char or byte (default: char)"
    )
    data.add_argument("--vocab-size", type=int, help="jsonl: number of token ids (required for jsonl)")
    data.add_argument("--pad-id", type=int, help="jsonl: padding id, never inside a sequence (default: 0)")
    data.add_argument("--val-fraction", type=float, help="share held out for validation (default: 0.05)")

    sizes = parser.add_argument_group(
        "model and training (default: from --preset)", argument_default=argparse.SUPPRESS
    )
    sizes.add_argument("--embedding-size", type=int)
    sizes.add_argument("--hidden-size", type=int)
    sizes.add_argument("--num-layers", type=int)
    sizes.add_argument("--dropout", type=float)
    sizes.add_argument("--batch-size", type=int, help="rows per step, per process")
    sizes.add_argument("--seq-len", type=int, help="tokens per row")
    sizes.add_argument("--lr", type=float, help="peak learning rate")
    sizes.add_argument("--weight-decay", type=float)
    sizes.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    sizes.add_argument("--warmup-steps", type=int)
    sizes.add_argument("--min-lr-ratio", type=float, help="cosine: final lr as a fraction of --lr")
    sizes.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables")
    sizes.add_argument("--max-steps", type=int)
    sizes.add_argument("--max-time", type=float, help="seconds of training, resumes included; 0: no limit")
    sizes.add_argument("--eval-every", type=int, help="steps between validations and saves")
    sizes.add_argument("--eval-tokens", type=int, help="tokens per periodic validation; 0: whole split")
    sizes.add_argument("--seed", type=int)
    sizes.add_argument("--sample-tokens", type=int, help="length of the final greedy sample; 0: none")
    sizes.add_argument("--threads", type=int, help="CPU threads per process (0: usable cores / local ranks)")
    return parser


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields given on the command line (argparse.SUPPRESS leaves the others out)."""
    names = {f for f in TrainConfig.__dataclass_fields__ if f != "arch"}
    given = {name: value for name, value in vars(args).items() if name in names}
    if given.get("max_time") == 0:
        given["max_time"] = None
    if given.get("eval_tokens") == 0:
        given["eval_tokens"] = None
    if given.get("threads") == 0:
        given["threads"] = None
    return given


def _absolute_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """--data paths made absolute, so the exporter can rebuild the validation split from anywhere."""
    return tuple(str(Path(p).expanduser().resolve()) for p in paths)


def _data_spec(args: argparse.Namespace, config: TrainConfig) -> DataSpec:
    values: dict[str, Any] = {
        DATA_FLAGS[flag]: value for flag, value in vars(args).items() if flag in DATA_FLAGS
    }
    values["paths"] = _absolute_paths(values["paths"]) if "paths" in values else (SHAKESPEARE,)
    return DataSpec(seed=config.seed, eval_seq_len=config.seq_len, **values)


def plan(args: argparse.Namespace) -> tuple[TrainConfig, DataSpec, str, dict[str, Any] | None]:
    """The run's TrainConfig, DataSpec, preset name and, when resuming, the saved checkpoint.json."""
    overrides = _config_overrides(args)
    if args.out.exists() and not args.out.is_dir():
        raise TrainError(f"--out {args.out} is a file; give a directory")
    if not args.resume:
        if args.arch is None:
            raise TrainError("--arch lstm|gru is required (unless --resume)")
        if (args.out / CHECKPOINT_FILE).exists() and not args.overwrite:
            raise TrainError(
                f"{args.out} already holds a checkpoint; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
        config = preset_config(args.preset, args.arch, **overrides)
        return config, _data_spec(args, config), args.preset, None

    meta = read_checkpoint_json(args.out)
    training = meta.get("training", {})
    if "config" not in training or "data" not in training:
        raise TrainError(f"{args.out / CHECKPOINT_FILE} does not record its training settings; cannot resume")
    saved = TrainConfig.from_dict(training["config"])
    if args.arch is not None:
        overrides["arch"] = args.arch
    for name in STRUCTURAL_FIELDS:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise TrainError(
                f"--{name.replace('_', '-')} {overrides[name]} differs from the checkpoint's "
                f"{getattr(saved, name)}; a resumed run keeps the model's shape"
            )
    spec = DataSpec.from_dict(training["data"])
    for flag, name in DATA_FLAGS.items():
        if flag in vars(args):
            given = getattr(args, flag)
            given = _absolute_paths(given) if flag == "data" else given
            if given != getattr(spec, name):
                raise TrainError(
                    f"--{flag.replace('_', '-')} differs from the checkpoint's data ({spec.description})"
                )
    return replace(saved, **overrides), spec, str(training.get("preset", args.preset)), meta


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall_start = time.monotonic()
    context = DistributedContext()
    try:
        try:
            config, spec, preset, meta = plan(args)
        except ValueError as error:  # a TrainConfig or DataSpec value out of range
            raise TrainError(str(error)) from None
        device = resolve_device(args.device)
        context = distributed.setup(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", context.local_rank)
        torch.set_num_threads(config.threads or default_threads())
        corpus = load_corpus(
            spec, expected_sha256=None if meta is None else meta["training"].get("data_sha256")
        )
        trainer = Trainer(config, corpus, args.out, device, context, preset, progress_bar=args.progress)
        if meta is not None:
            trainer.restore(meta)
            if config.max_time is not None and trainer.progress.elapsed_seconds >= config.max_time:
                raise TrainError(
                    f"{args.out} has already used its time budget ({trainer.progress.elapsed_seconds:.0f} s "
                    f"of --max-time {config.max_time:g}); raise --max-time (0: no limit) to continue"
                )
            if trainer.progress.step >= config.max_steps:
                raise TrainError(
                    f"{args.out} is already trained to step {trainer.progress.step} (--max-steps "
                    f"{config.max_steps}); raise --max-steps to continue"
                )
            wall_start -= trainer.progress.wall_seconds
        trainer.log(
            f"{config.arch} {trainer.model_config.embedding_size}/{config.hidden_size}x{config.num_layers} "
            f"({sum(p.numel() for p in trainer.model.parameters()):,} parameters), vocab "
            f"{corpus.tokenizer.vocab_size}, data {spec.description}: {corpus.num_train_tokens:,} train / "
            f"{corpus.num_validation_tokens:,} validation tokens; {device}, world size {context.world_size}, "
            f"{torch.get_num_threads()} threads; from step {trainer.progress.step}"
        )
        stop_reason = trainer.run(wall_start)
        if stop_reason == "interrupted":
            trainer.log(
                f"interrupted at step {trainer.progress.step}; progress saved in {args.out} "
                "(continue with --resume)"
            )
            return EXIT_INTERRUPTED
        metrics = trainer.finish(stop_reason, wall_start)
        if context.is_main:
            sample = trainer.sample(args.sample_prompt)
            if sample is not None:
                print(f"--- greedy sample ---\n{sample}\n---")
            print(
                f"val_loss {metrics['val_loss']:.4f} nats/token (perplexity {metrics['val_perplexity']:.2f}, "
                f"{metrics['val_bits_per_token']:.3f} bits/token) at step {metrics['best_step']}; "
                f"{metrics['steps']} steps ({stop_reason}), "
                f"{metrics['train_tokens_per_second']:,.0f} tokens/s, "
                f"{metrics['wall_seconds']:.1f} s; checkpoint {args.out}"
            )
        return 0
    except (TrainError, DataError, CheckpointError, DistributedError) as error:
        print(f"rnnserve train: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rnnserve train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.teardown(context)


if __name__ == "__main__":
    sys.exit(main())
