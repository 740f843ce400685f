"""The KServe v2 inference protocol, as Triton speaks it, mapped onto the rnnserve runtime.

Both KServe doors (gRPC `inference.GRPCInferenceService` and the REST API) decode their wire
format into the plain values here and call `KServeFrontend`; the rules are written once.

A model, as the protocol shows it (`max_batch_size` 0: each request is one sequence):

    input  tokens        INT64  [1, T]   token ids to run through the sequence's state
    input  text          BYTES  [1]      or: UTF-8 text, encoded with the model's tokenizer (not
                                         declared in metadata or config: tools that fill every
                                         declared input, like perf_analyzer, send tokens only)
    output logprobs      FP32   [1, V]   log-probabilities of the next token after the last input
    output top_ids       INT64  [1, K]   the K most likely next tokens (parameter top_k = K)
    output top_logprobs  FP32   [1, K]   their log-probabilities
    output next_token    INT64  [1, 1]   the chosen next token: the most likely one, or, with any of
                                         the temperature / sampling_top_k / top_p / seed
                                         parameters, a sampled one (temperature 1 unless given)

Without requested outputs a request gets logprobs and next_token, or, with `top_k`, top_ids,
top_logprobs and next_token.

Sequences, the Triton way: the request parameters `sequence_id` (uint64, or a string),
`sequence_start` and `sequence_end` map onto rnnserve sessions. START opens the sequence's session
(or, for a sequence already open, resets it to the zero state, as a new sequence under the same
id); a request without START continues the open sequence, and one for an unknown sequence is
answered NOT_FOUND; END closes the session after its request. A request without a sequence id
runs on a fresh zero state that is dropped afterwards.

A sequence's session id is derived from (caller identity, model name, sequence id), so every
door and every replica finds the same session for it (and a load balancer can route by the
sequence id), and two callers' sequences with the same id never meet. Whoever knows a sequence
id can continue it, as in Triton; with bearer tokens only its owner can.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.sampling import Sampling
from contract.tokenizer import TEXT_TOKENIZERS, TokenizerError
from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ResourceExhaustedError,
    SessionNotFoundError,
    shown,
)
from serving.core.registry import LoadedModel
from serving.core.runtime import Runtime
from serving.core.sampling import log_softmax
from serving.core.sessions import Session

SERVER_NAME = "rnnserve"
SERVER_VERSION = "0.1.0"
# Triton's names for the protocol extensions this server implements.
SERVER_EXTENSIONS = (
    "sequence",
    "generate",
    "statistics",
    "model_repository",
    "parameters",
    "binary_tensor_data",
)
PLATFORM = "onnxruntime_onnx"

TOKENS = "tokens"
TEXT = "text"  # BYTES [1]: text the model's tokenizer encodes, instead of tokens
LOGPROBS = "logprobs"
TOP_IDS = "top_ids"
TOP_LOGPROBS = "top_logprobs"
NEXT_TOKEN = "next_token"
OUTPUT_TYPES = {LOGPROBS: "FP32", TOP_IDS: "INT64", TOP_LOGPROBS: "FP32", NEXT_TOKEN: "INT64"}

SAMPLING_PARAMETERS = ("temperature", "sampling_top_k", "top_p", "seed")
SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"
# Request parameters and the Python types they take (bool is not an int here).
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    SEQUENCE_ID: (int, str),
    SEQUENCE_START: (bool,),
    SEQUENCE_END: (bool,),
    "top_k": (int,),
    "temperature": (float, int),
    "sampling_top_k": (int,),
    "top_p": (float, int),
    "seed": (int,),
    # Sent by Triton's clients and accepted without effect: one priority, timeouts are the caller's.
    "priority": (int,),
    "timeout": (int,),
    "binary_data_output": (bool,),
}

# numpy dtypes of the KServe datatypes (BYTES is handled apart).
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class InputTensor:
    """One decoded input: `data` is a flat array of `shape`'s element count."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # contiguous, of NUMPY_TYPES[datatype]


@dataclass(frozen=True)
class InferCall:
    """A decoded ModelInfer request (either door)."""

    model_name: str
    model_version: str = ""  # "" = the latest
    request_id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[InputTensor] = ()
    outputs: Sequence[str] = ()  # requested output names; empty = the defaults


@dataclass(frozen=True)
class InferAnswer:
    model_name: str
    model_version: str
    request_id: str
    outputs: list[OutputTensor]


