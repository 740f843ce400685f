"""Training side of rnnserve: LSTM/GRU next-token language models in PyTorch."""

import os

# OpenMP worker threads that spin while they wait take the CPU from each other and from every other
# process: on a shared 2-core machine, two spinning threads trained 5-10x slower than one, while
# sleeping waiters cost little when the machine is idle. libgomp reads this once, when torch loads,
# so it is set here, before the first torch import of `rnnserve train`, torchrun and the exporter.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from models.config import ModelConfig
from models.model import RNNLanguageModel, State

__all__ = ["ModelConfig", "RNNLanguageModel", "State"]
