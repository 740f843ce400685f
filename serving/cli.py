"""The `rnnserve` console script: one subcommand per role, each a module with main(argv).

Subcommand modules are imported only when chosen, so `rnnserve serve` never imports torch and
`rnnserve --help` starts instantly. `bench` is a package of its own beside serving/, named here
only as a string: serving never imports it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv) -> int, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.train", "train an LSTM/GRU language model (needs the 'train' extra)"),
    "export": ("export.cli", "export a checkpoint to verified ONNX in a model repository"),
    "serve": ("serving.frontend.server", "serve a model repository over gRPC"),
    "generate": ("serving.clients.generate", "stream generated text from a running server"),
    "health": ("serving.clients.health", "check a server through the gRPC health service"),
    "models": ("serving.clients.models_cli", "list a running server's models, versions and sizes"),
    "bench": ("bench.cli", "benchmark the engine, the transport and the server side by side"),
}


def version() -> str:
    """The installed rnnserve distribution's version (pyproject.toml's `version`)."""
    return importlib.metadata.version("rnnserve")


def usage() -> str:
    lines = ["usage: rnnserve [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10}{summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run `rnnserve <command> --help` for a command's options and defaults."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"rnnserve {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"rnnserve: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # A part left out of this installation (the serving image has no `bench`); a missing
        # dependency of a part that is here (torch for `train`) is raised as it is.
        if error.name != module_name.split(".")[0]:
            raise
        print(
            f"rnnserve {command}: the {error.name!r} package is not installed here (the serving image "
            f"leaves it out); run `rnnserve {command}` from a source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
