"""The rnnserve benchmark: engine, transport and server measured side by side (`rnnserve bench`).

It drives serving/ from outside, as a client and a process supervisor, and is not part of the
serving package or its container image.
"""
