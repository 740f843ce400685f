"""The `rnnserve` console script: one subcommand per role, each a module with main(argv).

Subcommand modules are imported only when chosen, so `rnnserve serve` never imports torch and
`rnnserve --help` starts instantly.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv) -> int, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.train", "train an LSTM/GRU language model (needs the 'train' extra)"),
    "export": ("export.cli", "export a checkpoint to verified ONNX in a model repository"),
    "serve": ("serving.server", "serve a model repository over gRPC"),
    "generate": ("serving.generate", "stream generated text from a running server"),
    "health": ("serving.health", "check a server through the gRPC health service"),
    "models": ("serving.models_cli", "list a running server's models, versions and sizes"),
    "bench": ("serving.bench", "benchmark the engine, the transport and the server side by side"),
}


def usage() -> str:
    lines = ["usage: rnnserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<10}{summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run `rnnserve <command> --help` for a command's options and defaults."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"rnnserve: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
