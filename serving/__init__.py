"""Serving side of rnnserve: stateful streaming gRPC inference on onnxruntime. No torch here."""
