"""Read a model repository: find complete versions, validate them, refuse malformed ones.

    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/config.json

`scan_repository` looks at directories and config.json only (cheap enough to poll for hot
reload); `load_model_proto` then checks model.onnx against its config (sha256, ONNX metadata,
input and output names, dtypes and shapes) before anything is served from it. A version that fails
any check is refused with a reason naming the file and the disagreement; the rest still serve.
Directories whose name starts with "." (an export in progress, `.tmp-*`) are skipped silently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from contract import signature as sig
from contract.hashing import sha256_file
from contract.model_config import ARCHITECTURES, PRECISIONS, config_metadata
from contract.model_name import MODEL_NAME_RULE, valid_model_name
from contract.tokenizer import Tokenizer, TokenizerError, tokenizer_from_dict

log = logging.getLogger(__name__)

CONFIG_FORMAT = "rnnserve-model/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RepositoryError(Exception):
    """A model version that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelManifest:
    """A version's validated config.json: what the server needs to load and describe it."""

    name: str
    version: int
    path: Path  # the version directory
    arch: str  # "lstm" or "gru"
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    pad_id: int
    precision: str  # "fp32", "int8" or "fp16"
    tokenizer: Mapping[str, Any]  # tokenizer_from_dict input
    model_sha256: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)  # the whole config.json

    @property
    def model_path(self) -> Path:
        return self.path / sig.MODEL_FILE

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the state tensors as the wire shows them: ("h", "c") or ("h",)."""
        return ("h", "c") if self.arch == "lstm" else ("h",)

    @property
    def label(self) -> str:
        return f"model {self.name!r} version {self.version}"

    def make_tokenizer(self) -> Tokenizer:
        return tokenizer_from_dict(dict(self.tokenizer))


@dataclass(frozen=True)
class RefusedVersion:
    path: Path
    reason: str


@dataclass(frozen=True)
class RepositoryScan:
    """Complete, valid-looking versions (by name, ascending version) and refused ones."""

    versions: dict[str, list[ModelManifest]]
    refused: list[RefusedVersion]

    def latest(self, name: str) -> ModelManifest | None:
        found = self.versions.get(name)
        return found[-1] if found else None


def scan_repository(root: Path) -> RepositoryScan:
    """Find every complete version under `root` and validate its config.json.

    Raises RepositoryError only when `root` itself is not a directory.
    """
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    versions: dict[str, list[ModelManifest]] = {}
    refused: list[RefusedVersion] = []
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        for version_dir in sorted(model_dir.iterdir()):
            if version_dir.name.startswith(".") or not version_dir.is_dir():
                continue
            try:
                manifest = read_manifest(version_dir)
            except RepositoryError as error:
                refused.append(RefusedVersion(version_dir, str(error)))
                continue
            versions.setdefault(manifest.name, []).append(manifest)
    for found in versions.values():
        found.sort(key=lambda m: m.version)
    return RepositoryScan(versions, refused)


def _require(config: Mapping[str, Any], key: str, kind: type, where: Path) -> Any:
    value = config.get(key)
    # bool is an int in Python; a config saying `"hidden_size": true` is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RepositoryError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def read_manifest(version_dir: Path) -> ModelManifest:
    """Validate one version directory's layout and config.json (not model.onnx's contents)."""
    name = version_dir.parent.name
    if not valid_model_name(name):
        raise RepositoryError(f"{version_dir.parent}: model names are {MODEL_NAME_RULE}")
    digits = version_dir.name
    if not digits.isdigit() or int(digits) < 1 or digits != str(int(digits)):
        raise RepositoryError(
            f"{version_dir}: version directory names must be positive integers like 1, 2, 3"
        )
    version = int(version_dir.name)
    config_path = version_dir / sig.CONFIG_FILE
    for required in (version_dir / sig.MODEL_FILE, config_path):
        if not required.is_file():
            raise RepositoryError(f"{version_dir}: incomplete version, {required.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RepositoryError(f"{config_path}: not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise RepositoryError(f"{config_path}: must be a JSON object")
    if config.get("format") != CONFIG_FORMAT:
        raise RepositoryError(
            f"{config_path}: format must be {CONFIG_FORMAT!r}, got {config.get('format')!r}"
        )
    if config.get("name") != name:
        raise RepositoryError(
            f"{config_path}: name {config.get('name')!r} disagrees with its directory {name!r}"
        )
    if _require(config, "version", int, config_path) != version:
        raise RepositoryError(
            f"{config_path}: version {config['version']} disagrees with its directory {version_dir.name!r}"
        )
    arch = _require(config, "arch", str, config_path)
    if arch not in ARCHITECTURES:
        raise RepositoryError(f"{config_path}: arch must be one of {ARCHITECTURES}, got {arch!r}")
    sizes = {
        key: _require(config, key, int, config_path)
        for key in ("vocab_size", "embedding_size", "hidden_size", "num_layers")
    }
    for key, value in sizes.items():
        if value < 1:
            raise RepositoryError(f"{config_path}: {key} must be positive, got {value}")
    pad_id = _require(config, "pad_id", int, config_path)
    if not 0 <= pad_id < sizes["vocab_size"]:
        raise RepositoryError(f"{config_path}: pad_id {pad_id} is outside 0..{sizes['vocab_size'] - 1}")
    precision = _require(config, "precision", str, config_path)
    if precision not in PRECISIONS:
        raise RepositoryError(f"{config_path}: precision must be one of {PRECISIONS}, got {precision!r}")
    model_sha256 = _require(config, "model_sha256", str, config_path)
    if not _SHA256.match(model_sha256):
        raise RepositoryError(f"{config_path}: model_sha256 must be 64 lower-case hex digits")
    tokenizer = _require(config, "tokenizer", dict, config_path)
    try:
        tokenizer_size = tokenizer_from_dict(tokenizer).vocab_size
    except (TokenizerError, KeyError, TypeError, ValueError) as error:
        raise RepositoryError(f"{config_path}: bad tokenizer: {error}") from None
    if tokenizer_size > sizes["vocab_size"]:
        raise RepositoryError(
            f"{config_path}: the tokenizer has {tokenizer_size} ids but the model only {sizes['vocab_size']}"
        )
    metrics = config.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise RepositoryError(f"{config_path}: metrics must be a JSON object")
    return ModelManifest(
        name=name,
        version=version,
        path=version_dir,
        arch=arch,
        pad_id=pad_id,
        precision=precision,
        tokenizer=tokenizer,
        model_sha256=model_sha256,
        metrics=metrics,
        config=config,
        **sizes,
    )


def load_model_proto(manifest: ModelManifest) -> onnx.ModelProto:
    """Read model.onnx and check it against config.json; raise RepositoryError on any disagreement."""
    path = manifest.model_path
    try:
        actual = sha256_file(path)
    except OSError as error:
        raise RepositoryError(f"{path}: cannot be read: {error}") from None
    if actual != manifest.model_sha256:
        raise RepositoryError(
            f"{path}: sha256 {actual[:12]}… does not match {manifest.model_sha256[:12]}… in "
            f"{sig.CONFIG_FILE} (a truncated or replaced file)"
        )
    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, ValueError, ... for a damaged file
        raise RepositoryError(f"{path}: not a readable ONNX model: {error}") from None
    check_model_agrees(manifest, model)
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def check_model_agrees(manifest: ModelManifest, model: onnx.ModelProto) -> None:
    """Metadata, input/output names, dtypes and static shapes must agree with the config."""
    where = manifest.model_path
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    problems = []
    for key, written in config_metadata(manifest).items():
        if key not in metadata:
            problems.append(f"metadata {key!r} is missing")
        elif metadata[key] != written:
            problems.append(
                f"metadata {key}={metadata[key]!r} but config.json says {getattr(manifest, key)!r}"
            )
    inputs = {value.name: value for value in model.graph.input}
    outputs = {value.name: value for value in model.graph.output}
    expected_inputs = sig.input_names(manifest.arch)
    if sorted(inputs) != sorted(expected_inputs):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(expected_inputs)}")
    state_dims = [manifest.num_layers, manifest.hidden_size]
    expected_types = {sig.TOKENS: TensorProto.INT64, sig.LENGTHS: TensorProto.INT32}
    for name in sig.state_input_names(manifest.arch):
        expected_types[name] = TensorProto.FLOAT
    for name, elem_type in expected_types.items():
        if name in inputs and inputs[name].type.tensor_type.elem_type != elem_type:
            problems.append(
                f"input {name!r} has element type "
                f"{TensorProto.DataType.Name(inputs[name].type.tensor_type.elem_type)}, expected "
                f"{TensorProto.DataType.Name(elem_type)}"
            )
    for name in (*sig.state_input_names(manifest.arch), *sig.state_output_names(manifest.arch)):
        value = inputs.get(name) or outputs.get(name)
        if value is None:
            if name not in expected_inputs:
                problems.append(f"output {name!r} is missing")
            continue
        if _dims(value)[1:] != state_dims:
            problems.append(
                f"{name!r} has shape {_dims(value)}, expected [batch, {state_dims[0]}, {state_dims[1]}]"
            )
    if sig.LAST_LOGITS in outputs:
        if _dims(outputs[sig.LAST_LOGITS])[1:] != [manifest.vocab_size]:
            problems.append(
                f"{sig.LAST_LOGITS!r} has shape {_dims(outputs[sig.LAST_LOGITS])}, "
                f"expected [batch, {manifest.vocab_size}]"
            )
    elif sig.LOGITS in outputs:
        if _dims(outputs[sig.LOGITS])[2:] != [manifest.vocab_size]:
            problems.append(
                f"{sig.LOGITS!r} has shape {_dims(outputs[sig.LOGITS])}, "
                f"expected [batch, seq, {manifest.vocab_size}]"
            )
    else:
        problems.append(f"neither {sig.LAST_LOGITS!r} nor {sig.LOGITS!r} is an output")
    if problems:
        raise RepositoryError(f"{where} disagrees with {sig.CONFIG_FILE}: " + "; ".join(problems))


def serving_candidates(scan: RepositoryScan, pinned: Mapping[str, int]) -> dict[str, list[ModelManifest]]:
    """For each model, the versions worth trying to serve, best first.

    A pinned model has only its pinned version; any other model lists its versions newest first,
    so that a corrupt latest version (refused at load) falls back to the one before it. A pin
    naming a model or version that is not in the scan raises RepositoryError.
    """
    for name, version in pinned.items():
        have = sorted(m.version for m in scan.versions.get(name, []))
        if version not in have:
            raise RepositoryError(
                f"--pin {name}={version}: that version is not in the repository "
                f"(valid versions of {name!r}: {have or 'none'})"
            )
    return {
        name: [m for m in found if m.version == pinned[name]] if name in pinned else found[::-1]
        for name, found in scan.versions.items()
    }
