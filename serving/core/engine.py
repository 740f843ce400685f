"""One onnxruntime session per model version, shared by all its sessions, plus its state pool.

`load_engine` turns a validated model (repository.load_model_proto) into an Engine whose only
hot-path call is

    step(slots (B,) int64, tokens (B, T) int64, lengths (B,) int32) -> last logits (B, vocab)

It reads the rows of `slots` from the state pool, runs the chunk, and writes the new state back
only when the run succeeded. Two implementations share that contract:

- HostEngine (CPU): numpy state pool; gather rows, session.run, scatter rows.
- DeviceEngine (CUDA): the state pool lives on the device and the run uses I/O binding, so state
  never crosses to the host; only the (B, vocab) last logits come back for top-k and sampling.
  The model graph is extended at load so that it gathers its state rows from the pool by slot
  and scatters the new rows into the other of two pool buffers (ScatterND), see `pooled_graph`.

Graph preparation: onnxruntime computes every graph output whether or not a run asks for it, so
when the model has `last_logits` the (B, T, vocab) `logits` output is removed at load; a long
prompt then pays the vocabulary projection once, not at every position.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from contract import signature as sig
from contract.ort_errors import ORT_ERRORS
from serving.core.repository import ModelManifest
from serving.core.state_pool import DeviceStatePool, HostStatePool, SavedRows

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class EngineError(Exception):
    """A model version that cannot run with the requested device or options."""


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built; from ServerSettings (see serving.core.registry.engine_options)."""

    device: str = "auto"  # "auto", "cpu" or "cuda"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    capacity: int = 100_000  # state slots per model version (the session limit)
    device_id: int = 0


