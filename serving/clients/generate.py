"""`rnnserve generate`: stream generated text from a running server to the terminal.

The prompt is encoded with the model's own tokenizer (fetched with GetModel), so a character the
model never saw is refused here with the allowed alphabet; the text appears as it is generated.
A `--target` of http://HOST:PORT uses the HTTP door's generate_stream instead of gRPC.
Exit status: 0 done, 1 the server refused or could not be reached, 2 bad arguments or prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Sequence

import grpc

from contract.tokenizer import TEXT_TOKENIZERS, TokenizerError, tokenizer_from_json
from serving.clients.client import (
    TOKEN_ENV,
    ConnectionConfigError,
    RnnserveClient,
    Sampling,
    add_connection_arguments,
    connection_from,
)
from serving.clients.http import HttpGenerateError, is_http_target, stream_generate


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve generate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="gRPC address HOST:PORT, or an HTTP URL http://HOST:PORT"
    )
    parser.add_argument("--model", required=True, help="model name (see ListModels)")
    parser.add_argument("--version", type=int, default=0, help="model version; 0 = latest")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (same seed, same text)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    add_connection_arguments(parser)
    return parser.parse_args(list(argv))


def describe(error: grpc.aio.AioRpcError, target: str) -> str:
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach an rnnserve server at {target} ({error.details()})"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server at {target} did not answer in time"
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {error.details()} (give --token or set $RNNSERVE_TOKEN)"
    return f"{error.code().name}: {error.details()}"


async def generate(args: argparse.Namespace) -> int:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        connection = connection_from(args)
        client = RnnserveClient(args.target, timeout=args.timeout, connection=connection)
    except ConnectionConfigError as error:
        print(f"rnnserve generate: {error}", file=sys.stderr)
        return 2
    async with client:
        try:
            info = await client.get_model(args.model, args.version)
            tokenizer = tokenizer_from_json(info.versions[0].tokenizer_json)
            prompt = tokenizer.encode(args.prompt)
        except TokenizerError as error:
            print(
                f"rnnserve generate: the prompt cannot be encoded for {args.model!r}: {error}",
                file=sys.stderr,
            )
            return 2
        except grpc.aio.AioRpcError as error:
            print(f"rnnserve generate: {describe(error, args.target)}", file=sys.stderr)
            return 1
        has_text = tokenizer.kind in TEXT_TOKENIZERS
        print(args.prompt, end="", flush=True)
        try:
            async for response in client.generate(
                args.model,
                version=info.versions[0].version,
                prompt_tokens=prompt,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                timeout=args.timeout,
            ):
                text = response.text if has_text else "".join(f" {t}" for t in response.tokens)
                print(text, end="", flush=True)
        except grpc.aio.AioRpcError as error:
            print(f"\nrnnserve generate: {describe(error, args.target)}", file=sys.stderr)
            return 1
        print()
    return 0


def https_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS flags (--tls-ca, --tls-cert, --tls-key) for an https:// target; None: the defaults."""
    if args.tls_ca is None and args.tls_cert is None:
        return None
    context = ssl.create_default_context(cafile=args.tls_ca)
    if args.tls_cert is not None:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def generate_over_http(args: argparse.Namespace) -> int:
    parameters: dict[str, object] = {
        "max_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    if args.seed is not None:
        parameters["seed"] = args.seed
    print(args.prompt, end="", flush=True)
    try:
        for event in stream_generate(
            args.target,
            args.model,
            args.prompt,
            parameters,
            version=args.version,
            token=args.token or os.environ.get(TOKEN_ENV) or None,
            timeout=args.timeout,
            tls=https_context(args),
        ):
            print(event["text_output"], end="", flush=True)
    except HttpGenerateError as error:
        print(f"\nrnnserve generate: {error}", file=sys.stderr)
        return 1
    print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if is_http_target(args.target):
        return generate_over_http(args)
    return asyncio.run(generate(args))


if __name__ == "__main__":
    sys.exit(main())