def parse_version(text: str) -> int:
    """A KServe model version string as rnnserve's version number (0 = the latest)."""
    if text == "":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgumentError(
            f"model version {text[:40]!r} is not a version number: give a positive integer, or "
            f"leave it empty for the latest",
            Reason.MALFORMED_REQUEST,
        )
    return int(text)


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Refuse parameters this server does not know, and known ones of the wrong type."""
    for name, value in parameters.items():
        kinds = PARAMETER_TYPES.get(name)
        if kinds is None:
            raise InvalidArgumentError(
                f"unknown request parameter {name[:64]!r}; allowed: {', '.join(sorted(PARAMETER_TYPES))}",
                Reason.MALFORMED_REQUEST,
            )
        if type(value) not in kinds:
            wanted = " or ".join("boolean" if k is bool else k.__name__ for k in kinds)
            raise InvalidArgumentError(
                f"request parameter {name!r} must be {wanted}, got {type(value).__name__} {value!r:.40}",
                Reason.MALFORMED_REQUEST,
            )


def sequence_of(parameters: Mapping[str, Any]) -> int | str | None:
    """The request's sequence id (None: no sequence); 0 and "" mean none, as in Triton."""
    value = parameters.get(SEQUENCE_ID)
    if isinstance(value, int) and not 0 <= value < 2**64:
        raise InvalidArgumentError(
            f"sequence_id must be a uint64 (0 .. 2^64-1) or a string, got {value}", Reason.INVALID_OPTION
        )
    if isinstance(value, str) and len(value) > 256:
        raise InvalidArgumentError(
            f"a string sequence_id has at most 256 characters, got {len(value)}", Reason.INVALID_OPTION
        )
    if value in (None, 0, ""):
        if parameters.get(SEQUENCE_START) or parameters.get(SEQUENCE_END):
            raise InvalidArgumentError(
                "sequence_start and sequence_end need a non-zero sequence_id", Reason.INVALID_OPTION
            )
        return None
    return value


def sequence_session_id(owner: str | None, model_name: str, sequence_id: int | str) -> str:
    """The session id of a KServe sequence: 32 hex characters, like the server's own ids.

    uint64 1 and string "1" are different sequences (as in Triton).
    """
    kind = "u" if isinstance(sequence_id, int) else "s"
    key = f"kserve-sequence\0{owner or ''}\0{model_name}\0{kind}:{sequence_id}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def input_shape(model: LoadedModel) -> list[int]:
    return [1, -1]


def output_shapes(model: LoadedModel) -> dict[str, list[int]]:
    return {LOGPROBS: [1, model.vocab_size], TOP_IDS: [1, -1], TOP_LOGPROBS: [1, -1], NEXT_TOKEN: [1, 1]}