def resolve_providers(device: str) -> list[str]:
    """The onnxruntime providers for --device; raise EngineError when CUDA is asked for and absent.

    onnxruntime silently falls back to CPU when CUDA cannot be used, so asking for CUDA checks
    both the installed build (here) and the providers a session ended up with (load_engine).
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            # onnxruntime-gpu from PyPI finds the pip-installed CUDA/cuDNN libraries this way.
            preload()
        return [CUDA, CPU]
    if device == "cuda":
        raise EngineError(
            f"--device cuda needs onnxruntime-gpu with {CUDA}, but this onnxruntime "
            f"{ort.__version__} offers only {available}; install rnnserve[serve-gpu] or use --device cpu"
        )
    return [CPU]


def session_options(options: EngineOptions) -> ort.SessionOptions:
    session = ort.SessionOptions()
    session.intra_op_num_threads = options.intra_op_threads
    session.inter_op_num_threads = options.inter_op_threads
    session.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads would take the core the gRPC event loop needs between batches.
    session.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session.log_severity_level = 3
    return session


def logits_output(model: onnx.ModelProto) -> str:
    outputs = {value.name for value in model.graph.output}
    return sig.LAST_LOGITS if sig.LAST_LOGITS in outputs else sig.LOGITS


def host_graph(model: onnx.ModelProto, arch: str) -> onnx.ModelProto:
    """The model with only the outputs serving reads: last_logits (else logits) and the state."""
    keep = {logits_output(model), *sig.state_output_names(arch)}
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    outputs = [value for value in prepared.graph.output if value.name in keep]
    del prepared.graph.output[:]
    prepared.graph.output.extend(outputs)
    return prepared


def pool_input(state_input: str) -> str:
    return f"pool_{state_input}"


def pool_output(state_input: str) -> str:
    return f"pool_{state_input}_next"


SLOTS = "slots"  # int64 (batch,): each row's slot in the pool
KEEP = "keep"  # bool (batch,): False for a fresh slot, whose state is read as zeros


def pooled_graph(model: onnx.ModelProto, manifest: ModelManifest) -> onnx.ModelProto:
    """Extend the model to read and write its state in a pool, for device-resident state.

    Inputs: tokens, lengths, slots (B,), keep (B,), pool_h0 (capacity, L, H) [, pool_c0].
    Outputs: last logits (B, V) and pool_h0_next [, pool_c0_next] (capacity, L, H): the pool with
    the batch's rows replaced. h0/c0 become inner values, so the model's own nodes are unchanged:

        h0 = Where(keep[:, None, None], Gather(pool_h0, slots), 0)          (B, L, H)
        pool_h0_next = ScatterND(pool_h0, slots[:, None], hn)               (capacity, L, H)
    """
    prepared = host_graph(model, manifest.arch)
    graph = prepared.graph
    state_inputs = sig.state_input_names(manifest.arch)
    state_outputs = sig.state_output_names(manifest.arch)
    row = [manifest.num_layers, manifest.hidden_size]
    inputs = [value for value in graph.input if value.name not in state_inputs]
    inputs += [
        helper.make_tensor_value_info(SLOTS, TensorProto.INT64, [sig.BATCH]),
        helper.make_tensor_value_info(KEEP, TensorProto.BOOL, [sig.BATCH]),
        *(
            helper.make_tensor_value_info(pool_input(n), TensorProto.FLOAT, ["capacity", *row])
            for n in state_inputs
        ),
    ]
    logits_name = logits_output(model)
    outputs = [value for value in graph.output if value.name == logits_name]
    outputs += [
        helper.make_tensor_value_info(pool_output(n), TensorProto.FLOAT, ["capacity", *row])
        for n in state_inputs
    ]
    graph.initializer.extend(
        [
            helper.make_tensor("pool_keep_axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("pool_slot_axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("pool_zero", TensorProto.FLOAT, [], [0.0]),
        ]
    )
    head = [helper.make_node("Unsqueeze", [KEEP, "pool_keep_axes"], ["pool_keep_b11"], name="pool/keep")]
    for name in state_inputs:
        head += [
            helper.make_node(
                "Gather", [pool_input(name), SLOTS], [f"{name}_rows"], axis=0, name=f"pool/gather_{name}"
            ),
            helper.make_node(
                "Where", ["pool_keep_b11", f"{name}_rows", "pool_zero"], [name], name=f"pool/fresh_{name}"
            ),
        ]
    tail = [helper.make_node("Unsqueeze", [SLOTS, "pool_slot_axes"], ["pool_indices"], name="pool/indices")]
    for name_in, name_out in zip(state_inputs, state_outputs, strict=True):
        tail.append(
            helper.make_node(
                "ScatterND",
                [pool_input(name_in), "pool_indices", name_out],
                [pool_output(name_in)],
                name=f"pool/scatter_{name_in}",
            )
        )
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(prepared)
    return prepared


class Engine(ABC):
    """A loaded model version: its onnxruntime session and its sessions' state pool."""

    def __init__(
        self,
        manifest: ModelManifest,
        session: ort.InferenceSession,
        logits_name: str,
        pool: HostStatePool | DeviceStatePool,
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.logits_name = logits_name
        self.pool = pool
        self.providers: list[str] = session.get_providers()
        self.state_inputs = sig.state_input_names(manifest.arch)
        self.state_outputs = sig.state_output_names(manifest.arch)
        self.output_names = [logits_name, *self.state_outputs]  # what a host step asks for

    @abstractmethod
    def step(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Run one batch; on success the slots hold the new state. Returns last logits (B, V).

        slots (B,) int64 distinct; tokens (B, T) int64 right-padded; lengths (B,) int32 in 1..T.
        Raises whatever onnxruntime raises; the pool is then unchanged.
        """

    def acquire_slot(self) -> int:
        """A slot in the zero state for a new session (event loop)."""
        return self.pool.acquire()

    def release_slot(self, slot: int) -> None:
        self.pool.release(slot)

    def reset_slot(self, slot: int) -> None:
        self.pool.reset(slot)

    def last_logits(self, slot: int) -> np.ndarray:
        """The slot's logits after its last consumed token, (vocab,)."""
        return self.pool.logits[slot]

    def read_rows(self, slots: np.ndarray) -> SavedRows:
        """Copy rows out (rollback, snapshots); call on the model's worker thread."""
        return self.pool.read_rows(slots)

    def write_rows(self, saved: SavedRows) -> None:
        """Put copied rows back (rollback, restore); call on the model's worker thread."""
        self.pool.write_rows(saved)

    def _select_last(self, logits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.logits_name == sig.LAST_LOGITS:
            return logits
        # A model without last_logits: (B, T, V) -> the position of each row's last real token.
        return logits[np.arange(len(lengths)), lengths - 1]


class HostEngine(Engine):
    """CPU: state rows in numpy, gathered into the run's inputs and scattered from its outputs."""

    pool: HostStatePool

    def step(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        feeds = {sig.TOKENS: tokens, sig.LENGTHS: lengths}
        feeds.update(zip(self.state_inputs, self.pool.gather(slots), strict=True))
        outputs = self.session.run(self.output_names, feeds)
        logits = self._select_last(outputs[0], lengths)
        self.pool.scatter(slots, outputs[1:], logits)
        return logits


class DeviceEngine(Engine):
    """State pool on the device; runs bind pool buffers directly (see pooled_graph)."""

    pool: DeviceStatePool

    def step(self, slots: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        pool = self.pool
        pool.ensure_capacity(int(slots.max()) + 1)
        binding = self.session.io_binding()
        binding.bind_cpu_input(sig.TOKENS, tokens)
        binding.bind_cpu_input(sig.LENGTHS, lengths)
        binding.bind_cpu_input(SLOTS, slots)
        binding.bind_cpu_input(KEEP, ~pool.fresh[slots])
        binding.bind_output(self.logits_name, "cpu")  # first, so it is get_outputs()[0]
        for k, name in enumerate(self.state_inputs):
            # Read the current buffer, write the spare one: never the same buffer in and out.
            binding.bind_ortvalue_input(pool_input(name), pool.current(k))
            binding.bind_ortvalue_output(pool_output(name), pool.spare(k))
        self.session.run_with_iobinding(binding)
        logits = self._select_last(binding.get_outputs()[0].numpy(), lengths)
        pool.swap()
        pool.fresh[slots] = False
        pool.logits[slots] = logits
        return logits


def load_engine(
    manifest: ModelManifest,
    model: onnx.ModelProto,
    options: EngineOptions,
    state_on_device: bool | None = None,
) -> Engine:
    """Build the engine for a validated model. Raises EngineError for an unservable combination.

    `state_on_device` defaults to True exactly when CUDA runs the model; tests pass True on CPU
    to exercise the device-pool path (its graphs and buffer alternation) without a GPU.
    """
    providers = resolve_providers(options.device)
    on_cuda = providers[0] == CUDA
    if manifest.precision == "fp16" and not on_cuda:
        raise EngineError(
            f"{manifest.label} is fp16, which is served on CUDA only (onnxruntime's CPU kernels for "
            f"fp16 LSTM/GRU are missing or slow); use --device cuda, or export it as fp32 or int8"
        )
    device_pool = on_cuda if state_on_device is None else state_on_device
    prepared = pooled_graph(model, manifest) if device_pool else host_graph(model, manifest.arch)

    def make_session(graph: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(graph.SerializeToString(), session_options(options), providers=providers)

    try:
        session = make_session(prepared)
    except ORT_ERRORS as error:
        raise EngineError(
            f"{manifest.label}: onnxruntime cannot load {manifest.model_path}: {error}"
        ) from None
    if options.device == "cuda" and CUDA not in session.get_providers():
        raise EngineError(
            f"{manifest.label}: --device cuda was asked for, but onnxruntime created the session with "
            f"{session.get_providers()} (CUDA libraries missing or no GPU visible)"
        )
    state_count = len(sig.state_input_names(manifest.arch))
    sizes = (state_count, manifest.num_layers, manifest.hidden_size, manifest.vocab_size, options.capacity)
    engine: Engine
    if device_pool:
        device_type = "cuda" if on_cuda else "cpu"
        pool = DeviceStatePool(
            *sizes, device_type=device_type, device_id=options.device_id, make_session=make_session
        )
        engine = DeviceEngine(manifest, session, logits_output(model), pool)
    else:
        engine = HostEngine(manifest, session, logits_output(model), HostStatePool(*sizes))
    log.info(
        "loaded %s (%s, %s) from %s with providers %s, state %s",
        manifest.label,
        manifest.arch,
        manifest.precision,
        manifest.model_path,
        engine.providers,
        "on the device" if device_pool else "in host memory",
    )
    return engine
