"""Export side of rnnserve: checkpoints -> verified ONNX in a model repository.

The ONNX signature it writes lives in the torch-free `contract` package, shared with the server;
the modules that need torch import it themselves.
"""
