"""Check an exported ONNX model against its PyTorch checkpoint before anyone serves it.

Order, as in optimum's exporters: the file loads; its signature (names, dtypes, named dynamic
dims) and structure (one LSTM/GRU node per layer with `sequence_lens` = `lengths`, no
Loop/Scan/Dropout) and metadata are right; then, in ONE onnxruntime session, every run's output
shapes and then values match PyTorch:

    full/seq=T/batch=B   T in 1, 2, 7, 64 and B in 1, 3, from a random non-zero state
    chunked              64 tokens fed as chunks of 1, 6, 20, 37 carrying hn/cn == one full run
    ragged               a padded batch with `lengths` == PyTorch's packed sequences, and each
                         row == that row run alone
    greedy               200 greedily decoded tokens (teacher-forced on PyTorch's choices, which
                         also tells where free-running decoding would first diverge)
    validation_loss      when validation data is given: the variant's loss next to fp32's

Every failure is collected (check, tensor, numbers); nothing stops at the first one except a file
or session that cannot be loaded at all. `verify_model` returns a report; the caller decides what
a failure means (the exporter publishes nothing).

Tolerances and criteria per precision are in export/report.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto

from contract import signature as sig
from contract.model_config import PRECISIONS, config_metadata
from contract.ort_errors import ORT_ERRORS
from export import evaluate
from export.errors import ExportError
from export.report import CRITERIA, DEVICES, CheckResult, VerificationReport
from models.checkpoint import Checkpoint

SEQUENCE_LENGTHS = (1, 2, 7, 64)
BATCH_SIZES = (1, 3)
CHUNKS = (1, 6, 20, 37)  # sums to 64
RAGGED_LENGTHS = (64, 7, 1)
GREEDY_PROMPT_TOKENS = 8
GREEDY_TOKENS = 200
SEED = 20240607

FORBIDDEN_OPS = ("Loop", "Scan", "Dropout")
SEQUENCE_LENS_INPUT = 4  # position of `sequence_lens` among ONNX LSTM/GRU inputs


class OnnxModel:
    """One onnxruntime session over an rnnserve model, with the contract's feeds and outputs."""

    def __init__(self, session: ort.InferenceSession, arch: str) -> None:
        self.session = session
        self.arch = arch
        self.state_inputs = sig.state_input_names(arch)
        self.state_outputs = sig.state_output_names(arch)
        self.has_last_logits = any(o.name == sig.LAST_LOGITS for o in session.get_outputs())

    def run(
        self, tokens: np.ndarray, lengths: np.ndarray, state: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """tokens (B, T) int64, lengths (B,) int32, state tensors (B, L, H) -> every output by name."""
        feeds = {sig.TOKENS: tokens, sig.LENGTHS: lengths}
        feeds.update(zip(self.state_inputs, state, strict=True))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feeds), strict=True))

    def logits_function(self, num_layers: int, hidden_size: int) -> evaluate.LogitsFunction:
        def logits_of(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            zeros = np.zeros((tokens.shape[0], num_layers, hidden_size), np.float32)
            return self.run(tokens, lengths.astype(np.int32), [zeros] * len(self.state_inputs))[sig.LOGITS]

        return logits_of


def choose_provider(precision: str, device: str) -> tuple[str, list[str]]:
    """The onnxruntime execution provider to verify on, and notes on what that leaves unverified."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ExportError(
            "verification on cuda needs onnxruntime-gpu and a CUDA device; this onnxruntime offers "
            f"{ort.get_available_providers()}"
        )
    if precision == "int8" and device == "cuda":
        raise ExportError(
            "int8 models (DynamicQuantizeLSTM, MatMulInteger) run on CPU only; verify with --device cpu"
        )
    if precision == "fp16" and device != "cpu" and has_cuda:
        return "CUDAExecutionProvider", []
    if precision == "fp16":
        return "CPUExecutionProvider", [
            "fp16 values were verified on CPU, where onnxruntime wraps fp16 nodes it has no fp16 "
            "kernel for (the LSTM/GRU among them) in casts to float32; CUDA's fp16 kernels were not "
            "exercised (re-run --verify-only on a CUDA machine). Serving fp16 needs CUDA."
        ]
    return ("CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"), []


def create_session(
    model_path: Path, precision: str, provider: str, threads: int | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Verification feeds small batches: one thread is fastest, and never spinning keeps it
    # from stalling on a busy machine. Validation loss over a large corpus may ask for more.
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # our checks report mismatches; ORT's shape warnings are noise
    if precision == "fp16" and provider == "CPUExecutionProvider":
        # Measured with onnxruntime 1.32: creating a CPU session for this fp16 graph at
        # ORT_ENABLE_ALL crashes the process (segfault in the layout optimizer); BASIC is sound.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), options, providers=providers)


class _Verifier:
    """Runs the checks for one model file and fills a VerificationReport."""

    def __init__(self, checkpoint: Checkpoint, precision: str, report: VerificationReport) -> None:
        self.model = checkpoint.model
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.precision = precision
        self.tolerance = report.criteria.values
        self.report = report
        self.rng = np.random.default_rng(SEED)

    # -- bookkeeping -------------------------------------------------------------------------

    def add_check(self, name: str) -> CheckResult:
        return self.report.add_check(name)

    def fail(self, check: CheckResult, tensor: str, message: str) -> None:
        self.report.fail(check, tensor, message)

    def compare(
        self,
        check: CheckResult,
        tensor: str,
        actual: np.ndarray,
        expected: np.ndarray,
        record_as: str | None = None,
    ) -> None:
        """Shapes first, then finiteness, then values against the precision's tolerance.

        A failure names `tensor`; the error is recorded under `record_as` (default `tensor`), so
        related comparisons (one per ragged row) report one worst error.
        """
        if actual.shape != expected.shape:
            self.fail(check, tensor, f"shape {actual.shape} differs from the expected {expected.shape}")
            return
        if not np.isfinite(actual).all():
            self.fail(check, tensor, "contains NaN or infinity")
            return
        difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        error = float(difference.max()) if difference.size else 0.0
        key = record_as or tensor
        check.max_abs_error[key] = max(check.max_abs_error.get(key, 0.0), error)
        bound = self.tolerance.bound(expected)
        if error > bound:
            where = tuple(int(i) for i in np.unravel_index(int(difference.argmax()), difference.shape))
            self.fail(
                check,
                tensor,
                f"max abs error {error:.3e} > tolerance {bound:.3e} (first worst at index {where})",
            )

    # -- inputs and the PyTorch oracle ---------------------------------------------------------

    def random_tokens(self, batch: int, seq: int) -> np.ndarray:
        return self.rng.integers(0, self.config.vocab_size, size=(batch, seq), dtype=np.int64)

    def random_state(self, batch: int) -> list[np.ndarray]:
        # Non-zero, so a model that ignores h0/c0 or mixes them up cannot pass.
        shape = (batch, self.config.num_layers, self.config.hidden_size)
        return [(0.5 * self.rng.standard_normal(shape)).astype(np.float32) for _ in self.config.state_names]

    def zero_state(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config.num_layers, self.config.hidden_size)
        return [np.zeros(shape, np.float32) for _ in self.config.state_names]

    def torch_run(
        self, tokens: np.ndarray, state: Sequence[np.ndarray], lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """PyTorch's outputs under the contract's names; packed sequences when lengths are given."""
        with torch.no_grad():
            logits, new_state = self.model(
                torch.from_numpy(tokens),
                tuple(torch.from_numpy(s) for s in state),
                None if lengths is None else torch.from_numpy(lengths.astype(np.int64)),
            )
        outputs = {sig.LOGITS: logits.numpy()}
        for name, tensor in zip(sig.state_output_names(self.config.arch), new_state, strict=True):
            outputs[name] = tensor.contiguous().numpy()
        rows = np.arange(tokens.shape[0])
        last = (lengths if lengths is not None else np.full(tokens.shape[0], tokens.shape[1])) - 1
        outputs[sig.LAST_LOGITS] = outputs[sig.LOGITS][rows, last]
        return outputs

    def compare_outputs(
        self, check: CheckResult, actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
    ) -> None:
        for name in (*sig.output_names(self.config.arch), sig.LAST_LOGITS):
            if name in actual:
                self.compare(check, name, actual[name], expected[name])

    # -- static checks ---------------------------------------------------------------------------

    def check_signature(self, proto: onnx.ModelProto) -> None:
        check = self.add_check("signature")
        arch, layers, hidden = self.config.arch, self.config.num_layers, self.config.hidden_size
        state: list[str | int] = [sig.BATCH, layers, hidden]
        expected_inputs: dict[str, tuple[int, list[str | int]]] = {
            sig.TOKENS: (TensorProto.INT64, [sig.BATCH, sig.SEQ]),
            sig.LENGTHS: (TensorProto.INT32, [sig.BATCH]),
            **{name: (TensorProto.FLOAT, state) for name in sig.state_input_names(arch)},
        }
        expected_outputs: dict[str, tuple[int, list[str | int]]] = {
            sig.LOGITS: (TensorProto.FLOAT, [sig.BATCH, sig.SEQ, self.config.vocab_size]),
            **{name: (TensorProto.FLOAT, state) for name in sig.state_output_names(arch)},
        }
        optional_outputs = {sig.LAST_LOGITS: (TensorProto.FLOAT, [sig.BATCH, self.config.vocab_size])}
        for kind, values, expected, optional in (
            ("input", proto.graph.input, expected_inputs, {}),
            ("output", proto.graph.output, expected_outputs, optional_outputs),
        ):
            declared = {v.name: v for v in values}
            for name in expected:
                if name not in declared:
                    self.fail(check, name, f"{kind} is missing (expected {kind}s {list(expected)})")
            for name, value in declared.items():
                spec = expected.get(name) or optional.get(name)
                if spec is None:
                    self.fail(check, name, f"unexpected {kind}; the contract's {kind}s are {list(expected)}")
                    continue
                elem_type, dims = spec
                tensor_type = value.type.tensor_type
                if tensor_type.elem_type != elem_type:
                    self.fail(
                        check,
                        name,
                        f"dtype {TensorProto.DataType.Name(tensor_type.elem_type)}, expected "
                        f"{TensorProto.DataType.Name(elem_type)}",
                    )
                actual_dims = [
                    d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                    for d in tensor_type.shape.dim
                ]
                if actual_dims != dims:
                    self.fail(check, name, f"dims {actual_dims}, expected {dims} (named dims are dynamic)")

    def check_structure(self, proto: onnx.ModelProto) -> None:
        check = self.add_check("structure")
        arch, layers = self.config.arch, self.config.num_layers
        if arch == "lstm":
            expected_op = "DynamicQuantizeLSTM" if self.precision == "int8" else "LSTM"
        else:
            expected_op = "GRU"
        recurrent_ops = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
        nodes = list(proto.graph.node)
        for node in nodes:
            if node.op_type in FORBIDDEN_OPS:
                self.fail(check, node.name or node.op_type, f"graph contains a {node.op_type} node")
            elif node.op_type in recurrent_ops and node.op_type != expected_op:
                self.fail(
                    check, node.name, f"{node.op_type} node where {layers} {expected_op} node(s) belong"
                )
        recurrent = [n for n in nodes if n.op_type == expected_op]
        if len(recurrent) != layers:
            self.fail(
                check,
                "graph",
                f"{len(recurrent)} {expected_op} node(s), expected exactly one per layer ({layers})",
            )
        initializers = {t.name: t for t in proto.graph.initializer}
        expected_weight_type = {
            "fp32": TensorProto.FLOAT,
            "fp16": TensorProto.FLOAT16,
            "int8": TensorProto.INT8 if arch == "lstm" else TensorProto.FLOAT,
        }[self.precision]
        for node in recurrent:
            inputs = list(node.input)
            wired = inputs[SEQUENCE_LENS_INPUT] if len(inputs) > SEQUENCE_LENS_INPUT else ""
            if wired != sig.LENGTHS:
                self.fail(
                    check,
                    node.name,
                    f"sequence_lens is {wired or 'not connected'!r}, expected {sig.LENGTHS!r}",
                )
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attributes.get("hidden_size") != self.config.hidden_size:
                self.fail(
                    check,
                    node.name,
                    f"hidden_size {attributes.get('hidden_size')}, expected {self.config.hidden_size}",
                )
            direction = attributes.get("direction", b"forward")
            if direction not in (b"forward", "forward"):
                self.fail(check, node.name, f"direction {direction!r}, expected 'forward'")
            if arch == "gru" and attributes.get("linear_before_reset", 0) != 1:
                self.fail(
                    check,
                    node.name,
                    "linear_before_reset is not 1: PyTorch's GRU applies the reset gate after the "
                    "recurrent linear map",
                )
            weight = initializers.get(inputs[1]) if len(inputs) > 1 else None
            if weight is None:
                self.fail(check, node.name, "input weights W are not an initializer")
            elif weight.data_type != expected_weight_type:
                self.fail(
                    check,
                    node.name,
                    f"weights W are {TensorProto.DataType.Name(weight.data_type)}, expected "
                    f"{TensorProto.DataType.Name(expected_weight_type)} for {self.precision}",
                )

    def check_metadata(self, proto: onnx.ModelProto) -> None:
        check = self.add_check("metadata")
        metadata = {p.key: p.value for p in proto.metadata_props}
        config = self.config
        expected = {
            **config_metadata(config),
            "checkpoint_sha256": self.checkpoint.weights_sha256,
            "precision": self.precision,
        }
        for key in sig.METADATA_KEYS:
            if key not in metadata:
                self.fail(check, key, "missing from metadata_props")
            elif key in expected and metadata[key] != expected[key]:
                self.fail(
                    check, key, f"metadata says {metadata[key]!r}, the checkpoint says {expected[key]!r}"
                )
        for key in ("tokenizer", "producer_versions"):
            if key not in metadata:
                continue
            try:
                value = json.loads(metadata[key])
            except json.JSONDecodeError as error:
                self.fail(check, key, f"is not JSON: {error}")
                continue
            if key == "tokenizer" and value != self.checkpoint.tokenizer:
                self.fail(check, key, "differs from the checkpoint's tokenizer")

    # -- runs ------------------------------------------------------------------------------------

    def check_full_runs(self, onnx_model: OnnxModel) -> None:
        for seq in SEQUENCE_LENGTHS:
            for batch in BATCH_SIZES:
                check = self.add_check(f"full/seq={seq}/batch={batch}")
                tokens, state = self.random_tokens(batch, seq), self.random_state(batch)
                lengths = np.full(batch, seq, np.int32)
                actual = self._run(check, onnx_model, tokens, lengths, state)
                if actual is not None:
                    self.compare_outputs(check, actual, self.torch_run(tokens, state))

    def check_chunked(self, onnx_model: OnnxModel) -> None:
        check = self.add_check("chunked")
        batch, seq = 3, sum(CHUNKS)
        tokens, state = self.random_tokens(batch, seq), self.random_state(batch)
        full = self._run(check, onnx_model, tokens, np.full(batch, seq, np.int32), state)
        if full is None:
            return
        pieces, carried, start = [], list(state), 0
        for size in CHUNKS:
            outputs = self._run(
                check, onnx_model, tokens[:, start : start + size], np.full(batch, size, np.int32), carried
            )
            if outputs is None:
                return
            pieces.append(outputs[sig.LOGITS])
            carried = [outputs[name] for name in onnx_model.state_outputs]
            start += size
        self.compare(check, sig.LOGITS, np.concatenate(pieces, axis=1), full[sig.LOGITS])
        for name, tensor in zip(onnx_model.state_outputs, carried, strict=True):
            self.compare(check, name, tensor, full[name])

    def check_ragged(self, onnx_model: OnnxModel) -> None:
        check = self.add_check("ragged")
        batch, seq = len(RAGGED_LENGTHS), max(RAGGED_LENGTHS)
        lengths = np.array(RAGGED_LENGTHS, np.int32)
        tokens, state = self.random_tokens(batch, seq), self.random_state(batch)
        for row, length in enumerate(RAGGED_LENGTHS):
            tokens[row, length:] = self.config.pad_id
        actual = self._run(check, onnx_model, tokens, lengths, state)
        if actual is None:
            return
        # PyTorch's packed sequences: padded positions give zero RNN output (logits == bias).
        self.compare_outputs(check, actual, self.torch_run(tokens, state, lengths))
        for row, length in enumerate(RAGGED_LENGTHS):
            alone = self._run(
                check,
                onnx_model,
                tokens[row : row + 1, :length],
                np.array([length], np.int32),
                [s[row : row + 1] for s in state],
            )
            if alone is None:
                return
            for name in (sig.LOGITS, *onnx_model.state_outputs):
                in_batch = actual[name][row, :length] if name == sig.LOGITS else actual[name][row]
                self.compare(
                    check,
                    f"{name}[row {row}] vs the row run alone",
                    in_batch,
                    alone[name][0],
                    record_as=f"{name} (rows alone)",
                )

    def check_greedy(self, onnx_model: OnnxModel) -> None:
        """Decode greedily with PyTorch; feed ORT the same tokens and compare each step's choice.

        Until ORT first picks another token its inputs equal PyTorch's, so the first disagreement
        is where free-running ORT decoding would diverge, and "all agree" means identical output.
        """
        check = self.add_check("greedy")
        criteria = self.report.criteria
        prompt = self.random_tokens(1, GREEDY_PROMPT_TOKENS)
        torch_state: tuple[torch.Tensor, ...] | None = None
        onnx_state = self.zero_state(1)
        chunk = prompt
        chosen: list[int] = []
        agreements: list[bool] = []
        kls: list[float] = []
        for _ in range(GREEDY_TOKENS):
            with torch.no_grad():
                logits, torch_state = self.model(torch.from_numpy(chunk), torch_state)
            expected = logits[0, -1].double().log_softmax(-1).numpy()
            outputs = self._run(check, onnx_model, chunk, np.array([chunk.shape[1]], np.int32), onnx_state)
            if outputs is None:
                return
            onnx_state = [outputs[name] for name in onnx_model.state_outputs]
            last = outputs[sig.LAST_LOGITS][0] if onnx_model.has_last_logits else outputs[sig.LOGITS][0, -1]
            if last.shape != expected.shape:
                self.fail(check, sig.LOGITS, f"shape {last.shape} differs from the expected {expected.shape}")
                return
            if not np.isfinite(last).all():
                self.fail(check, sig.LOGITS, f"step {len(chosen)}: contains NaN or infinity")
                return
            actual = torch.from_numpy(last).double().log_softmax(-1).numpy()
            token = int(expected.argmax())
            agreements.append(int(actual.argmax()) == token)
            kls.append(float((np.exp(expected) * (expected - actual)).sum()))
            chosen.append(token)
            chunk = np.array([[token]], np.int64)
        agreement = float(np.mean(agreements))
        first_divergence = agreements.index(False) if not all(agreements) else None
        mean_kl = float(np.mean(kls))
        self.report.greedy = {
            "tokens": GREEDY_TOKENS,
            "identical": all(agreements),
            "agreement": agreement,
            "first_divergence": first_divergence,
            "mean_kl": mean_kl,
            "max_kl": float(np.max(kls)),
        }
        if criteria.greedy_identical and first_divergence is not None:
            self.fail(
                check,
                "tokens",
                f"decoding diverges from PyTorch at token {first_divergence} of {GREEDY_TOKENS} "
                f"(PyTorch chose {chosen[first_divergence]})",
            )
        if agreement < criteria.min_greedy_agreement:
            self.fail(
                check,
                "tokens",
                f"top-1 agrees with PyTorch on {agreement:.1%} of steps, "
                f"needs >= {criteria.min_greedy_agreement:.0%}",
            )
        if criteria.max_mean_kl is not None and mean_kl > criteria.max_mean_kl:
            self.fail(
                check,
                "next-token distribution",
                f"mean KL(PyTorch || ONNX) {mean_kl:.3e} nats > {criteria.max_mean_kl:.3e}",
            )

    def check_validation_loss(self, onnx_model: OnnxModel, validation: evaluate.ValidationData) -> None:
        """The variant's validation loss may exceed the PyTorch (fp32) loss by at most the margin."""
        check = self.add_check("validation_loss")
        config = self.config
        onnx_logits = onnx_model.logits_function(config.num_layers, config.hidden_size)

        def checked_logits(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            logits = onnx_logits(tokens, lengths)
            if logits.shape != (*tokens.shape, config.vocab_size):
                raise _WrongShapeError(f"shape {logits.shape} for tokens of shape {tokens.shape}")
            return logits

        val_loss_fp32 = evaluate.mean_loss(evaluate.torch_logits(self.model), validation)
        try:
            val_loss = evaluate.mean_loss(checked_logits, validation)
        except ORT_ERRORS as error:
            self.fail(check, "(run)", f"onnxruntime failed on a validation batch: {error}")
            return
        except _WrongShapeError as error:
            self.fail(check, sig.LOGITS, str(error))
            return
        increase = val_loss - val_loss_fp32
        self.report.validation = {
            "val_loss": val_loss,
            "val_loss_fp32": val_loss_fp32,
            "increase": increase,
            "targets": validation.num_targets,
            "data": validation.description,
        }
        margin = self.report.criteria.max_val_loss_increase
        if not np.isfinite(val_loss) or increase > margin:
            self.fail(
                check,
                "val_loss",
                f"{val_loss:.4f} nats/token is {increase:.4f} above PyTorch's {val_loss_fp32:.4f} "
                f"(allowed {margin})",
            )

    def _run(
        self,
        check: CheckResult,
        onnx_model: OnnxModel,
        tokens: np.ndarray,
        lengths: np.ndarray,
        state: Sequence[np.ndarray],
    ) -> dict[str, np.ndarray] | None:
        try:
            return onnx_model.run(tokens, lengths, state)
        except ORT_ERRORS as error:
            self.fail(check, "(run)", f"onnxruntime rejected tokens of shape {tokens.shape}: {error}")
            return None


def new_report(precision: str) -> VerificationReport:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return VerificationReport(precision=precision, criteria=CRITERIA[precision], onnxruntime=ort.__version__)


def verify_model(
    model_path: Path,
    checkpoint: Checkpoint,
    precision: str,
    *,
    device: str = "auto",
    validation: evaluate.ValidationData | None = None,
    threads: int | None = None,
    report: VerificationReport | None = None,
) -> tuple[VerificationReport, OnnxModel | None]:
    """Run every check on `model_path` with `checkpoint` as the oracle.

    Returns the report (inspect `.passed` and `.failures`) and the onnxruntime session the value
    checks used (None when the file or session could not be loaded), so a caller can evaluate more
    without loading the model twice. Pass `report` (from `new_report`) to add to checks the
    caller already made. Raises ValueError only for a bad precision or device.
    """
    started = time.perf_counter()
    report = report or new_report(precision)
    provider, notes = choose_provider(precision, device)
    report.provider = provider
    report.notes += notes
    verifier = _Verifier(checkpoint, precision, report)
    try:
        proto = _load_proto(model_path)
        verifier.check_signature(proto)
        verifier.check_structure(proto)
        verifier.check_metadata(proto)
        del proto
        session_check = verifier.add_check("session")
        try:
            session = create_session(model_path, precision, provider, threads)
        except ORT_ERRORS as error:
            verifier.fail(session_check, "model.onnx", f"onnxruntime cannot load it on {provider}: {error}")
            return report, None
        onnx_model = OnnxModel(session, checkpoint.config.arch)
        with _torch_threads(1):
            verifier.check_full_runs(onnx_model)
            verifier.check_chunked(onnx_model)
            verifier.check_ragged(onnx_model)
            verifier.check_greedy(onnx_model)
        if validation is not None:
            verifier.check_validation_loss(onnx_model, validation)
        return report, onnx_model
    except _UnloadableModelError as failure:
        verifier.fail(verifier.add_check("load"), model_path.name, str(failure))
        return report, None
    finally:
        report.seconds += time.perf_counter() - started


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """PyTorch on `count` threads for a while: the checks' tiny batches (one token per greedy
    step) run ~50x slower on a busy machine when torch's OpenMP threads wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _WrongShapeError(Exception):
    pass


class _UnloadableModelError(Exception):
    pass


def _load_proto(model_path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(model_path))
        onnx.checker.check_model(proto)
    except (DecodeError, OSError, onnx.checker.ValidationError) as error:
        raise _UnloadableModelError(f"not a valid ONNX model: {error}") from None
    return proto