@dataclass
class VersionStatistics:
    """KServe-door counters of one model version (ModelStatistics)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # tokens run
    execution_count: int = 0  # requests run
    last_inference_ms: int = 0


class KServeFrontend:
    """KServe v2 requests on a Runtime: sequences, inference, model descriptions and statistics."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.statistics: dict[tuple[str, int], VersionStatistics] = {}

    # ----- server and models ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Ready while not draining and at least one model takes new sessions."""
        registry = self.runtime.registry
        return not self.runtime.draining and any(registry.latest(n) is not None for n in registry.names())

    def model(self, name: str, version: str) -> LoadedModel:
        """The loaded version for descriptions (retired versions too); NotFoundError names what exists."""
        return self.runtime.registry.describe(name, parse_version(version))

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the version takes requests (unknown models and versions raise NotFoundError)."""
        model = self.model(name, version)
        return not self.runtime.draining and not model.retired

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """ModelMetadata as KServe's REST JSON (the gRPC door converts it)."""
        model = self.model(name, version)
        return {
            "name": model.name,
            "versions": [str(m.version) for m in self.runtime.registry.versions(model.name)],
            "platform": PLATFORM,
            # The `text` input is declared in neither the metadata nor the config: tools that fill
            # every declared input (perf_analyzer) would otherwise send both.
            "inputs": [{"name": TOKENS, "datatype": "INT64", "shape": input_shape(model)}],
            "outputs": [
                {"name": name, "datatype": OUTPUT_TYPES[name], "shape": shape}
                for name, shape in output_shapes(model).items()
            ],
        }

    def config(self, name: str, version: str) -> dict[str, Any]:
        """The Triton model configuration (model_config.proto's field names), with the sequence
        batcher and the implicit state, so Triton's tools treat the model as stateful."""
        model = self.model(name, version)
        manifest = model.manifest
        settings = self.runtime.settings
        state_dims = [manifest.num_layers, manifest.hidden_size]
        metrics = {k: v for k, v in manifest.metrics.items() if v is not None}
        parameters = {
            "arch": manifest.arch,
            "vocab_size": manifest.vocab_size,
            "embedding_size": manifest.embedding_size,
            "hidden_size": manifest.hidden_size,
            "num_layers": manifest.num_layers,
            "precision": manifest.precision,
            "tokenizer": model.tokenizer.to_json(),
            "model_sha256": manifest.model_sha256,
            **{f"metrics.{key}": value for key, value in sorted(metrics.items())},
        }
        return {
            "name": model.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [model.version]}},
            "max_batch_size": 0,
            "input": [{"name": TOKENS, "data_type": "TYPE_INT64", "dims": input_shape(model)}],
            "output": [
                {"name": name, "data_type": "TYPE_" + OUTPUT_TYPES[name], "dims": shape}
                for name, shape in output_shapes(model).items()
            ],
            "sequence_batching": {
                "max_sequence_idle_microseconds": int(settings.session_idle_timeout_s * 1e6),
                "oldest": {
                    "max_candidate_sequences": settings.max_sessions,
                    "preferred_batch_size": [settings.max_batch_size],
                    "max_queue_delay_microseconds": int(settings.max_queue_delay_s * 1e6),
                },
                "state": [
                    {
                        "input_name": f"{state}0",
                        "output_name": f"{state}n",
                        "data_type": "TYPE_FP32",
                        "dims": state_dims,
                        "initial_state": [
                            {"name": "zero", "data_type": "TYPE_FP32", "dims": state_dims, "zero_data": True}
                        ],
                    }
                    for state in manifest.state_names
                ],
            },
            "parameters": {key: {"string_value": str(value)} for key, value in parameters.items()},
        }

    def repository_index(self) -> list[dict[str, str]]:
        registry = self.runtime.registry
        return [
            {
                "name": model.name,
                "version": str(model.version),
                "state": "UNAVAILABLE" if model.retired else "READY",
                "reason": "retired: open sessions finish, new ones go to a newer version"
                if model.retired
                else "",
            }
            for name in registry.names()
            for model in registry.versions(name)
        ]

    def model_statistics(self, name: str, version: str) -> list[tuple[LoadedModel, VersionStatistics]]:
        """Statistics of one version, every version of a model, or (name "") of every model."""
        registry = self.runtime.registry
        if name:
            models = [self.model(name, version)] if version else registry.versions(self.model(name, "").name)
        else:
            models = [m for n in registry.names() for m in registry.versions(n)]
        return [(m, self.statistics.get((m.name, m.version), VersionStatistics())) for m in models]

    # ----- inference --------------------------------------------------------------------------

    async def infer(self, call: InferCall, owner: str | None = None) -> InferAnswer:
        """Run one ModelInfer request; raises a ServingError and changes no session on failure."""
        started = time.monotonic_ns()
        model: LoadedModel | None = None
        try:
            model = self.runtime.registry.resolve(call.model_name, parse_version(call.model_version))
            answer = await self._infer(model, call, owner)
        except BaseException:
            if model is not None:
                stats = self._stats(model)
                stats.fail_count += 1
                stats.fail_ns += time.monotonic_ns() - started
            raise
        stats = self._stats(model)
        stats.success_count += 1
        stats.success_ns += time.monotonic_ns() - started
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        return answer

    def _stats(self, model: LoadedModel) -> VersionStatistics:
        key = (model.name, model.version)
        stats = self.statistics.get(key)
        if stats is None:
            stats = self.statistics[key] = VersionStatistics()
        return stats

    async def _infer(self, model: LoadedModel, call: InferCall, owner: str | None) -> InferAnswer:
        runtime = self.runtime
        parameters = call.parameters
        check_parameters(parameters)
        sequence_id = sequence_of(parameters)
        tokens = runtime.check_tokens(model, self._token_values(model, call.inputs), "the tokens input")
        wanted = self._wanted_outputs(call.outputs, "top_k" in parameters)
        top_k = parameters.get("top_k", 0)
        if top_k < 0 or (top_k == 0 and "top_k" in parameters):
            raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}", Reason.INVALID_OPTION)
        sampled = any(name in parameters for name in SAMPLING_PARAMETERS)
        sampling = None
        if sampled:
            sampling = Sampling(
                temperature=float(parameters.get("temperature", 1.0)),
                top_k=parameters.get("sampling_top_k", 0),
                top_p=float(parameters["top_p"]) if "top_p" in parameters else None,
                seed=parameters.get("seed"),
            )
            if sampling.top_k < 0:
                raise InvalidArgumentError(
                    f"sampling_top_k must be >= 0 (0: no limit), got {sampling.top_k}", Reason.INVALID_OPTION
                )
            if sampling.seed is not None and not 0 <= sampling.seed < 2**64:
                raise InvalidArgumentError(
                    f"seed must be a uint64, got {sampling.seed}", Reason.INVALID_OPTION
                )
        # Greedy next_token is the first top id (ties go to the lowest id, as the sampler's do),
        # which spares a random generator per request.
        request = runtime.prediction_request(model, top_k, LOGPROBS in wanted, sampling)
        start = bool(parameters.get(SEQUENCE_START))
        end = bool(parameters.get(SEQUENCE_END))
        session, opened = await self._sequence_session(model, sequence_id, start, owner)
        try:
            result, _ = await runtime.step(session, tokens, request)
        except BaseException:
            if opened and not session.closed:
                await runtime.close(session)  # the failed START leaves no sequence behind
            raise
        if end or sequence_id is None:
            await runtime.close(session)
        self._stats(model).inference_count += len(tokens)
        outputs = []
        for name in wanted:
            if name == LOGPROBS:
                logits = np.asarray(result.logits, np.float32).reshape(1, -1)
                outputs.append(OutputTensor(name, "FP32", (1, model.vocab_size), log_softmax(logits)))
            elif name == TOP_IDS:
                ids = np.asarray(result.top_ids, np.int64)
                outputs.append(OutputTensor(name, "INT64", (1, len(ids)), ids))
            elif name == TOP_LOGPROBS:
                values = np.asarray(result.top_logprobs, np.float32)
                outputs.append(OutputTensor(name, "FP32", (1, len(values)), values))
            else:
                chosen = result.sampled_token if sampled else result.top_ids[0]
                token = np.asarray([chosen], np.int64)
                outputs.append(OutputTensor(name, "INT64", (1, 1), token))
        return InferAnswer(model.name, str(model.version), call.request_id, outputs)

    def _token_values(self, model: LoadedModel, inputs: Sequence[InputTensor]) -> Sequence[int]:
        if len(inputs) != 1 or inputs[0].name not in (TOKENS, TEXT):
            names = [tensor.name[:64] for tensor in inputs]
            raise InvalidArgumentError(
                f"{model.label} takes one input: {TOKENS!r} (INT64, shape [1, T]) or {TEXT!r} "
                f"(BYTES, shape [1]); got {names}",
                Reason.MALFORMED_REQUEST,
            )
        tensor = inputs[0]
        if tensor.name == TEXT:
            if tensor.datatype != "BYTES" or tensor.shape != (1,):
                raise InvalidArgumentError(
                    f"input {TEXT!r} must be BYTES of shape [1], "
                    f"got {tensor.datatype[:32]} {list(tensor.shape)}",
                    Reason.MALFORMED_REQUEST,
                )
            return self._encode_text(model, tensor.data[0])
        if tensor.datatype != "INT64":
            raise InvalidArgumentError(
                f"input {TOKENS!r} must be INT64, got {tensor.datatype[:32]}", Reason.MALFORMED_REQUEST
            )
        if len(tensor.shape) != 2 or tensor.shape[0] != 1 or tensor.shape[1] < 1:
            raise InvalidArgumentError(
                f"input {TOKENS!r} must have shape [1, T] with T >= 1 (one sequence), "
                f"got {list(tensor.shape)}",
                Reason.MALFORMED_REQUEST,
            )
        return tensor.data  # type: ignore[return-value]  # an int64 array reads as a sequence of ints

    def _encode_text(self, model: LoadedModel, raw: bytes) -> list[int]:
        if model.tokenizer.kind not in TEXT_TOKENIZERS:
            raise InvalidArgumentError(
                f"{model.label} has a {model.tokenizer.kind!r} tokenizer without text; send {TOKENS!r}",
                Reason.INVALID_PROMPT,
            )
        limit = self.runtime.settings.max_tokens_per_request
        if len(raw) > 4 * limit:  # at least one token per character, at most 4 bytes per character
            raise ResourceExhaustedError(
                f"the text input has {len(raw)} bytes, over the limit of {limit} tokens per request",
                Reason.TOO_MANY_TOKENS,
            )
        try:
            return model.tokenizer.encode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"input {TEXT!r} is not UTF-8 text", Reason.INVALID_PROMPT) from None
        except TokenizerError as error:
            raise InvalidArgumentError(
                f"input {TEXT!r} cannot be encoded for {model.label}: {error}", Reason.INVALID_PROMPT
            ) from None

    def _wanted_outputs(self, requested: Sequence[str], has_top_k: bool) -> list[str]:
        if not requested:
            return [TOP_IDS, TOP_LOGPROBS, NEXT_TOKEN] if has_top_k else [LOGPROBS, NEXT_TOKEN]
        unknown = [name[:64] for name in requested if name not in OUTPUT_TYPES]
        if unknown:
            raise InvalidArgumentError(
                f"unknown outputs {unknown}; outputs: {', '.join(OUTPUT_TYPES)}", Reason.MALFORMED_REQUEST
            )
        if len(set(requested)) != len(requested):
            raise InvalidArgumentError(
                f"an output is requested twice: {list(requested)}", Reason.MALFORMED_REQUEST
            )
        return list(requested)

    async def _sequence_session(
        self, model: LoadedModel, sequence_id: int | str | None, start: bool, owner: str | None
    ) -> tuple[Session, bool]:
        """The session a request runs on, and whether this request opened it."""
        runtime = self.runtime
        if sequence_id is None:
            return await runtime.open_session(model.name, model.version, owner), True
        if not start:
            session = await self.find_sequence(model.name, sequence_id, owner)
            if session.model is not model:
                raise InvalidArgumentError(
                    f"sequence {sequence_id!r} runs on {session.model.label}, not version {model.version}; "
                    f"leave the version empty to continue it",
                    Reason.SESSION_MODEL_MISMATCH,
                )
            return session, False
        session_id = sequence_session_id(owner, model.name, sequence_id)
        try:
            session = await runtime.find_session(session_id, owner)
        except SessionNotFoundError:
            return await runtime.open_session(model.name, model.version, owner, session_id), True
        if session.model is model:
            runtime.check_admission(model)  # refused before the reset, not after it
            await runtime.reset(session)  # a new sequence under an id still open
            return session, False
        await runtime.close(session)  # the id moves to the requested version
        return await runtime.open_session(model.name, model.version, owner, session_id), True

    async def find_sequence(self, model_name: str, sequence_id: int | str, owner: str | None) -> Session:
        """The open session of a sequence; SessionNotFoundError says how to start one (NotFoundError
        for a model this server does not serve, as a new sequence would get)."""
        self.runtime.registry.describe(model_name)
        session_id = sequence_session_id(owner, model_name, sequence_id)
        try:
            return await self.runtime.find_session(session_id, owner)
        except SessionNotFoundError as missing:
            reason = str(missing).replace(f"session {session_id}", f"its session {session_id}")
            raise SessionNotFoundError(
                f"sequence {sequence_id!r} of model {shown(model_name)} is not open ({reason}); "
                f"the first request of a sequence sets sequence_start",
                missing.reason,
            ) from None


