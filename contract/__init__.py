"""What every part of rnnserve shares, torch-free: the ONNX signature, the tokenizers, the model
config <-> ONNX metadata mapping and the names of architectures and precisions, the model-name
rule, the session-id format, file hashing and onnxruntime's exception classes.

Training (models/), export (export/) and serving (serving/) all import this package; it
imports nothing else of the project's.
"""
