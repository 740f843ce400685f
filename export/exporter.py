"""Checkpoint -> verified ONNX model version in a model repository, and re-verification of one.

    export_checkpoint(ckpt, repo, name)      build, verify, write config.json, publish atomically
    verify_version(repo / name / "3")        re-run verification of a published version

An export goes: load the checkpoint (CheckpointError if missing or corrupted) -> build the graph
from the weights (export/graph.py; int8 through export/quantize.py) -> write model.onnx into
<repo>/<name>/.tmp-<random>/ -> verify that very file against PyTorch (export/verify.py) ->
measure validation loss when the checkpoint's data can be rebuilt -> write config.json -> rename
the staging directory to <repo>/<name>/<version>. Any failure removes the staging directory, so
the repository never holds half an export.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from onnx import TensorProto

from contract import signature as sig
from contract.hashing import sha256_file
from contract.model_config import PRECISIONS, config_metadata
from export import evaluate, graph, publish, quantize, verify
from export.errors import ExportError, VerificationError
from export.report import VerificationReport
from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint

CONFIG_FORMAT = "rnnserve-model/1"
SOURCE_CHECKPOINT_KEY = "source_checkpoint"  # absolute path of the checkpoint, for --verify-only


@dataclass(frozen=True)
class ExportResult:
    """A published version and what it took to make it."""

    path: Path  # <repository>/<name>/<version>
    name: str
    version: int
    precision: str
    model_sha256: str
    max_abs_error: float  # largest |ONNX - PyTorch| over every verification check
    max_abs_error_by_tensor: dict[str, float]
    verification: VerificationReport
    metrics: dict[str, Any]  # as in config.json
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and "total"


def producer_versions() -> dict[str, str]:
    try:
        rnnserve_version = package_metadata.version("rnnserve")
    except package_metadata.PackageNotFoundError:
        rnnserve_version = "unknown"
    return {
        "rnnserve": rnnserve_version,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def model_metadata(checkpoint: Checkpoint, precision: str, producer: dict[str, str]) -> dict[str, str]:
    """metadata_props for the ONNX file: every key of signature.METADATA_KEYS, as strings."""
    config = checkpoint.config
    values = {
        **config_metadata(config),
        "tokenizer": json.dumps(checkpoint.tokenizer, ensure_ascii=False, sort_keys=True),
        "checkpoint_sha256": checkpoint.weights_sha256,
        "precision": precision,
        "producer_versions": json.dumps(producer, sort_keys=True),
    }
    return {key: values[key] for key in sig.METADATA_KEYS}


def build_onnx(checkpoint: Checkpoint, precision: str, metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model of `checkpoint` at `precision` (fp32 graph, quantized for int8)."""
    config = checkpoint.config
    weights = {name: tensor.detach().cpu().numpy() for name, tensor in checkpoint.model.state_dict().items()}
    float_type = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    model = graph.build_model(
        config.arch, config.num_layers, config.hidden_size, weights, metadata, float_type=float_type
    )
    if precision == "int8":
        model = quantize.quantize_int8(model, config.arch)
    return model


