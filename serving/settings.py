"""Server settings: one frozen dataclass, filled from flags, then RNNSERVE_* variables, then defaults.

Every field is one setting. Its flag is the field name with dashes (`max_batch_size` ->
`--max-batch-size`) and its environment variable the upper-case name with the RNNSERVE_ prefix
(`RNNSERVE_MAX_BATCH_SIZE`). A flag beats the variable, the variable beats the default. Adding a
field (with `help` metadata) adds its flag and variable; nothing else needs to change.

Defaults were measured on the 2-core development machine with the `seed` LSTM (embedding 256,
hidden 512): one onnxruntime intra-op thread leaves the other core to the gRPC event loop (two
threads made a batch-1 step 1.5x slower and a batch-64 step 1.4x slower there).
"""

from __future__ import annotations

import argparse
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "RNNSERVE_"
DEVICES = ("auto", "cpu", "cuda")
SESSION_OVERFLOW = ("evict", "refuse")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# A legal token id is below its vocabulary's size; ids below 2**35 take at most 5 varint bytes.
TOKEN_ID_VARINT_BYTES = 5
# Every field of a request but its token lists: a model name (128 characters), a session id,
# sampling and prediction options, field tags and lengths. Measured: those fields of the largest
# GenerateRequest take 213 bytes, and the two token lists' tags and lengths 12 more; the rest is
# headroom for fields a later protocol version adds.
FIXED_REQUEST_BYTES = 4096


class SettingsError(ValueError):
    """A setting with a value outside what is allowed; the message names the flag and variable."""


def _about(help: str, choices: Sequence[str] | None = None, *, secret: bool = False) -> dict[str, Any]:
    """A settings field's metadata: its --help text and allowed values.

    A secret setting has no flag (a flag's value shows in `ps` and /proc/PID/cmdline to every user
    of the machine), only its RNNSERVE_* variable, and is left out of the settings' repr.
    """
    return {"help": help, "choices": choices, "secret": secret}


