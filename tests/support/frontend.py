"""Harness for the front-door tests: a real server with the HTTP front end on a free port, and
rnnserve.v1 references (Stream log-probabilities, Generate text) to compare the doors with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.clients.client import RnnserveClient, Sampling
from serving.ops.auth import TokenTable
from tests.support.servers import ServerThread


class FrontDoorServer(ServerThread):
    """A ServerThread whose server also serves HTTP on 127.0.0.1:<free port> (`http_url`);
    `tokens` (a serving.ops.auth.TokenTable) turns bearer tokens on for the HTTP door."""

    def __init__(self, repository: Path, tokens: TokenTable | None = None, **overrides: Any) -> None:
        self.tokens = tokens
        self.http_port = 0
        super().__init__(repository, **overrides)

    async def _start(self) -> tuple[Any, int]:
        from serving.frontend.server import attach_http, create_server

        server, port = await create_server(self.settings, self.registry, observer=self.observer)
        self.http_port = attach_http(server, "127.0.0.1", 0, self.tokens)
        await server.start()
        return server, port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def log_softmax(logits: Sequence[float]) -> np.ndarray:
    values = np.asarray(logits, np.float64)
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


async def stream_logprobs(target: str, model: str, tokens: Sequence[int]) -> np.ndarray:
    """rnnserve.v1 Stream, one token per chunk: (len(tokens), vocab) next-token log-probabilities."""
    rows = []
    async with RnnserveClient(target) as client, client.stream(model, return_logits=True) as stream:
        for token in tokens:
            prediction = await stream.send([token])
            rows.append(log_softmax(prediction.logits))
        await stream.end()
    return np.stack(rows)


async def grpc_generate_text(target: str, model: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """The text rnnserve.v1 Generate produces for a prompt and seed (temperature 1)."""
    async with RnnserveClient(target) as client:
        parts = [
            response.text
            async for response in client.generate(
                model, prompt_text=prompt, max_new_tokens=max_new_tokens, sampling=Sampling(seed=seed)
            )
        ]
    return "".join(parts)
