"""`rnnserve export`: publish a checkpoint as a verified ONNX model version, or re-verify one.

    rnnserve export CKPT_DIR --repository REPO --name NAME [--version N] [--precision fp32|int8|fp16]
    rnnserve export --verify-only REPO/NAME/N [--checkpoint CKPT_DIR]

Exit status: 0 published / verified, 1 the export or verification failed (the message names the
check, the tensor and the numbers; nothing was published), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from contract.model_config import PRECISIONS
from export.errors import ExportError, VerificationError
from export.report import DEVICES


def get_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve export",
        description=(
            "Export a training checkpoint to ONNX, verify onnxruntime against PyTorch, and publish it "
            "atomically as <repository>/<name>/<version>/ (model.onnx + config.json). With "
            "--verify-only, re-run the verification of a published version."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint_dir", nargs="?", type=Path, help="checkpoint directory to export")
    parser.add_argument("--repository", type=Path, help="model repository directory (created if missing)")
    parser.add_argument("--name", help="model name: letters, digits, '.', '_', '-'")
    parser.add_argument("--version", type=int, help="version number to publish (default: next free)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; int8 (dynamic quantization, CPU); fp16 (CUDA serving only)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where verification runs (auto: CPU, or CUDA for fp16 when available)",
    )
    parser.add_argument(
        "--verify-only",
        type=Path,
        metavar="VERSION_DIR",
        help="re-verify the published version REPO/NAME/N instead of exporting",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="CKPT_DIR",
        help="with --verify-only: the PyTorch checkpoint to verify against "
        "(default: the source_checkpoint recorded in config.json)",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.verify_only is not None:
        if args.checkpoint_dir is not None:
            parser.error("with --verify-only, give the checkpoint as --checkpoint CKPT_DIR")
        if args.repository is not None or args.name is not None or args.version is not None:
            parser.error(
                "--verify-only takes the version directory itself; drop --repository/--name/--version"
            )
        return
    if args.checkpoint is not None:
        parser.error("--checkpoint goes with --verify-only; to export, give CKPT_DIR as the first argument")
    missing = [
        flag
        for flag, value in (
            ("CKPT_DIR", args.checkpoint_dir),
            ("--repository", args.repository),
            ("--name", args.name),
        )
        if value is None
    ]
    if missing:
        parser.error(f"exporting needs {', '.join(missing)} (or use --verify-only REPO/NAME/N)")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args(sys.argv[1:] if argv is None else argv)
    # Imported here so `rnnserve export --help` does not load torch and onnxruntime.
    from export.exporter import export_checkpoint, verify_version
    from models.checkpoint import CheckpointError

    try:
        if args.verify_only is not None:
            report = verify_version(args.verify_only, args.checkpoint, device=args.device)
            print(report.summary())
            return 0 if report.passed else 1
        result = export_checkpoint(
            args.checkpoint_dir, args.repository, args.name, args.version, args.precision, device=args.device
        )
    except VerificationError as error:
        print(error.report.summary(), file=sys.stderr)
        print("rnnserve export: verification failed; nothing was published", file=sys.stderr)
        return 1
    except (ExportError, CheckpointError) as error:
        print(f"rnnserve export: {error}", file=sys.stderr)
        return 1
    print(result.verification.summary())
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
    print(
        f"published {result.path} ({result.precision}, model sha256 {result.model_sha256[:12]}…, "
        f"largest parity error {result.max_abs_error:.3e}); {stages}"
    )
    return 0
