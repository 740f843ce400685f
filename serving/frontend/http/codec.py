"""KServe v2 REST bodies: JSON tensors and Triton's binary tensor data extension.

A request body is JSON, or, with the `Inference-Header-Content-Length: N` header, N bytes of
JSON followed by the binary data of the inputs whose parameters say `binary_data_size`, in input
order. An answer's outputs are JSON `data`, or binary after the JSON when the request asked for
it (`binary_data_output` for every output, or an output's own `binary_data`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.core.errors import InvalidArgumentError, Reason
from serving.frontend.kserve_common import (
    NUMPY_TYPES,
    InferAnswer,
    InferCall,
    InputTensor,
    decode_raw,
    element_count,
)

HEADER_LENGTH = "inference-header-content-length"
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "datatype", "shape", "parameters", "data")
OUTPUT_KEYS = ("name", "parameters")


def parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(
            f"the {what} body is not valid JSON: {error}", Reason.MALFORMED_REQUEST
        ) from None


def _object(value: Any, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"{what} must be a JSON object, got {type(value).__name__}", Reason.MALFORMED_REQUEST
        )
    unknown = [key[:64] for key in value if key not in keys]
    if unknown:
        raise InvalidArgumentError(
            f"{what} has unknown keys {unknown[:5]}; allowed: {', '.join(keys)}", Reason.MALFORMED_REQUEST
        )
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"{what} parameters must be a JSON object, got {type(value).__name__}", Reason.MALFORMED_REQUEST
        )
    return value


def _flatten(data: Any, name: str) -> list[Any]:
    """KServe allows nested (row-major) or flat data arrays."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item, name) if isinstance(item, list) else [item])
    return flat


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> InputTensor:
    values = _flatten(data, name)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input {name[:64]!r} has {len(values)} values; shape {shape} needs {count}",
            Reason.MALFORMED_REQUEST,
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgumentError(
                f"input {name[:64]!r} is BYTES: its data must be strings", Reason.MALFORMED_REQUEST
            )
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8") for v in values]
        return InputTensor(name, datatype, tuple(shape), array)
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidArgumentError(
            f"input {name[:64]!r} has datatype {datatype[:32]!r}, which KServe v2 does not define; "
            f"datatypes: {', '.join([*NUMPY_TYPES, 'BYTES'])}",
            Reason.MALFORMED_REQUEST,
        )
    if dtype.kind in "iu":
        if not all(type(v) is int for v in values):
            raise InvalidArgumentError(
                f"input {name[:64]!r} is {datatype}: its data must be integers", Reason.MALFORMED_REQUEST
            )
    elif dtype.kind == "b":
        if not all(type(v) is bool for v in values):
            raise InvalidArgumentError(
                f"input {name[:64]!r} is BOOL: its data must be true or false", Reason.MALFORMED_REQUEST
            )
    elif not all(type(v) in (int, float) for v in values):
        raise InvalidArgumentError(
            f"input {name[:64]!r} is {datatype}: its data must be numbers", Reason.MALFORMED_REQUEST
        )
    try:
        array = np.array(values, dtype)
    except OverflowError:
        raise InvalidArgumentError(
            f"input {name[:64]!r} has a value outside {datatype}'s range", Reason.MALFORMED_REQUEST
        ) from None
    return InputTensor(name, datatype, tuple(shape), array)


def decode_request(
    model_name: str, model_version: str, body: bytes, header_length: str | None
) -> tuple[InferCall, bool, dict[str, bool]]:
    """An infer body as an InferCall, whether every output goes binary, and each requested
    output's own `binary_data` choice."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgumentError(
                f"Inference-Header-Content-Length {header_length[:20]!r} must be a byte count within "
                f"the body's {len(body)} bytes",
                Reason.MALFORMED_REQUEST,
            )
        split = int(header_length)
        header, binary = body[:split], body[split:]
    else:
        header, binary = body, b""
    request = _object(parse_json(header, "infer request"), "the infer request", REQUEST_KEYS)
    parameters = _parameters(request.get("parameters"), "request")
    binary_output = parameters.pop("binary_data_output", False) is True
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgumentError(
            'the infer request needs "inputs": a list of tensors', Reason.MALFORMED_REQUEST
        )
    inputs, offset = [], 0
    for index, item in enumerate(raw_inputs):
        tensor = _object(item, f"input {index}", INPUT_KEYS)
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgumentError(
                f"input {index} needs a string name and datatype", Reason.MALFORMED_REQUEST
            )
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise InvalidArgumentError(
                f"input {name[:64]!r} needs a shape: a list of integers", Reason.MALFORMED_REQUEST
            )
        tensor_parameters = _parameters(tensor.get("parameters"), f"input {name[:64]!r}")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidArgumentError(
                    f"input {name[:64]!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                    f"bytes of binary data left",
                    Reason.MALFORMED_REQUEST,
                )
            inputs.append(decode_raw(name, datatype, shape, binary[offset : offset + size]))
            offset += size
        elif "data" in tensor:
            inputs.append(_json_tensor(name, datatype, shape, tensor["data"]))
        else:
            raise InvalidArgumentError(
                f"input {name[:64]!r} has neither data nor binary_data_size", Reason.MALFORMED_REQUEST
            )
    if offset != len(binary):
        raise InvalidArgumentError(
            f"{len(binary) - offset} bytes of binary data belong to no input", Reason.MALFORMED_REQUEST
        )
    outputs, binary_choices = [], {}
    raw_outputs = request.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise InvalidArgumentError(
            '"outputs" must be a list of {"name": ...} objects', Reason.MALFORMED_REQUEST
        )
    for index, item in enumerate(raw_outputs):
        output = _object(item, f"output {index}", OUTPUT_KEYS)
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"output {index} needs a string name", Reason.MALFORMED_REQUEST)
        output_parameters = _parameters(output.get("parameters"), f"output {name[:64]!r}")
        unknown = [key[:64] for key in output_parameters if key != "binary_data"]
        if unknown:
            raise InvalidArgumentError(
                f"output {name[:64]!r} has unknown parameters {unknown[:5]}; allowed: binary_data",
                Reason.MALFORMED_REQUEST,
            )
        outputs.append(name)
        binary_choices[name] = output_parameters.get("binary_data", binary_output) is True
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("the request id must be a string", Reason.MALFORMED_REQUEST)
    call = InferCall(model_name, model_version, request_id, parameters, inputs, outputs)
    return call, binary_output, binary_choices


def encode_answer(
    answer: InferAnswer, binary_output: bool, binary_choices: Mapping[str, bool]
) -> tuple[bytes, int | None]:
    """The answer body, and the JSON part's length when binary data follows it (else None)."""
    outputs, blobs = [], []
    for output in answer.outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if binary_choices.get(output.name, binary_output):
            blob = output.data.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output.data.reshape(-1).tolist()
        outputs.append(entry)
    body = {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "outputs": outputs,
    }
    if answer.request_id:
        body["id"] = answer.request_id
    header = json.dumps(body).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
