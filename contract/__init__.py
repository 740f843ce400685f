"""What every part of rnnserve shares, torch-free: the ONNX signature and the tokenizers.

Training (models/), export (export/) and serving (serving/) all import this package; it
imports nothing else of the project's.
"""
