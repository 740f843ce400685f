"""Clients of a running server: the Python client, `rnnserve generate` and `rnnserve health`."""