@dataclass(frozen=True)
class ServerSettings:
    """Everything `rnnserve serve` can be told. Build with `parse_settings(argv, environ)`."""

    repository: Path = field(
        default=Path("model_repository"), metadata=_about("model repository: REPO/NAME/VERSION/model.onnx")
    )
    host: str = field(
        default="127.0.0.1", metadata=_about("address to listen on (0.0.0.0 inside a container)")
    )
    port: int = field(default=50051, metadata=_about("port to listen on; 0 picks a free port"))
    frontends: int = field(
        default=0,
        metadata=_about(
            "front-end processes sharing --port (SO_REUSEPORT) beside one engine-core process that "
            "holds the models and sessions; 0: one process serves everything"
        ),
    )
    device: str = field(
        default="auto", metadata=_about("onnxruntime device: auto uses CUDA when available", DEVICES)
    )
    pin: tuple[tuple[str, int], ...] = field(
        default=(),
        metadata=_about(
            "serve NAME at VERSION instead of its latest (NAME=VERSION, repeatable; env: comma-separated)"
        ),
    )
    intra_op_threads: int = field(
        default=1, metadata=_about("onnxruntime threads inside one operator (per model version)")
    )
    inter_op_threads: int = field(
        default=1, metadata=_about("onnxruntime threads running operators in parallel")
    )
    max_batch_size: int = field(
        default=64, metadata=_about("most session steps in one onnxruntime run (1 disables batching)")
    )
    max_queue_delay_ms: float = field(
        default=2.0,
        metadata=_about("longest a step waits for a batch to fill up to the size of the previous batch"),
    )
    prompt_piece_tokens: int = field(
        default=64,
        metadata=_about(
            "long chunks and prompts run in pieces of at most this many tokens, between other steps"
        ),
    )
    max_queue_steps: int = field(
        default=4096,
        metadata=_about(
            "most requests (Stream chunks, Steps, Generates) waiting for a batch, per model version; "
            "more are refused at once with RESOURCE_EXHAUSTED"
        ),
    )
    session_idle_timeout_s: float = field(
        default=600.0, metadata=_about("a session unused this long expires")
    )
    max_sessions: int = field(default=100_000, metadata=_about("most open sessions, all models together"))
    session_overflow: str = field(
        default="evict",
        metadata=_about(
            "at the session limit: evict the least recently used idle session, or refuse",
            choices=SESSION_OVERFLOW,
        ),
    )
    gone_session_memory: int = field(
        default=65_536,
        metadata=_about(
            "how many expired, evicted or closed session ids are remembered to explain NOT_FOUND"
        ),
    )
    close_on_disconnect: bool = field(
        default=False,
        metadata=_about("close a Stream's session when the client goes away without CONTROL_END"),
    )
    stream_end_linger_s: float = field(
        default=1.0,
        metadata=_about(
            "after CONTROL_END, how long a Stream waits for the client to half-close (a request "
            "arriving meanwhile is answered with INVALID_ARGUMENT)"
        ),
    )
    stream_idle_timeout_s: float = field(
        default=300.0,
        metadata=_about(
            "a Stream that sends nothing for this long is ended with DEADLINE_EXCEEDED; its "
            "session stays open (resume it on a new stream); 0: no limit"
        ),
    )
    max_health_watches_per_peer: int = field(
        default=32,
        metadata=_about(
            "most open grpc.health.v1 Watch streams from one client address; more are refused "
            "with RESOURCE_EXHAUSTED (health needs no token, so this bounds what anyone can hold)"
        ),
    )
    max_message_bytes: int = field(
        default=0,
        metadata=_about(
            "largest request message gRPC decodes, in bytes; larger ones are refused with "
            "RESOURCE_EXHAUSTED before decoding; 0: the largest legal request under "
            "--max-tokens-per-request (see ServerSettings.receive_message_bytes)"
        ),
    )
    max_tokens_per_request: int = field(
        default=32_768, metadata=_about("most tokens in one chunk, Step or prompt")
    )
    max_new_tokens: int = field(default=4096, metadata=_about("most tokens one Generate may ask for"))
    generate_buffer_tokens: int = field(
        default=256,
        metadata=_about("tokens a Generate may hold for a slow reader before its decoding pauses"),
    )
    grace_period_s: float = field(
        default=10.0,
        metadata=_about(
            "on SIGTERM/SIGINT, how long open calls may go on (new sessions are refused at once); "
            "then steps in flight finish, later ones are refused with UNAVAILABLE"
        ),
    )
    log_level: str = field(default="INFO", metadata=_about("logging level", LOG_LEVELS))
    log_format: str = field(
        default="text", metadata=_about("log lines as text or as one JSON object per line", LOG_FORMATS)
    )
    log_requests: bool = field(
        default=False,
        metadata=_about(
            "log one line per finished call (method, status, duration, request id; never tokens or text)"
        ),
    )
    metrics_port: int = field(
        default=9400, metadata=_about("port of the Prometheus /metrics HTTP endpoint; 0 disables it")
    )
    metrics_host: str = field(
        default="",
        metadata=_about(
            "address of the /metrics endpoint; empty: --host when the server has TLS or tokens "
            "(then /metrics has them too: HTTPS, 'Authorization: Bearer TOKEN'), else 127.0.0.1"
        ),
    )
    http_port: int = field(
        default=8000,
        metadata=_about(
            "port of the HTTP front end (KServe v2 REST, Triton's generate and generate_stream, the "
            "playground at /); 0 turns it off"
        ),
    )
    http_host: str = field(
        default="", metadata=_about("address of the HTTP front end; empty means the same as --host")
    )
    health_port: int = field(
        default=0,
        metadata=_about(
            "a second, plaintext port on --host serving only grpc.health.v1 (for probes that cannot "
            "speak TLS); 0: health is served on --port only"
        ),
    )
    reload_interval_s: float = field(
        default=10.0,
        metadata=_about(
            "look for new model versions in the repository this often (SIGHUP looks at once); "
            "0 disables polling"
        ),
    )
    heap_trim_interval_s: float = field(
        default=5.0,
        metadata=_about(
            "give freed heap memory back to the operating system this often (glibc malloc_trim), so "
            "that memory grown by a burst of large requests does not stay; 0 disables it"
        ),
    )
    state_snapshot: Path | None = field(
        default=None,
        metadata=_about(
            "file to save every session's state to on shutdown and restore from on start "
            "(unset: sessions end with the process)"
        ),
    )
    snapshot_interval_s: float = field(
        default=0.0,
        metadata=_about(
            "also save the snapshot this often while serving, bounding what a crash loses; "
            "0 saves at shutdown only"
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=_about("PEM certificate chain: serve TLS, not plaintext (with --tls-key)")
    )
    tls_key: Path | None = field(default=None, metadata=_about("PEM private key of --tls-cert"))
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_about("PEM CA certificates: require client certificates signed by them (mutual TLS)"),
    )
    auth_tokens_file: Path | None = field(
        default=None,
        metadata=_about(
            "file of bearer tokens, one per line as TOKEN or NAME:TOKEN ('#' comments); "
            "with tokens, every call but health needs 'authorization: Bearer TOKEN'"
        ),
    )
    auth_tokens: str = field(
        default="",
        repr=False,
        metadata=_about("bearer tokens, comma-separated TOKEN or NAME:TOKEN (environment only)", secret=True),
    )
    max_sessions_per_token: int = field(
        default=0,
        metadata=_about("most open sessions one token (one NAME) may hold; 0: no limit but --max-sessions"),
    )
    redis_url: str = field(
        default="",
        repr=False,  # may carry a password
        metadata=_about(
            "Redis that keeps session state for recovery by any replica, redis://[:PASSWORD@]HOST:PORT/DB "
            "(rediss:// for TLS; a password in a flag shows in `ps`, prefer the variable); empty: "
            "sessions live and die with this process"
        ),
    )
    redis_namespace: str = field(
        default="rnnserve",
        metadata=_about("prefix of this deployment's Redis keys (NAMESPACE:session:ID); replicas share it"),
    )
    redis_timeout_s: float = field(
        default=0.25,
        metadata=_about(
            "with --redis-url: longest wait for Redis to connect or answer one command before it "
            "counts as unavailable (then state is not saved or recovered, and serving goes on)"
        ),
    )
    state_save_every_steps: int = field(
        default=0,
        metadata=_about(
            "with --redis-url: save a session's state after every N-th request on it; 1 answers each "
            "request only after its save, so a replica's crash loses no answered step; 0: not by count"
        ),
    )
    state_save_every_s: float = field(
        default=5.0,
        metadata=_about(
            "with --redis-url: save a session's state once its oldest unsaved request is this many "
            "seconds old, bounding what a crash loses; 0: not by time"
        ),
    )

    def __post_init__(self) -> None:
        problems = []
        positive_ints = (
            "intra_op_threads",
            "inter_op_threads",
            "max_batch_size",
            "prompt_piece_tokens",
            "max_queue_steps",
            "max_sessions",
            "max_tokens_per_request",
            "max_health_watches_per_peer",
            "max_new_tokens",
            "generate_buffer_tokens",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                problems.append(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "max_queue_delay_ms",
            "stream_end_linger_s",
            "stream_idle_timeout_s",
            "grace_period_s",
            "reload_interval_s",
            "heap_trim_interval_s",
            "snapshot_interval_s",
            "state_save_every_s",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.redis_timeout_s) or self.redis_timeout_s <= 0:
            problems.append(f"--redis-timeout-s must be a finite number > 0, got {self.redis_timeout_s}")
        if not math.isfinite(self.session_idle_timeout_s) or self.session_idle_timeout_s <= 0:
            problems.append(f"--session-idle-timeout-s must be > 0, got {self.session_idle_timeout_s}")
        non_negative_ints = (
            "gone_session_memory",
            "max_sessions_per_token",
            "state_save_every_steps",
            "max_message_bytes",
            "frontends",
        )
        for name in non_negative_ints:
            if getattr(self, name) < 0:
                problems.append(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("port", "metrics_port", "health_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{_flag(name)} must be in 0..65535, got {getattr(self, name)}")
        if self.health_port and self.health_port == self.port:
            problems.append(f"--health-port must differ from --port, both are {self.port}")
        if self.metrics_port and self.metrics_port in (self.port, self.health_port):
            problems.append(f"--metrics-port {self.metrics_port} is already the gRPC or health port")
        if self.http_port and self.http_port in (self.port, self.health_port, self.metrics_port):
            problems.append(f"--http-port {self.http_port} is already the gRPC, health or metrics port")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
            problems.append(
                f"--redis-url must start with one of {', '.join(REDIS_SCHEMES)} "
                f"(e.g. redis://127.0.0.1:6379/0), got one starting {self.redis_url.split(':')[0]!r}"
            )
        if not self.redis_namespace or any(c.isspace() for c in self.redis_namespace):
            problems.append(f"--redis-namespace must be non-empty, without spaces: {self.redis_namespace!r}")
        if self.snapshot_interval_s > 0 and self.state_snapshot is None:
            problems.append("--snapshot-interval-s needs --state-snapshot (the file to save to)")
        for spec in fields(self):
            choices = spec.metadata.get("choices")
            if choices and getattr(self, spec.name) not in choices:
                value = getattr(self, spec.name)
                problems.append(f"{_flag(spec.name)} must be one of {list(choices)}, got {value!r}")
        for name, version in self.pin:
            if not name or version < 1:
                problems.append(f"--pin needs NAME=VERSION with a positive version, got {name}={version}")
        if problems:
            raise SettingsError("; ".join(problems))

    @property
    def receive_message_bytes(self) -> int:
        """The gRPC receive limit: --max-message-bytes, or when 0 the largest legal request.

        The largest legal request is a GenerateRequest whose prompt_tokens and stop_tokens both
        hold --max-tokens-per-request token ids, each of at most TOKEN_ID_VARINT_BYTES bytes:

            2 * max_tokens_per_request * TOKEN_ID_VARINT_BYTES + FIXED_REQUEST_BYTES

        (a prompt_text is refused beyond max_tokens_per_request characters, at most 4 UTF-8
        bytes each, so it is never larger than prompt_tokens; FIXED_REQUEST_BYTES covers every
        other field). Anything larger is refused by gRPC before it is decoded: under the old
        fixed 4 MiB limit a refused Step decoded 4 million token ids (about 32 MiB) first.
        Default limits: 2 * 32,768 * 5 + 4,096 = 331,776 bytes.
        """
        if self.max_message_bytes:
            return self.max_message_bytes
        return 2 * self.max_tokens_per_request * TOKEN_ID_VARINT_BYTES + FIXED_REQUEST_BYTES

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def pinned_versions(self) -> dict[str, int]:
        return dict(self.pin)

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def health_address(self) -> str:
        return join_host_port(self.host, self.health_port)

    @property
    def http_bind_host(self) -> str:
        """Where the HTTP front end listens: --http-host, else --host."""
        return self.http_host or self.host

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics listens: --metrics-host; else --host when TLS or tokens protect the
        endpoint, and loopback when nothing does (an unprotected /metrics stays on the machine)."""
        if self.metrics_host:
            return self.metrics_host
        return self.host if self.tls or self.auth else "127.0.0.1"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def auth(self) -> bool:
        """Whether bearer tokens are configured (a file or the variable)."""
        return self.auth_tokens_file is not None or bool(self.auth_tokens.strip())


def join_host_port(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable of a settings field: `max_batch_size` -> RNNSERVE_MAX_BATCH_SIZE."""
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_pin(text: str) -> tuple[str, int]:
    name, sep, version = text.partition("=")
    if not sep or not name.strip() or not version.strip().isdigit():
        raise ValueError(f"expected NAME=VERSION, got {text!r}")
    return name.strip(), int(version)


def _parse_pins(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(_parse_pin(part) for part in text.split(",") if part.strip())


def _optional_path(text: str) -> Path | None:
    """An optional file: the empty string (e.g. RNNSERVE_STATE_SNAPSHOT=) means unset."""
    return Path(text) if text.strip() else None


def _converter(kind: Any) -> Any:
    """How a flag or variable's text becomes the field's type."""
    if kind is bool:
        return _parse_bool
    if kind is Path:
        return Path
    if kind == Path | None:
        return _optional_path
    return kind


def _is_secret(spec: Field[Any]) -> bool:
    return bool(spec.metadata.get("secret"))


def _default_text(spec: Field[Any]) -> str:
    """A field's default as an operator would write it."""
    if spec.default is MISSING or spec.default is None:
        return "unset"
    if spec.default in ("", ()):
        return "empty"
    if isinstance(spec.default, bool):
        return "true" if spec.default else "false"
    return str(spec.default)


def config_table() -> str:
    """Every setting as a Markdown table: flag, environment variable, default, meaning.

    Generated from ServerSettings, so the README's table stays true (`rnnserve serve
    --print-config-table`).
    """
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for spec in fields(ServerSettings):
        flag = "(none: secret)" if _is_secret(spec) else f"`{_flag(spec.name)}`"
        meaning = spec.metadata["help"]
        choices = spec.metadata.get("choices")
        if choices:
            meaning += f"; one of {', '.join(choices)}"
        rows.append(f"| {flag} | `{env_name(spec.name)}` | {_default_text(spec)} | {meaning} |")
    return "\n".join(rows) + "\n"


class _PrintConfigTable(argparse.Action):
    """--print-config-table: print the settings table and exit, like --help."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(config_table(), end="")
        parser.exit()


def _flag_type(convert: Any) -> Any:
    """A converter for argparse that keeps our message (argparse hides a ValueError's text)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per settings field; defaults shown are the built-in ones."""
    hints = typing.get_type_hints(ServerSettings)
    parser.add_argument(
        "--print-config-table",
        action=_PrintConfigTable,
        help="print every setting (flag, variable, default, meaning) as a Markdown table and exit",
    )
    for spec in fields(ServerSettings):
        if _is_secret(spec):
            continue
        kind = hints[spec.name]
        help_text = f"{spec.metadata['help']} (env {env_name(spec.name)})"
        if spec.name == "pin":
            parser.add_argument(
                _flag(spec.name),
                action="append",
                type=_flag_type(_parse_pin),
                default=None,
                metavar="NAME=VERSION",
                help=help_text,
            )
        elif kind is bool:
            parser.add_argument(
                _flag(spec.name),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {_default_text(spec)})",
            )
        else:
            parser.add_argument(
                _flag(spec.name),
                type=_converter(kind),
                default=None,
                choices=spec.metadata.get("choices"),
                help=f"{help_text} (default: {_default_text(spec)})",
            )


def secret_settings_help() -> str:
    """The settings given by environment variable only, for --help's epilog."""
    lines = [
        f"{env_name(spec.name)}: {spec.metadata['help']}"
        for spec in fields(ServerSettings)
        if _is_secret(spec)
    ]
    return "environment only: " + "; ".join(lines)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Combine parsed flags (None = not given) with RNNSERVE_* variables and the defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ServerSettings)
    values: dict[str, Any] = {}
    for spec in fields(ServerSettings):
        given = getattr(args, spec.name, None)
        if given is not None:
            values[spec.name] = tuple(given) if spec.name == "pin" else given
            continue
        text = environ.get(env_name(spec.name))
        if text is None:
            continue
        convert = _parse_pins if spec.name == "pin" else _converter(hints[spec.name])
        try:
            values[spec.name] = convert(text)
        except ValueError as error:
            raise SettingsError(f"{env_name(spec.name)}={text!r} is not valid: {error}") from None
    return ServerSettings(**values)


def parse_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "rnnserve serve"
) -> ServerSettings:
    """Parse `rnnserve serve` flags; argparse exits with usage on a malformed flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model repository over gRPC.",
        epilog=secret_settings_help(),
        # No abbreviations: `--auth-tokens SECRET` must fail, not become --auth-tokens-file SECRET.
        allow_abbrev=False,
    )
    add_arguments(parser)
    try:
        return settings_from(parser.parse_args(list(argv)), environ)
    except SettingsError as error:
        parser.error(str(error))
        raise  # parser.error exits; this line only satisfies type checkers
