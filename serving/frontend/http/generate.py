"""Triton's generate extension on the runtime: a JSON body in, GenerateParams and answers out.

    {"text_input": "to be or", "parameters": {"max_tokens": 64, "temperature": 0.8, "top_k": 0,
     "top_p": 1.0, "seed": 7}}

Instead of text, a prompt may be token ids: `"input_ids": [1, 2, 3]` (models without a text
tokenizer answer ids only, with an empty text_output). Further parameters: `stop_token_ids` (a
list of ids that end the generation, included), a Triton sequence (`sequence_id`,
`sequence_start`, `sequence_end`, the same sessions as the infer route and the gRPC door), or an
rnnserve session: `keep_session: true` keeps a new session and answers
its `session_id`; `session_id` continues one. Without any of them the generation runs on a fresh
state that is dropped afterwards.

Each answer (or server-sent event) carries model_name, model_version, text_output (the new text
only) and token_ids; the last one also finish_reason ("length" or "stop"); answers on a kept
session or sequence also carry session_id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from contract.sampling import Sampling
from serving.core.batcher import FinishReason
from serving.core.errors import (
    InvalidArgumentError,
    Reason,
    ResourceExhaustedError,
    SessionNotFoundError,
    shown,
)
from serving.core.runtime import GenerateParams, Generation, Runtime
from serving.frontend.kserve_common import (
    SEQUENCE_END,
    SEQUENCE_START,
    KServeFrontend,
    parse_version,
    sequence_of,
    sequence_session_id,
)

DEFAULT_MAX_TOKENS = 100
BODY_KEYS = ("text_input", "input_ids", "parameters")
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": (float, int),
    "top_k": (int,),
    "top_p": (float, int),
    "seed": (int,),
    "stop_token_ids": (list,),
    "sequence_id": (int, str),
    SEQUENCE_START: (bool,),
    SEQUENCE_END: (bool,),
    "session_id": (str,),
    "keep_session": (bool,),
}
FINISH_NAMES = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop"}


@dataclass(frozen=True)
class GenerateRequest:
    """A parsed generate body: the runtime's params and what the answers carry."""

    params: GenerateParams
    kept: bool  # the session outlives the request: answers carry its id
    end: bool  # close the session once the generation finished (sequence_end)

    def with_new_session_id(self, session_id: str | None) -> GenerateRequest:
        return dataclasses.replace(self, params=dataclasses.replace(self.params, new_session_id=session_id))

    def event(
        self, generation: Generation, text: str, tokens: list[int], finish: FinishReason | None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "model_name": generation.model.name,
            "model_version": str(generation.model.version),
            "text_output": text,
            "token_ids": tokens,
        }
        if self.kept:
            event["session_id"] = generation.session.id
        if finish is not None:
            event["finish_reason"] = FINISH_NAMES[finish]
        return event

    async def finished(self, runtime: Runtime, generation: Generation) -> None:
        """After the last token: END closes the sequence's session."""
        if self.end and not generation.session.closed:
            try:
                await runtime.close(generation.session)
            except SessionNotFoundError:
                return  # ended meanwhile (an expiry, another request's END)


def _check(parameters: dict[str, Any]) -> None:
    for name, value in parameters.items():
        kinds = PARAMETER_TYPES.get(name)
        if kinds is None:
            raise InvalidArgumentError(
                f"unknown generate parameter {name[:64]!r}; allowed: {', '.join(PARAMETER_TYPES)}",
                Reason.MALFORMED_REQUEST,
            )
        if type(value) not in kinds:
            wanted = " or ".join({bool: "boolean", list: "list"}.get(k, k.__name__) for k in kinds)
            raise InvalidArgumentError(
                f"generate parameter {name!r} must be {wanted}, got {value!r:.40}", Reason.MALFORMED_REQUEST
            )
    stops = parameters.get("stop_token_ids", [])
    if not all(type(token) is int for token in stops):
        raise InvalidArgumentError(
            "stop_token_ids must be a list of integer token ids", Reason.MALFORMED_REQUEST
        )


