"""Operations around the core: authentication, logs, metrics and model reload."""