def export_checkpoint(
    checkpoint_dir: Path | str,
    repository: Path | str,
    name: str,
    version: int | None = None,
    precision: str = "fp32",
    *,
    device: str = "auto",
) -> ExportResult:
    """Export, verify and publish `checkpoint_dir` as <repository>/<name>/<version>.

    `version` None takes the next free number. `device` picks where verification runs (auto:
    CPU, or CUDA for fp16 when onnxruntime-gpu sees a device). Raises CheckpointError (bad
    checkpoint), RepositoryError / VersionExistsError (bad path, name or taken version),
    QuantizationError, VerificationError (with `.report`), ExportError (verification device not
    available), or ValueError (unknown precision or device). Nothing is left in the repository
    when it raises.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 4)
        return now

    # Everything that can be refused cheaply is refused before the checkpoint is read.
    model_dir = publish.check_repository(Path(repository), name)
    chosen = publish.choose_version(model_dir, version)
    verify.choose_provider(precision, device)

    checkpoint = load_checkpoint(checkpoint_dir)
    mark = lap("load_checkpoint", started)
    producer = producer_versions()
    model = build_onnx(checkpoint, precision, model_metadata(checkpoint, precision, producer))
    mark = lap("build" if precision != "int8" else "build_and_quantize", mark)

    with publish.staging_directory(model_dir) as staging:
        model_path = staging / sig.MODEL_FILE
        publish.write_file(model_path, model.SerializeToString())
        del model
        mark = lap("write", mark)

        validation, validation_note = evaluate.load_validation_data(checkpoint)
        report, _ = verify.verify_model(
            model_path, checkpoint, precision, device=device, validation=validation
        )
        mark = lap("verify", mark)
        if not report.passed:
            raise VerificationError(report)

        metrics = _metrics(checkpoint, precision, report, validation_note)
        config = {
            "format": CONFIG_FORMAT,
            "name": name,
            "version": chosen,
            **{
                key: getattr(checkpoint.config, key)
                for key in ("arch", "vocab_size", "embedding_size", "hidden_size", "num_layers", "pad_id")
            },
            "precision": precision,
            "tokenizer": checkpoint.tokenizer,
            "model_sha256": sha256_file(model_path),
            "checkpoint_sha256": checkpoint.weights_sha256,
            "metrics": metrics,
            "verification": report.to_dict(),
            "opset": sig.OPSET,
            "producer": producer,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            SOURCE_CHECKPOINT_KEY: str(Path(checkpoint_dir).resolve()),
        }
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        publish.write_file(staging / sig.CONFIG_FILE, text.encode("utf-8"))
        path = publish.publish(staging, model_dir, chosen)
        lap("publish", mark)
    timings["total"] = round(time.perf_counter() - started, 4)
    return ExportResult(
        path=path,
        name=name,
        version=chosen,
        precision=precision,
        model_sha256=config["model_sha256"],
        max_abs_error=report.max_abs_error,
        max_abs_error_by_tensor=report.max_abs_error_by_tensor(),
        verification=report,
        metrics=metrics,
        timings=timings,
    )


def _metrics(
    checkpoint: Checkpoint, precision: str, report: VerificationReport, validation_note: str
) -> dict[str, Any]:
    """config.json "metrics": this variant's validation loss next to fp32's, and where they came from."""
    recorded = checkpoint.metrics.get("val_loss")
    recorded = float(recorded) if isinstance(recorded, int | float) else None
    notes: list[str] = []
    if report.validation:
        val_loss = report.validation["val_loss"]
        val_loss_fp32 = report.validation["val_loss_fp32"]
        source = f"recomputed on {report.validation['data']}"
    else:
        val_loss_fp32 = recorded
        val_loss = recorded if precision == "fp32" else None
        source = "recorded in the checkpoint" if recorded is not None else "unavailable"
        notes.append(f"validation data not rebuilt: {validation_note}")
        if precision != "fp32":
            notes.append(
                f"the {precision} validation loss needs the validation data; see greedy agreement and KL"
            )
    return {
        "val_loss": val_loss,
        "val_loss_fp32": val_loss_fp32,
        "val_loss_source": source,
        "checkpoint_step": checkpoint.step,
        "checkpoint_metrics": checkpoint.metrics,
        "notes": notes,
    }


def read_config(version_dir: Path) -> dict[str, Any]:
    path = version_dir / sig.CONFIG_FILE
    if not version_dir.is_dir():
        raise ExportError(
            f"{version_dir} is not a model version directory (expected <repository>/<name>/<version>)"
        )
    if not path.is_file():
        raise ExportError(f"{version_dir} has no {sig.CONFIG_FILE}; is it an rnnserve model version?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ExportError(f"{path} is not an rnnserve model config (expected format {CONFIG_FORMAT!r})")
    return config


def verify_version(
    version_dir: Path | str, checkpoint_dir: Path | str | None = None, *, device: str = "auto"
) -> VerificationReport:
    """Re-run verification of a published version against its PyTorch checkpoint.

    The checkpoint is `checkpoint_dir`, else the one config.json records as source_checkpoint.
    Besides the export-time checks this checks that model.onnx still has the sha256 config.json
    records and that config.json describes the checkpoint. Returns the report; raises
    ExportError when the version or its checkpoint cannot be found, CheckpointError when the
    checkpoint is corrupted.
    """
    version_dir = Path(version_dir)
    config = read_config(version_dir)
    precision = config.get("precision")
    if precision not in PRECISIONS:
        raise ExportError(f"{version_dir / sig.CONFIG_FILE}: unknown precision {precision!r}")
    source = checkpoint_dir if checkpoint_dir is not None else config.get(SOURCE_CHECKPOINT_KEY)
    if not source:
        raise ExportError(
            f"{version_dir / sig.CONFIG_FILE} records no {SOURCE_CHECKPOINT_KEY}; verification needs the "
            "PyTorch checkpoint as the oracle: pass --checkpoint CKPT_DIR"
        )
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as error:
        origin = "given with --checkpoint" if checkpoint_dir is not None else f"recorded in {sig.CONFIG_FILE}"
        raise CheckpointError(
            f"{error} (the checkpoint {origin}; pass --checkpoint to use another)"
        ) from None

    report = verify.new_report(precision)
    model_path = version_dir / sig.MODEL_FILE
    integrity = report.add_check("integrity")
    if not model_path.is_file():
        report.fail(integrity, sig.MODEL_FILE, f"missing from {version_dir}")
        return report
    digest = sha256_file(model_path)
    if digest != config.get("model_sha256"):
        report.fail(
            integrity,
            sig.MODEL_FILE,
            f"sha256 {digest[:12]}… differs from {str(config.get('model_sha256'))[:12]}… "
            f"recorded in {sig.CONFIG_FILE} (the file changed after export)",
        )
    described = report.add_check("config")
    expected = {
        key: getattr(checkpoint.config, key)
        for key in ("arch", "vocab_size", "embedding_size", "hidden_size", "num_layers", "pad_id")
    }
    expected["checkpoint_sha256"] = checkpoint.weights_sha256
    expected["tokenizer"] = checkpoint.tokenizer
    for key, value in expected.items():
        if config.get(key) != value:
            report.fail(
                described, key, f"{sig.CONFIG_FILE} says {config.get(key)!r}, the checkpoint says {value!r}"
            )

    validation, _ = evaluate.load_validation_data(checkpoint)
    verify.verify_model(
        model_path, checkpoint, precision, device=device, validation=validation, report=report
    )
    return report
