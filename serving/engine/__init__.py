"""The engine core process and its IPC channel to the front-end processes (`--frontends N`)."""
