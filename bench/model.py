"""The models a benchmark runs on: synthetic ones from random weights, or real exported ones.

A benchmark measures speed, not quality, so by default it builds its models from random numpy
weights with export.graph.build_model (torch-free: the bench runs in the serving environment) at
the requested sizes and writes them into a temporary model repository in the format the server
loads (<repo>/<name>/<version>/model.onnx + config.json). A real model is copied from its
repository instead, so the server under test loads only the models being measured.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from contract import signature as sig
from contract.tokenizer import IdTokenizer

# Gates per layer in PyTorch's stacked weights: LSTM (i, f, g, o), GRU (r, z, n).
_GATES = {"lstm": 4, "gru": 3}
SYNTHETIC_VERSION = 1


class BenchModelError(ValueError):
    """A model to benchmark is missing, incomplete or described inconsistently."""


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of a synthetic model (the `seed` preset's LSTM/GRU by default)."""

    vocab_size: int = 65  # the Shakespeare character vocabulary
    embedding_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1


@dataclass(frozen=True)
class BenchModel:
    """One model version as the benchmark addresses it, in the repository the server loads."""

    name: str  # model name in the repository, sent in OpenSession / GenerateRequest
    version: int
    arch: str  # "lstm" or "gru"
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    precision: str  # "fp32", "int8" or "fp16"
    path: Path  # the version directory holding model.onnx and config.json
    val_loss: float | None  # validation loss recorded at export; None for a synthetic model
    val_loss_fp32: float | None  # an int8/fp16 export's record of its fp32 model's validation loss

    @property
    def model_file(self) -> Path:
        return self.path / sig.MODEL_FILE

    @property
    def state_tensors(self) -> int:
        """Recurrent state tensors per session: h and c for LSTM, h for GRU."""
        return len(sig.state_input_names(self.arch))

    @property
    def state_bytes_per_session(self) -> int:
        """float32 bytes of one session's state: tensors x layers x hidden x 4."""
        return self.state_tensors * self.num_layers * self.hidden_size * 4

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "arch": self.arch,
            "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "precision": self.precision,
            "state_bytes_per_session": self.state_bytes_per_session,
            "val_loss": self.val_loss,
            "val_loss_fp32": self.val_loss_fp32,
        }


def random_weights(arch: str, sizes: ModelSizes, seed: int) -> dict[str, np.ndarray]:
    """PyTorch-named float32 weights with PyTorch's default initialisation ranges."""
    if arch not in _GATES:
        raise BenchModelError(f"arch must be one of {sorted(_GATES)}, got {arch!r}")
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(sizes.hidden_size)
    gated = _GATES[arch] * sizes.hidden_size

    def uniform(*shape: int) -> np.ndarray:
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    weights = {
        "embedding.weight": rng.standard_normal((sizes.vocab_size, sizes.embedding_size)).astype(np.float32)
    }
    for layer in range(sizes.num_layers):
        input_size = sizes.embedding_size if layer == 0 else sizes.hidden_size
        weights[f"rnn.weight_ih_l{layer}"] = uniform(gated, input_size)
        weights[f"rnn.weight_hh_l{layer}"] = uniform(gated, sizes.hidden_size)
        weights[f"rnn.bias_ih_l{layer}"] = uniform(gated)
        weights[f"rnn.bias_hh_l{layer}"] = uniform(gated)
    weights["decoder.weight"] = uniform(sizes.vocab_size, sizes.hidden_size)
    weights["decoder.bias"] = uniform(sizes.vocab_size)
    return weights


