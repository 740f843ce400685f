"""The inference core: repository, registry, engine, state pool, batcher, sessions, sampling, runtime."""
