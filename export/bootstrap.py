"""Make the default models when the model repository lacks them: the first half of `make serve`.

Trains the `default` preset of an LSTM and a GRU on the embedded Shakespeare corpus, then
exports and verifies them as `shakespeare-lstm` and `shakespeare-gru`. A model that already has
a complete version is left alone, so a second `make serve` starts serving in seconds; a
checkpoint that is already trained is exported without training again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from contract import signature as sig

DEFAULT_MODELS = (("shakespeare-lstm", "lstm"), ("shakespeare-gru", "gru"))


def has_complete_version(repository: Path, name: str) -> bool:
    """True when REPOSITORY/NAME holds a numbered version with both model.onnx and config.json."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return False
    return any(
        version.name.isdigit()
        and int(version.name) > 0
        and (version / sig.MODEL_FILE).is_file()
        and (version / sig.CONFIG_FILE).is_file()
        for version in model_dir.iterdir()
    )


def ensure_model(name: str, arch: str, repository: Path, checkpoints: Path, preset: str, device: str) -> None:
    # Imported here: the training and export entry points pull in torch, which a repository
    # that already has its models never needs.
    from export.cli import main as export_main
    from models.checkpoint import CheckpointError, read_checkpoint_json
    from models.train import main as train_main

    checkpoint = checkpoints / name
    train_args = ["--arch", arch, "--preset", preset, "--out", str(checkpoint), "--device", device]
    try:
        complete = bool(read_checkpoint_json(checkpoint).get("training", {}).get("complete"))
        partial = True
    except CheckpointError:
        complete = partial = False
    if complete:
        print(f"[bootstrap] {name}: using the trained checkpoint in {checkpoint}", flush=True)
    else:
        # Training writes its checkpoint at the first validation, so an interrupted run leaves
        # a partial one: resume it rather than export a half-trained model.
        verb = "resuming" if partial else "training"
        print(f"[bootstrap] {name}: {verb} the {preset!r} {arch} preset in {checkpoint}", flush=True)
        started = time.monotonic()
        status = train_main([*train_args, "--resume"] if partial else train_args)
        if status != 0:
            raise SystemExit(f"[bootstrap] training {name} failed (exit status {status})")
        print(f"[bootstrap] {name}: trained in {time.monotonic() - started:.0f} s", flush=True)
    status = export_main([str(checkpoint), "--repository", str(repository), "--name", name])
    if status != 0:
        raise SystemExit(f"[bootstrap] exporting {name} failed (exit status {status})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.bootstrap",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--preset", default="default", choices=("tiny", "default", "seed"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    if args.repository.exists() and not args.repository.is_dir():
        print(f"error: model repository {args.repository} is a file, not a directory", file=sys.stderr)
        return 2
    args.repository.mkdir(parents=True, exist_ok=True)
    for name, arch in DEFAULT_MODELS:
        if has_complete_version(args.repository, name):
            print(f"[bootstrap] {name}: present in {args.repository}", flush=True)
            continue
        ensure_model(name, arch, args.repository, args.checkpoints, args.preset, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
