"""`rnnserve models`: list the models a running server serves, with their versions and sizes.

One line per loaded version (newest first; `*` marks the version new sessions get), or JSON with
--json. Exit status: 0 listed, 1 the server refused or could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from protos.rnnserve.v1 import inference_pb2 as pb
from serving.clients.client import (
    ConnectionConfigError,
    RnnserveClient,
    add_connection_arguments,
    connection_from,
)
from serving.clients.generate import describe

COLUMNS = ("model", "version", "arch", "precision", "vocab", "embedding", "hidden", "layers", "sessions")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve models",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per model) instead")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up")
    add_connection_arguments(parser)
    return parser.parse_args(list(argv))


def version_fields(model: pb.ModelInfo, version: pb.ModelVersion) -> dict[str, Any]:
    return {
        "version": version.version,
        "latest": version.version == model.latest_version,
        "arch": version.arch,
        "precision": version.precision,
        "vocab_size": version.vocab_size,
        "embedding_size": version.embedding_size,
        "hidden_size": version.hidden_size,
        "num_layers": version.num_layers,
        "active_sessions": version.active_sessions,
        "model_sha256": version.model_sha256,
    }


def as_json(models: Sequence[pb.ModelInfo]) -> str:
    listed = [
        {
            "name": model.name,
            "latest_version": model.latest_version,
            "versions": [version_fields(model, version) for version in model.versions],
        }
        for model in models
    ]
    return json.dumps(listed, indent=2)


def as_table(models: Sequence[pb.ModelInfo]) -> str:
    rows = [COLUMNS]
    for model in models:
        for version in model.versions:
            fields = version_fields(model, version)
            rows.append(
                (
                    model.name,
                    f"{version.version}{'*' if fields['latest'] else ''}",
                    version.arch,
                    version.precision,
                    str(version.vocab_size),
                    str(version.embedding_size),
                    str(version.hidden_size),
                    str(version.num_layers),
                    str(version.active_sessions),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def list_models(args: argparse.Namespace) -> int:
    try:
        connection = connection_from(args)
        client = RnnserveClient(args.target, connection=connection, timeout=args.timeout)
    except ConnectionConfigError as error:
        print(f"rnnserve models: {error}", file=sys.stderr)
        return 2
    async with client:
        try:
            models = await client.list_models()
        except grpc.aio.AioRpcError as error:
            print(f"rnnserve models: {describe(error, args.target)}", file=sys.stderr)
            return 1
    if not models:
        print(f"the server at {args.target} serves no model yet", file=sys.stderr)
    print(as_json(models) if args.json else as_table(models))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(list_models(args))


if __name__ == "__main__":
    sys.exit(main())
