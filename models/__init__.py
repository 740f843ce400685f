"""Training side of rnnserve: LSTM/GRU next-token language models in PyTorch."""

from models.config import ModelConfig
from models.model import RNNLanguageModel, State

__all__ = ["ModelConfig", "RNNLanguageModel", "State"]
