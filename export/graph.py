"""Build the ONNX graph of an rnnserve model directly from its weights.

Why not torch.onnx: with torch 2.13 the dynamo exporter froze `seq` at the example length on a
time-major recurrence and declared the logits' `seq` static with `batch_first=True`, neither
with an error; the TorchScript exporter emits native LSTM/GRU nodes with `sequence_lens` only
through `pack_padded_sequence` and is deprecated. Writing the graph here gives exactly the
contract: one native LSTM/GRU node per layer with `sequence_lens` = `lengths`, named dynamic
dimensions, no Loop/Scan/Dropout, and an extra `last_logits` output. Every export is still
verified against PyTorch (export/verify.py), so this code is checked, not trusted.

Graph, for B rows of T tokens, L layers, hidden H, vocabulary V:

    tokens (B,T) -Transpose-> (T,B) -Gather(embedding)-> x (T,B,E)
    h0 (B,L,H) -Transpose-> (L,B,H) -Gather(layer k)-> (1,B,H)
    layer k: LSTM/GRU(x, W_k, R_k, B_k, sequence_lens=lengths) -> Y (T,1,B,H), Y_h (1,B,H)
             x <- Squeeze(Y, axis 1) (T,B,H)
    hn = Transpose(Concat(Y_h over layers)) (B,L,H)
    logits = Transpose(x) (B,T,H) @ W^T + b          (B,T,V)
    last_logits = Y_h of the top layer (B,H) @ W^T + b (B,V)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract import signature as sig

# PyTorch stacks gate weights as (i, f, g, o) for LSTM and (r, z, n) for GRU; ONNX wants
# (i, o, f, c) and (z, r, h). Each tuple lists, in ONNX order, the PyTorch gate index.
_LSTM_GATE_ORDER = (0, 3, 1, 2)
_GRU_GATE_ORDER = (1, 0, 2)


def _reorder_gates(weight: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    gates = np.split(weight, len(order), axis=0)
    return np.concatenate([gates[i] for i in order], axis=0)


def build_model(
    arch: str,
    num_layers: int,
    hidden_size: int,
    weights: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    float_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """Assemble the model from a PyTorch state dict converted to numpy arrays.

    `weights` uses the names of models.RNNLanguageModel's state dict (`embedding.weight`,
    `rnn.weight_ih_l0`, ..., `decoder.weight`, `decoder.bias`). With `float_type` FLOAT16 the
    weights and compute are fp16 while every input and output stays float32 (Cast at the edges),
    so a client never sees the difference.
    """
    np_float = np.float16 if float_type == TensorProto.FLOAT16 else np.float32
    gate_order = _LSTM_GATE_ORDER if arch == "lstm" else _GRU_GATE_ORDER
    op_type = "LSTM" if arch == "lstm" else "GRU"

    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", **attrs))

    def to_compute(name: str) -> str:
        if float_type == TensorProto.FLOAT:
            return name
        node("Cast", [name], [f"{name}_compute"], to=float_type)
        return f"{name}_compute"

    def to_float32(name: str, out: str) -> None:
        if float_type == TensorProto.FLOAT:
            node("Identity", [name], [out])
        else:
            node("Cast", [name], [out], to=TensorProto.FLOAT)

    embedding = const("embedding.weight", weights["embedding.weight"].astype(np_float))
    node("Transpose", [sig.TOKENS], ["tokens_time_major"], perm=[1, 0])
    node("Gather", [embedding, "tokens_time_major"], ["embedded"], axis=0)  # (T, B, E)

    state_inputs = sig.state_input_names(arch)
    state_outputs = sig.state_output_names(arch)
    time_major_state = []
    for name in state_inputs:
        node("Transpose", [to_compute(name)], [f"{name}_layer_major"], perm=[1, 0, 2])  # (L, B, H)
        time_major_state.append(f"{name}_layer_major")

    layer_input = "embedded"
    final_states: list[list[str]] = [[] for _ in state_inputs]
    for layer in range(num_layers):
        index = const(f"layer_index_{layer}", np.array([layer], dtype=np.int64))
        initial = []
        for k, name in enumerate(time_major_state):
            node("Gather", [name, index], [f"{state_inputs[k]}_l{layer}"], axis=0)  # (1, B, H)
            initial.append(f"{state_inputs[k]}_l{layer}")
        w = _reorder_gates(weights[f"rnn.weight_ih_l{layer}"], gate_order)[None]
        r = _reorder_gates(weights[f"rnn.weight_hh_l{layer}"], gate_order)[None]
        b = np.concatenate(
            [
                _reorder_gates(weights[f"rnn.bias_ih_l{layer}"], gate_order),
                _reorder_gates(weights[f"rnn.bias_hh_l{layer}"], gate_order),
            ]
        )[None]
        rnn_inputs = [
            layer_input,
            const(f"rnn.W_l{layer}", w.astype(np_float)),
            const(f"rnn.R_l{layer}", r.astype(np_float)),
            const(f"rnn.B_l{layer}", b.astype(np_float)),
            sig.LENGTHS,
            *initial,
        ]
        outputs = [f"rnn_out_l{layer}", *(f"{n}_l{layer}" for n in state_outputs)]
        attrs: dict[str, Any] = {"hidden_size": hidden_size, "direction": "forward"}
        if arch == "gru":
            # PyTorch applies the reset gate after the recurrent linear map.
            attrs["linear_before_reset"] = 1
        node(op_type, rnn_inputs, outputs, **attrs)
        for k, name in enumerate(state_outputs):
            final_states[k].append(f"{name}_l{layer}")
        node(
            "Squeeze",
            [f"rnn_out_l{layer}", const(f"squeeze_axis_{layer}", np.array([1]))],
            [f"layer_out_{layer}"],
        )  # (T, B, H)
        layer_input = f"layer_out_{layer}"

    for k, name in enumerate(state_outputs):
        if num_layers == 1:
            stacked = final_states[k][0]
        else:
            node("Concat", final_states[k], [f"{name}_stacked"], axis=0)
            stacked = f"{name}_stacked"
        node("Transpose", [stacked], [f"{name}_batch_major"], perm=[1, 0, 2])  # (B, L, H)
        to_float32(f"{name}_batch_major", name)

    decoder_weight = const("decoder.weight_t", weights["decoder.weight"].T.astype(np_float).copy())
    decoder_bias = const("decoder.bias", weights["decoder.bias"].astype(np_float))
    node("Transpose", [layer_input], ["rnn_out_batch_major"], perm=[1, 0, 2])  # (B, T, H)
    node("MatMul", ["rnn_out_batch_major", decoder_weight], ["logits_no_bias"])
    node("Add", ["logits_no_bias", decoder_bias], ["logits_compute"])  # (B, T, V)
    to_float32("logits_compute", sig.LOGITS)
    top_h = final_states[0][-1]  # (1, B, H)
    node("Squeeze", [top_h, const("squeeze_axis_top", np.array([0]))], ["top_hidden"])  # (B, H)
    node("MatMul", ["top_hidden", decoder_weight], ["last_logits_no_bias"])
    node("Add", ["last_logits_no_bias", decoder_bias], ["last_logits_compute"])  # (B, V)
    to_float32("last_logits_compute", sig.LAST_LOGITS)

    vocab_size = int(weights["decoder.weight"].shape[0])
    state_shape: list[str | int | None] = [sig.BATCH, num_layers, hidden_size]
    graph_inputs = [
        helper.make_tensor_value_info(sig.TOKENS, TensorProto.INT64, [sig.BATCH, sig.SEQ]),
        helper.make_tensor_value_info(sig.LENGTHS, TensorProto.INT32, [sig.BATCH]),
        *(helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in state_inputs),
    ]
    graph_outputs = [
        helper.make_tensor_value_info(sig.LOGITS, TensorProto.FLOAT, [sig.BATCH, sig.SEQ, vocab_size]),
        *(helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in state_outputs),
        helper.make_tensor_value_info(sig.LAST_LOGITS, TensorProto.FLOAT, [sig.BATCH, vocab_size]),
    ]
    graph = helper.make_graph(nodes, f"rnnserve_{arch}", graph_inputs, graph_outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", sig.OPSET)],
        producer_name="rnnserve",
    )
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model, full_check=True)
    return model
