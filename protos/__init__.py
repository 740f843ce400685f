"""Wire contract of rnnserve: protocol buffers and generated gRPC code (make protos)."""
