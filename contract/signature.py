"""The ONNX signature of an rnnserve model: the one source of truth for exporter and server.

Batch-major state, named dynamic `batch` and `seq` dimensions, right-padded token chunks whose
real lengths drive `sequence_lens` of every LSTM/GRU node (see docs/architecture.md).
"""

from __future__ import annotations

OPSET = 17

BATCH = "batch"
SEQ = "seq"

TOKENS = "tokens"  # int64 (batch, seq)
LENGTHS = "lengths"  # int32 (batch,)
H0 = "h0"  # float32 (batch, num_layers, hidden)
C0 = "c0"  # float32 (batch, num_layers, hidden), LSTM only
LOGITS = "logits"  # float32 (batch, seq, vocab)
HN = "hn"  # float32 (batch, num_layers, hidden)
CN = "cn"  # float32 (batch, num_layers, hidden), LSTM only
# Optional extra output written by rnnserve's exporter: the logits after each row's last real
# token, (batch, vocab). The server asks for it instead of `logits`, so a long prompt does not
# pay the vocabulary projection at every position. Models without it are served from `logits`.
LAST_LOGITS = "last_logits"

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"

# metadata_props keys every exported model carries.
METADATA_KEYS = (
    "arch",
    "vocab_size",
    "num_layers",
    "hidden_size",
    "embedding_size",
    "pad_id",
    "tokenizer",
    "checkpoint_sha256",
    "precision",
    "producer_versions",
)


def state_input_names(arch: str) -> tuple[str, ...]:
    return (H0, C0) if arch == "lstm" else (H0,)


def state_output_names(arch: str) -> tuple[str, ...]:
    return (HN, CN) if arch == "lstm" else (HN,)


def input_names(arch: str) -> tuple[str, ...]:
    return (TOKENS, LENGTHS, *state_input_names(arch))


def output_names(arch: str) -> tuple[str, ...]:
    """The contract's outputs, in order (LAST_LOGITS is an optional extra, not listed here)."""
    return (LOGITS, *state_output_names(arch))
