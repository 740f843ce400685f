"""Export side of rnnserve: checkpoints -> verified ONNX in a model repository.

This package's `signature` module is torch-free and shared with the server; the modules that
need torch import it themselves.
"""
