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
import json
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib

from serving.settings import ServerSettings, env_name, settings_from

REPO_ROOT = Path(__file__).resolve().parents[2]
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


# --- the Dockerfile as data ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ENV, ...
    value: str  # the arguments, continuation lines joined with single spaces

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD, ENTRYPOINT or HEALTHCHECK CMD."""
        text = self.value.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.value
        form = json.loads(text)
        assert isinstance(form, list) and all(isinstance(item, str) for item in form), self.value
        return form


@dataclass
class Stage:
    name: str
    base: str  # the FROM image or stage name, as written
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


@dataclass
class Dockerfile:
    """A Dockerfile's global ARGs and named stages (enough for the checks in tests/)."""

    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", path.read_text())  # continuations
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, value = line.partition(" ")
            keyword, value = keyword.upper(), " ".join(value.split())
            if keyword == "FROM":
                match = re.fullmatch(r"(\S+) AS (\S+)", value, flags=re.IGNORECASE)
                assert match, f"every stage is named: FROM {value}"
                stages.append(Stage(match.group(2), match.group(1)))
            elif not stages:
                assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
                name, _, default = value.partition("=")
                global_args[name] = default
            else:
                stages[-1].instructions.append(Instruction(keyword, value))
        return cls(global_args, stages)

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        (found,) = [stage for stage in self.stages if stage.name == name]
        return found

    def parent(self, stage: Stage) -> Stage | None:
        """The stage that STAGE is built FROM, or None when it starts from an image."""
        return self.stage(stage.base) if stage.base in self.stage_names else None

    def lineage(self, target: str) -> list[Stage]:
        """TARGET's stages from the one that starts from an image down to TARGET itself."""
        chain = [self.stage(target)]
        while (parent := self.parent(chain[0])) is not None:
            chain.insert(0, parent)
        return chain

    def resolved_base(self, stage: Stage) -> str:
        """The image a first stage starts from, its ${ARG} replaced by the global default."""
        return re.sub(r"\$\{(\w+)\}", lambda match: self.global_args[match.group(1)], stage.base)


def env_assignments(value: str) -> dict[str, str]:
    """The KEY=VALUE pairs of an ENV instruction (quotes removed; no variables expanded)."""
    pairs = {}
    for word in shlex.split(value):
        key, separator, item = word.partition("=")
        assert separator, f"ENV {value!r}: use the KEY=VALUE form"
        pairs[key] = item
    return pairs


def image_environment(target: str) -> dict[str, str]:
    """The ENV a Dockerfile target's containers start with (its lineage's ENV instructions)."""
    dockerfile = Dockerfile.read(DOCKERFILE)
    environment: dict[str, str] = {}
    for stage in dockerfile.lineage(target):
        for instruction in stage.all("ENV"):
            environment.update(env_assignments(instruction.value))
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
