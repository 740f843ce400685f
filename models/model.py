"""Embedding -> LSTM/GRU -> linear over the vocabulary, with explicit recurrent state.

State is batch-major, as in the ONNX signature: each tensor is (B, num_layers, hidden_size),
so one sequence's state is one contiguous row. PyTorch's RNN modules want (num_layers, B, H);
the model transposes at its boundary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.config import ModelConfig

# (h,) for GRU, (h, c) for LSTM; each (B, num_layers, hidden_size).
State = tuple[torch.Tensor, ...]


class RNNLanguageModel(nn.Module):
    """Next-token language model: forward(tokens, state, lengths) -> (logits, state)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        rnn_class = nn.LSTM if config.arch == "lstm" else nn.GRU
        self.rnn = rnn_class(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero state for `batch_size` sequences: tensors of (B, num_layers, hidden_size)."""
        if device is None:
            device = self.decoder.weight.device
        shape = (batch_size, self.config.num_layers, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.config.state_names)

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Run a right-padded chunk of tokens.

        tokens: (B, T) int64 token ids. lengths: (B,) real length of each row (1..T); when given,
        the rows are packed, so padding never changes the state and padded positions give
        logits equal to the decoder bias (as the ONNX model does). Returns logits (B, T, V)
        and the state after each row's last real token.
        """
        batch_size, seq_len = tokens.shape
        if state is None:
            state = self.init_state(batch_size, tokens.device)
        # (B, L, H) -> (L, B, H), the layout torch's RNN modules take.
        rnn_state = tuple(s.transpose(0, 1).contiguous() for s in state)
        rnn_input = rnn_state if self.config.arch == "lstm" else rnn_state[0]
        embedded = self.embedding(tokens)  # (B, T, E)
        if lengths is None:
            output, new_state = self.rnn(embedded, rnn_input)  # (B, T, H)
        else:
            packed = pack_padded_sequence(
                embedded, lengths.to("cpu", torch.int64), batch_first=True, enforce_sorted=False
            )
            packed_output, new_state = self.rnn(packed, rnn_input)
            output, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=seq_len)
        logits = self.decoder(output)  # (B, T, V)
        if self.config.arch == "lstm":
            h_n, c_n = new_state
            out_state: State = (h_n.transpose(0, 1), c_n.transpose(0, 1))
        else:
            out_state = (new_state.transpose(0, 1),)
        return logits, out_state