async def parse_generate(
    frontend: KServeFrontend, model_name: str, version: str, body: Any, owner: str | None
) -> GenerateRequest:
    """Validate a generate body; a sequence_start on an open sequence resets it (last, after
    every check this module can make)."""
    runtime = frontend.runtime
    if not isinstance(body, dict):
        raise InvalidArgumentError(
            "the generate body must be a JSON object with text_input and parameters", Reason.MALFORMED_REQUEST
        )
    unknown = [key[:64] for key in body if key not in BODY_KEYS]
    if unknown:
        raise InvalidArgumentError(
            f"the generate body has unknown keys {unknown[:5]}; allowed: text_input, parameters",
            Reason.MALFORMED_REQUEST,
        )
    text = body.get("text_input", "")
    if not isinstance(text, str):
        raise InvalidArgumentError("text_input must be a string", Reason.MALFORMED_REQUEST)
    input_ids = body.get("input_ids", [])
    if not isinstance(input_ids, list) or not all(type(token) is int for token in input_ids):
        raise InvalidArgumentError("input_ids must be a list of integer token ids", Reason.MALFORMED_REQUEST)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgumentError("parameters must be a JSON object", Reason.MALFORMED_REQUEST)
    _check(parameters)
    max_tokens = parameters.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= runtime.settings.max_new_tokens:
        message = (
            f"max_tokens must be in 1..{runtime.settings.max_new_tokens} (--max-new-tokens), got {max_tokens}"
        )
        if max_tokens < 1:
            raise InvalidArgumentError(message, Reason.INVALID_OPTION, option="max_tokens")
        raise ResourceExhaustedError(
            message, Reason.MAX_NEW_TOKENS_EXCEEDED, limit=runtime.settings.max_new_tokens
        )
    seed = parameters.get("seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidArgumentError(f"seed must be a uint64, got {seed}", Reason.INVALID_OPTION)
    top_k = parameters.get("top_k", 0)
    if top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0 (0: no limit), got {top_k}", Reason.INVALID_OPTION)
    sequence_id = sequence_of(parameters)
    session_id = parameters.get("session_id", "")
    keep = parameters.get("keep_session", False)
    if sequence_id is not None and (session_id or keep):
        raise InvalidArgumentError(
            "give sequence_id or session_id / keep_session, not both", Reason.INVALID_OPTION
        )
    params = GenerateParams(
        model=model_name,
        version=parse_version(version),
        session_id=session_id,
        prompt_text=text,
        prompt_tokens=input_ids,
        max_new_tokens=max_tokens,
        sampling=Sampling(
            temperature=parameters.get("temperature"),
            top_k=top_k,
            top_p=parameters.get("top_p"),
            seed=seed,
        ),
        stop_tokens=parameters.get("stop_token_ids", ()),
        keep_session=keep,
    )
    if session_id:
        # A continued session keeps its model; the route's name must agree (version may be left out).
        params = dataclasses.replace(params, model="" if not params.version else model_name)
        session = await runtime.find_session(session_id, owner)
        if session.model.name != model_name:
            raise InvalidArgumentError(
                f"session {session_id} is on model {session.model.name!r}, not {shown(model_name)}",
                Reason.SESSION_MODEL_MISMATCH,
            )
        return GenerateRequest(params, kept=True, end=False)
    if sequence_id is None:
        return GenerateRequest(params, kept=keep, end=False)
    end = bool(parameters.get(SEQUENCE_END))
    derived = sequence_session_id(owner, model_name, sequence_id)
    if not parameters.get(SEQUENCE_START):
        session = await frontend.find_sequence(model_name, sequence_id, owner)
        return GenerateRequest(
            dataclasses.replace(params, model="", version=0, session_id=session.id), True, end
        )
    try:
        session = await runtime.find_session(derived, owner)
    except SessionNotFoundError:
        return GenerateRequest(
            dataclasses.replace(params, keep_session=True, new_session_id=derived), True, end
        )
    if not text:
        raise InvalidArgumentError(
            "sequence_start needs a text_input (a new sequence has no text to continue)",
            Reason.INVALID_PROMPT,
        )
    model = runtime.registry.resolve(model_name, params.version)
    if session.model is not model:
        await runtime.close(session)  # the id moves to the requested version
        return GenerateRequest(
            dataclasses.replace(params, keep_session=True, new_session_id=derived), True, end
        )
    runtime.check_admission(model)
    await runtime.reset(session)  # a new sequence under an id still open
    return GenerateRequest(dataclasses.replace(params, model="", version=0, session_id=session.id), True, end)
