"""What the deploy tests share: the files under test, the server's settings, and small readers.

No Docker engine runs on CI machines, so the deploy tests read the Dockerfile, the compose file,
the nginx and Prometheus configs and the Kubernetes manifests as data and check them against
each other and against the server's own settings (serving.settings), which are the truth for
ports, timeouts and variable names.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib

from serving.settings import ServerSettings, env_name, settings_from

REPO_ROOT = Path(__file__).resolve().parent.parent
# The Compose Specification's JSON Schema, vendored (origin and licence in tests/data/README.md).
COMPOSE_SCHEMA = REPO_ROOT / "tests" / "data" / "compose-spec.json"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOTENV = REPO_ROOT / ".env"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"

SERVING_TARGETS = ("serve", "serve-gpu")
ALL_TARGETS = ("serve", "serve-gpu", "train")
IMAGE_UID = 10001  # the rnnserve user of every image (Dockerfile, stage runtime)

# Settings the deploy files may pass before serving.settings has them (a server feature still
# being written), each with its documented default. Once serving.settings has the field, its
# own default and validation apply, and the entry goes. None now: every setting exists.
PLANNED_SETTINGS: dict[str, Any] = {}


def load_deploy_module(name: str) -> ModuleType:
    """Import deploy/NAME.py (the deploy scripts are not part of the installed package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "deploy" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def project_version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def setting_names() -> set[str]:
    return {spec.name for spec in fields(ServerSettings)}


def server_settings(environment: Mapping[str, str]) -> ServerSettings:
    """The settings a server started with ENVIRONMENT (and no flags) runs with.

    Fails when a RNNSERVE_* variable names no setting (a typo the server would silently ignore)
    and when a value is invalid (the server would refuse to start).
    """
    known = setting_names()
    unknown = [
        name
        for name in environment
        if name.startswith("RNNSERVE_")
        and name.removeprefix("RNNSERVE_").lower() not in known
        and name.removeprefix("RNNSERVE_").lower() not in PLANNED_SETTINGS
    ]
    assert not unknown, f"{unknown} name no setting of `rnnserve serve` (see serving/settings.py)"
    ours = {name: value for name, value in environment.items() if name.startswith("RNNSERVE_")}
    return settings_from(argparse.Namespace(), ours)


def setting(settings: ServerSettings, environment: Mapping[str, str], name: str) -> Any:
    """A setting's value, including the planned ones serving.settings does not have yet."""
    if name in setting_names():
        return getattr(settings, name)
    default = PLANNED_SETTINGS[name]
    text = environment.get(env_name(name))
    if text is None:
        return default
    return type(default)(text) if default is not None else text


def default_setting(name: str) -> Any:
    for spec in fields(ServerSettings):
        if spec.name == name:
            return spec.default
    return PLANNED_SETTINGS[name]


def cli_flags(module: str) -> set[str]:
    """The --flags a command-line module's main(argv) accepts, read from its --help."""
    main = importlib.import_module(module).main
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
        main(["--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", output.getvalue()))
    assert flags, f"{module} --help printed no flags"
    return flags


def assert_flags_exist(argv: list[str], module: str) -> None:
    """Every --flag in ARGV is one that MODULE's command line accepts."""
    used = {argument.split("=")[0] for argument in argv if argument.startswith("--")}
    unknown = used - cli_flags(module)
    assert not unknown, f"{module} has no flags {sorted(unknown)} (used in {argv})"


def image_environment(target: str) -> dict[str, str]:
    """The ENV a Dockerfile target's containers start with (its lineage's ENV instructions)."""
    mirror = load_deploy_module("mirror_docker_install")
    dockerfile = mirror.Dockerfile.read(DOCKERFILE)
    environment: dict[str, str] = {}
    for stage in dockerfile.lineage(target):
        for instruction in stage.all("ENV"):
            environment.update(mirror.env_assignments(instruction.value))
    return environment


# --- nginx.conf as data ----------------------------------------------------------------------


def nginx_directives(text: str) -> list[tuple[tuple[str, ...], str, list[str]]]:
    """Every directive as (enclosing blocks, name, arguments); comments and quotes handled."""
    tokens = re.findall(r"'[^']*'|\"[^\"]*\"|[{};]|[^\s{};'\"#]+|#[^\n]*", text)
    directives: list[tuple[tuple[str, ...], str, list[str]]] = []
    blocks: list[str] = []
    words: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token == "{":
            blocks.append(" ".join(words))
            words = []
        elif token == "}":
            blocks.pop()
        elif token == ";":
            directives.append((tuple(blocks), words[0], words[1:]))
            words = []
        else:
            words.append(token.strip("'\""))
    assert not blocks and not words, "nginx.conf has an unclosed block or a directive without ';'"
    return directives


def nginx_values(text: str, name: str) -> list[list[str]]:
    return [arguments for _, directive, arguments in nginx_directives(text) if directive == name]


def nginx_seconds(value: str) -> float:
    """An nginx time value (660s, 11m, 1h, 500ms or plain seconds) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, f"not an nginx time: {value!r}"
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * scale


def upstream_servers(text: str) -> list[tuple[str, int, list[str]]]:
    """The (host, port, parameters) of each `server` inside an upstream block."""
    servers = []
    for blocks, name, arguments in nginx_directives(text):
        if name == "server" and blocks and blocks[-1].startswith("upstream "):
            host, _, port = arguments[0].rpartition(":")
            servers.append((host, int(port), arguments[1:]))
    return servers
