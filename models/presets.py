"""Training configuration: one frozen dataclass, and the named presets that fill it.

Every field is also a `rnnserve train` flag (`hidden_size` -> `--hidden-size`); a flag overrides
the preset's value. The presets:

- `tiny`: a few seconds, for tests and smoke runs.
- `default`: what `make serve` trains on first start. The loop stops after `max_time` seconds (or
  `max_steps`), and the cosine schedule ends at whichever budget runs out first, so a slower
  machine trains fewer steps rather than longer. Chosen by measurement on the shared 2-core CPU,
  in equal time budgets: a 256-wide embedding learns much faster per step than a 64-wide one
  (1.96 vs 2.12 nats after 100 steps at hidden 256), and batches of 16 rows beat 32 and 64
  (more updates for nearly the same tokens/s), on one thread. About 1.65 nats/char on Shakespeare's held-out
  split after 105 s of training; two minutes in all with loading and the final evaluation.
- `seed`: the reference sizes (embedding 256, hidden 512, one layer) with the plain recipe
  (AdamW 3e-3, no schedule, batch 64 x 128), for comparison with the issue's calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Model sizes and optimization settings of one training run."""

    arch: str = "lstm"  # "lstm" or "gru"
    embedding_size: int = 256  # token embedding width
    hidden_size: int = 512  # recurrent state width (h, and c for LSTM)
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between recurrent layers (needs num_layers > 1)
    batch_size: int = 64  # rows per step (per rank when distributed)
    seq_len: int = 128  # tokens per row (text); longer JSONL sequences are cut to this
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    lr_schedule: str = "constant"  # "cosine" (warmup, then decay to min_lr_ratio * lr) or "constant"
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine: the final learning rate as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    max_steps: int = 2000  # optimizer steps in all
    max_time: float | None = None  # seconds of training in all (resumes included); None: no limit
    eval_every: int = 200  # steps between validations (and last-state saves)
    eval_tokens: int | None = 32768  # tokens per periodic validation; None: the whole split
    seed: int = 0  # seeds weights, batches, dropout and the data split
    sample_tokens: int = 200  # length of the greedy sample printed at the end (text data)
    threads: int | None = None  # CPU threads per process; None: the usable cores / local ranks

    def __post_init__(self) -> None:
        positive = ("embedding_size", "hidden_size", "num_layers", "batch_size", "seq_len", "max_steps")
        for name in (*positive, "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"max_time must be positive seconds, got {self.max_time}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"eval_tokens must be positive, got {self.eval_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        embedding_size=16,
        hidden_size=32,
        batch_size=8,
        seq_len=32,
        lr=1e-2,
        max_steps=30,
        eval_every=10,
        eval_tokens=2048,
        sample_tokens=40,
    ),
    # Measured on the shared 2-core CPU (see the module docstring): small batches give many updates
    # in the short budget, and a wide embedding learns much faster per step than a narrow one.
    "default": TrainConfig(
        embedding_size=256,
        hidden_size=256,
        batch_size=16,
        seq_len=128,
        lr=6e-3,
        lr_schedule="cosine",
        warmup_steps=10,
        min_lr_ratio=0.05,
        max_steps=50_000,
        max_time=105.0,
        eval_every=200,
        eval_tokens=32768,
        # A 16-row step is too small to split across threads: on the shared 2-core CPU one thread
        # trained at 17-24 k tokens/s where two managed 9-16 k.
        threads=1,
    ),
    "seed": TrainConfig(
        embedding_size=256,
        hidden_size=512,
        batch_size=64,
        seq_len=128,
        lr=3e-3,
        lr_schedule="constant",
        max_steps=100_000,
        max_time=None,
        eval_every=200,
        eval_tokens=65536,
    ),
}


def preset_config(name: str, arch: str, **overrides: Any) -> TrainConfig:
    """The preset `name` for `arch`, with the non-None `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], arch=arch, **values)
