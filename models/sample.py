"""Text generation from a PyTorch model: greedy or sampled, carrying the recurrent state.

The prompt runs through the model in one chunk; then each new token is fed back one at a time
with the state, exactly as the server streams it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.model import RNNLanguageModel


@torch.no_grad()
def generate(
    model: RNNLanguageModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt` (at least one token id) by `max_new_tokens` ids.

    temperature 0: greedy (argmax). Otherwise sample from softmax(logits / temperature), keeping
    the `top_k` most likely ids when given; `generator` makes sampling reproducible.
    Returns only the new ids. The model is put in eval mode and left there.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    device = model.decoder.weight.device
    tokens = torch.tensor([list(prompt)], dtype=torch.int64, device=device)  # (1, P)
    logits, state = model(tokens)
    next_logits = logits[0, -1]  # (V,)
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        next_id = _choose(next_logits, temperature, top_k, generator)
        new_ids.append(next_id)
        logits, state = model(torch.tensor([[next_id]], dtype=torch.int64, device=device), state)
        next_logits = logits[0, -1]
    return new_ids


def _choose(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    """One id from next-token logits (V,)."""
    if temperature == 0.0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.numel():
        threshold = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1).cpu()
    return int(torch.multinomial(probabilities, 1, generator=generator))