def write_synthetic_model(repository: Path, name: str, arch: str, sizes: ModelSizes, seed: int) -> BenchModel:
    """Build a random-weight model and publish it as REPOSITORY/NAME/1, like an export would."""
    import onnx
    import onnxruntime

    from export.graph import build_model

    tokenizer = IdTokenizer(sizes.vocab_size).to_dict()
    checkpoint_sha256 = hashlib.sha256(f"rnnserve-bench:{arch}:{sizes}:{seed}".encode()).hexdigest()
    producer = {
        "rnnserve": "bench",
        "torch": "none",
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    metadata = {
        "arch": arch,
        "vocab_size": str(sizes.vocab_size),
        "num_layers": str(sizes.num_layers),
        "hidden_size": str(sizes.hidden_size),
        "embedding_size": str(sizes.embedding_size),
        "pad_id": "0",
        "tokenizer": json.dumps(tokenizer),
        "checkpoint_sha256": checkpoint_sha256,
        "precision": "fp32",
        "producer_versions": json.dumps(producer),
    }
    proto = build_model(
        arch, sizes.num_layers, sizes.hidden_size, random_weights(arch, sizes, seed), metadata
    )
    model_bytes = proto.SerializeToString()
    config = {
        "format": "rnnserve-model/1",
        "name": name,
        "version": SYNTHETIC_VERSION,
        "arch": arch,
        "vocab_size": sizes.vocab_size,
        "embedding_size": sizes.embedding_size,
        "hidden_size": sizes.hidden_size,
        "num_layers": sizes.num_layers,
        "pad_id": 0,
        "precision": "fp32",
        "tokenizer": tokenizer,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "checkpoint_sha256": checkpoint_sha256,
        "metrics": {"val_loss": None, "val_loss_fp32": None},
        "verification": {
            "synthetic": "random weights written by rnnserve bench; not verified against PyTorch"
        },
        "opset": sig.OPSET,
        "producer": producer,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written beside the final directory, then renamed, as the repository contract requires.
    staging = repository / name / f".tmp-bench-{SYNTHETIC_VERSION}"
    staging.mkdir(parents=True)
    (staging / sig.MODEL_FILE).write_bytes(model_bytes)
    (staging / sig.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    final = repository / name / str(SYNTHETIC_VERSION)
    staging.rename(final)
    return read_model(final)


def _optional_float(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def read_model(version_dir: Path) -> BenchModel:
    """Describe the model version in VERSION_DIR from its config.json."""
    config_path = version_dir / sig.CONFIG_FILE
    if not (version_dir / sig.MODEL_FILE).is_file() or not config_path.is_file():
        raise BenchModelError(
            f"{version_dir} is not a model version: it needs {sig.MODEL_FILE} and {sig.CONFIG_FILE}"
        )
    try:
        config = json.loads(config_path.read_text())
        metrics = config.get("metrics") or {}
        return BenchModel(
            name=str(config["name"]),
            version=int(config["version"]),
            arch=str(config["arch"]),
            vocab_size=int(config["vocab_size"]),
            embedding_size=int(config["embedding_size"]),
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_layers"]),
            precision=str(config.get("precision", "fp32")),
            path=version_dir,
            val_loss=_optional_float(metrics.get("val_loss")),
            val_loss_fp32=_optional_float(metrics.get("val_loss_fp32")),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise BenchModelError(f"{config_path} is not a valid rnnserve config.json: {error!r}") from None


def latest_version_dir(repository: Path, name: str) -> Path:
    """REPOSITORY/NAME/<highest complete version>."""
    model_dir = repository / name
    versions = (
        sorted(
            (
                int(entry.name)
                for entry in model_dir.iterdir()
                if entry.name.isdigit()
                and int(entry.name) > 0
                and (entry / sig.MODEL_FILE).is_file()
                and (entry / sig.CONFIG_FILE).is_file()
            ),
        )
        if model_dir.is_dir()
        else []
    )
    if not versions:
        raise BenchModelError(f"model {name!r} has no complete version in {repository}")
    return model_dir / str(versions[-1])


def resolve_spec(repository: Path, spec: str) -> Path:
    """The version directory of SPEC: "name" (its latest version) or "name:version"."""
    name, _, version = spec.partition(":")
    if not name or (version and not (version.isdigit() and int(version) > 0)):
        raise BenchModelError(f"model {spec!r}: expected NAME or NAME:VERSION with a positive version")
    return repository / name / version if version else latest_version_dir(repository, name)


def copy_model(source_repository: Path, spec: str, repository: Path) -> BenchModel:
    """Copy model SPEC ("name" for its latest version, or "name:version") into REPOSITORY."""
    source = resolve_spec(source_repository, spec)
    model = read_model(source)
    target = repository / model.name / str(model.version)
    target.mkdir(parents=True)
    for file_name in (sig.MODEL_FILE, sig.CONFIG_FILE):
        shutil.copy2(source / file_name, target / file_name)
    return read_model(target)