# ----- tensors on the wire ------------------------------------------------------------------------


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidArgumentError(
            f"input {name[:64]!r} has a negative dimension in its shape {list(shape)}",
            Reason.MALFORMED_REQUEST,
        )
    return math.prod(shape)


def decode_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    """BYTES tensor data as the protocol packs it: each element a 4-byte little-endian length, then
    the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgumentError(
                f"input {name[:64]!r}: BYTES data ends inside an element's length", Reason.MALFORMED_REQUEST
            )
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgumentError(
                f"input {name[:64]!r}: BYTES data ends inside an element", Reason.MALFORMED_REQUEST
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> InputTensor:
    """An input from its raw little-endian bytes (gRPC raw_input_contents, HTTP binary data)."""
    count = element_count(name, shape)
    if datatype == "BYTES":
        elements = decode_bytes_elements(name, raw)
        data = np.empty(len(elements), dtype=object)
        data[:] = elements
    elif datatype in NUMPY_TYPES:
        dtype = NUMPY_TYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgumentError(
                f"input {name[:64]!r} has {len(raw)} bytes of data; shape {list(shape)} of {datatype} "
                f"needs {count * dtype.itemsize}",
                Reason.MALFORMED_REQUEST,
            )
        data = np.frombuffer(raw, dtype)
    else:
        raise InvalidArgumentError(
            f"input {name[:64]!r} has datatype {datatype[:32]!r}, which KServe v2 does not define; "
            f"datatypes: {', '.join([*NUMPY_TYPES, 'BYTES'])}",
            Reason.MALFORMED_REQUEST,
        )
    if len(data) != count:
        raise InvalidArgumentError(
            f"input {name[:64]!r} has {len(data)} elements; shape {list(shape)} needs {count}",
            Reason.MALFORMED_REQUEST,
        )
    return InputTensor(name, datatype, tuple(shape), data)


def encode_bytes_elements(values: Sequence[bytes]) -> bytes:
    return b"".join(len(value).to_bytes(4, "little") + value for value in values)
