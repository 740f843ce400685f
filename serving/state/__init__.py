"""Session state kept beyond one process: session records, the snapshot file, Redis, recovery."""
