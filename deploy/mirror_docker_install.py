"""Run a Dockerfile target's `pip install` lines in a fresh venv, without a Docker engine.

CI machines have a Docker client but no engine, so `docker build` cannot run there. This module
reads the Dockerfile itself (nothing is copied out of it by hand), follows the target's stages,
lays out the files its COPY lines take from the build context (after .dockerignore, as Docker
would send them), and runs each `pip install` in a new virtual environment, in the same order
and working directory as the build. A broken install line, a constraint that cannot be met or a
file that .dockerignore keeps out of the context fails here as it would in `docker build`.

What it does not reproduce, by design: non-pip RUN commands (user creation, `python -m venv`),
the base image's system libraries, and file ownership. To keep the mirror exact, the Dockerfile
keeps every install in a RUN made only of `pip install` commands joined by `&&`; a RUN that
mixes them with other commands is refused with an error.

    python deploy/mirror_docker_install.py --target serve --venv /tmp/serve-venv
    python deploy/mirror_docker_install.py --target train --venv /tmp/train-venv \
        --build-arg TORCH_INDEX_URL=https://pypi.org/simple
    python deploy/mirror_docker_install.py --target serve --list    # show the commands only

Only the standard library is used, so the script runs from any Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parent.parent


class MirrorError(Exception):
    """The Dockerfile, .dockerignore or an install command cannot be mirrored or failed."""


# ---------------------------------------------------------------------------------------------
# .dockerignore: the rules of Docker's pattern matcher (moby/patternmatcher).


@dataclass(frozen=True)
class _IgnorePattern:
    text: str  # cleaned pattern, without a leading "!" or "/"
    negated: bool  # "!pattern" re-includes what earlier patterns excluded
    regex: re.Pattern[str]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate one .dockerignore pattern: `**` spans directories, `*` and `?` stay within one."""
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", index + 1)
            if end == -1:
                raise MirrorError(f".dockerignore pattern {pattern!r} has an unclosed '['")
            body = pattern[index + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    """The patterns of a .dockerignore file; `excludes(path)` answers as `docker build` would."""

    patterns: tuple[_IgnorePattern, ...]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        patterns = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            cleaned = os.path.normpath(line[1:].strip() if negated else line).lstrip("/")
            if cleaned in ("", "."):
                continue
            patterns.append(_IgnorePattern(cleaned, negated, _pattern_regex(cleaned)))
        return cls(tuple(patterns))

    @classmethod
    def read(cls, context: Path) -> DockerIgnore:
        path = context / ".dockerignore"
        return cls.parse(path.read_text()) if path.is_file() else cls(())

    def excludes(self, relative_path: str) -> bool:
        """True when the context path (POSIX, relative to the context root) is left out."""
        parents = PurePosixPath(relative_path).parts[:-1]
        parent_paths = ["/".join(parents[: count + 1]) for count in range(len(parents))]
        excluded = False
        for pattern in self.patterns:
            matched = bool(pattern.regex.match(relative_path)) or any(
                pattern.regex.match(parent) for parent in parent_paths
            )
            if matched:
                excluded = not pattern.negated
        return excluded

    def could_include_below(self, directory: str) -> bool:
        """Whether a path below an excluded DIRECTORY could still be sent, so the walk must enter it.

        Outside `**`, `*` never crosses a "/", so a negated pattern can re-include something below
        the directory only if it has more components than the directory and its leading
        components match the directory's.
        """
        parts = PurePosixPath(directory).parts
        for pattern in self.patterns:
            if not pattern.negated:
                continue
            if "**" in pattern.text:
                return True
            pattern_parts = PurePosixPath(pattern.text).parts
            if len(pattern_parts) > len(parts) and all(
                _pattern_regex(pattern_part).match(part)
                for pattern_part, part in zip(pattern_parts, parts, strict=False)
            ):
                return True
        return False

    def context_files(self, context: Path) -> list[str]:
        """Every file Docker would send as the build context, as sorted POSIX relative paths."""
        files = []
        for root, dirs, names in os.walk(context):
            rel_root = Path(root).relative_to(context).as_posix()
            rel_root = "" if rel_root == "." else rel_root + "/"
            dirs[:] = [
                name
                for name in dirs
                if not self.excludes(rel_root + name) or self.could_include_below(rel_root + name)
            ]
            files += [rel_root + name for name in names if not self.excludes(rel_root + name)]
        return sorted(files)


# ---------------------------------------------------------------------------------------------
# Dockerfile: instructions, stages, ARG/ENV scoping and variable expansion.


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where the instruction starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (CMD ["a", "b"]), or None for shell form."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [str(item) for item in parsed] if isinstance(parsed, list) else None


@dataclass(frozen=True)
class Stage:
    index: int
    name: str  # the AS name, or the index as text for unnamed stages
    base: str  # the FROM image or parent stage, variables unexpanded
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    global_args: dict[str, str | None]  # ARGs before the first FROM: name -> default
    stages: tuple[Stage, ...]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        return cls.parse(path.read_text(), path)

    @classmethod
    def parse(cls, text: str, path: Path = Path("Dockerfile")) -> Dockerfile:
        global_args: dict[str, str | None] = {}
        stages: list[Stage] = []
        current: list[Instruction] = []
        header: tuple[str, str] | None = None

        def close() -> None:
            if header is not None:
                stages.append(Stage(len(stages), header[0], header[1], tuple(current)))

        for instruction in _logical_lines(text):
            if instruction.keyword == "FROM":
                close()
                words = [word for word in instruction.value.split() if not word.startswith("--")]
                if len(words) == 3 and words[1].lower() == "as":
                    header = (words[2], words[0])
                elif len(words) == 1:
                    header = (str(len(stages)), words[0])
                else:
                    raise MirrorError(f"{path}:{instruction.line}: cannot read FROM {instruction.value!r}")
                current = []
            elif header is None:
                if instruction.keyword != "ARG":
                    raise MirrorError(f"{path}:{instruction.line}: only ARG may come before the first FROM")
                global_args.update(_arg_declarations(instruction.value))
            else:
                current.append(instruction)
        close()
        if not stages:
            raise MirrorError(f"{path} has no FROM instruction")
        return cls(path, global_args, tuple(stages))

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise MirrorError(f"{self.path} has no stage {name!r}; stages: {', '.join(self.stage_names)}")

    def parent(self, stage: Stage) -> Stage | None:
        """The earlier stage this one is built FROM, or None when it starts from an image."""
        earlier = {item.name: item for item in self.stages[: stage.index]}
        return earlier.get(stage.base)

    def lineage(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, root first."""
        chain = [self.stage(name)]
        while (parent := self.parent(chain[-1])) is not None:
            chain.append(parent)
        return chain[::-1]

    def build_order(self, target: str) -> list[Stage]:
        """Every stage the target needs (FROM parents and COPY --from sources), dependencies first."""
        order: list[Stage] = []

        def visit(stage: Stage) -> None:
            if stage in order:
                return
            parent = self.parent(stage)
            if parent is not None:
                visit(parent)
            for copy in stage.all("COPY"):
                source = _copy_flags(copy.value)[0].get("from")
                if source is not None and source in self.stage_names:
                    visit(self.stage(source))
            order.append(stage)

        visit(self.stage(target))
        return order

    def resolved_base(self, stage: Stage, build_args: Mapping[str, str] | None = None) -> str:
        """The image a root stage starts FROM, with global ARGs (and overrides) expanded."""
        values = {name: value for name, value in self.global_args.items() if value is not None}
        values.update(build_args or {})
        return expand(stage.base, values, where=f"FROM of stage {stage.name!r}")


def _logical_lines(text: str) -> Iterator[Instruction]:
    """Instructions with `\\` continuations joined and comment lines dropped, as BuildKit reads them."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:  # both are skipped inside continuations too
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, value = joined.partition(" ")
        if "<<" in value and keyword.upper() in ("RUN", "COPY"):
            raise MirrorError(f"line {start}: heredocs are not supported by the mirror")
        yield Instruction(keyword.upper(), value.strip(), start)
    if pending:
        raise MirrorError("the Dockerfile ends inside a line continuation")


def _arg_declarations(value: str) -> dict[str, str | None]:
    declared: dict[str, str | None] = {}
    for word in shlex.split(value):
        name, has_default, default = word.partition("=")
        declared[name] = default if has_default else None
    return declared


def env_assignments(value: str) -> dict[str, str]:
    """ENV KEY=VALUE pairs (or the legacy `ENV KEY VALUE`), quotes removed, unexpanded."""
    words = shlex.split(value, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def _copy_flags(value: str) -> tuple[dict[str, str], list[str]]:
    """Split a COPY/ADD value into its --flags and its sources + destination."""
    words = shlex.split(value)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        name, _, flag_value = words.pop(0)[2:].partition("=")
        flags[name] = flag_value
    return flags, words


_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(text: str, values: Mapping[str, str], where: str) -> str:
    """Expand $NAME, ${NAME} and ${NAME:-default} as the build's shell would; unknown names fail."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        if name in values and values[name] != "":
            return values[name]
        if match.group("default") is not None:
            return match.group("default")
        if name in values:
            return ""
        raise MirrorError(f"{where}: ${name} is neither an ARG nor an ENV of the stage")

    return _VARIABLE.sub(replace, text)


# ---------------------------------------------------------------------------------------------
# The install plan of a target, and running it.


@dataclass(frozen=True)
class ContextCopy:
    stage: str
    sources: tuple[str, ...]  # context-relative paths
    destination: str  # absolute path inside the image


@dataclass(frozen=True)
class PipInstall:
    stage: str
    line: int  # Dockerfile line of the RUN
    workdir: str  # absolute WORKDIR inside the image
    arguments: tuple[str, ...]  # everything after `pip install`, variables expanded
    environment: dict[str, str] = field(default_factory=dict)  # the stage's PIP_* ENV values

    def command(self) -> str:
        return "pip install " + shlex.join(self.arguments)


@dataclass(frozen=True)
class InstallPlan:
    target: str
    stages: tuple[str, ...]  # build order, dependencies first
    copies: tuple[ContextCopy, ...]
    installs: tuple[PipInstall, ...]


_PIP_INSTALL = re.compile(r"^(?:(?:python3?|/opt/venv/bin/python3?)\s+-m\s+)?pip3?\s+install\s")


def install_plan(
    dockerfile: Dockerfile, target: str, build_args: Mapping[str, str] | None = None
) -> InstallPlan:
    """Every context COPY and `pip install` that building TARGET runs, in build order.

    build_args play the part of `docker build --build-arg`: they override ARG defaults.
    """
    overrides = dict(build_args or {})
    declared = set(dockerfile.global_args)
    for stage in dockerfile.stages:
        for instruction in stage.all("ARG"):
            declared.update(_arg_declarations(instruction.value))
    unknown = sorted(set(overrides) - declared)
    if unknown:
        raise MirrorError(
            f"build arguments {', '.join(unknown)} are not ARGs of {dockerfile.path.name}; "
            f"its ARGs are {', '.join(sorted(declared))}"
        )
    copies: list[ContextCopy] = []
    installs: list[PipInstall] = []
    stage_env: dict[str, dict[str, str]] = {}
    stage_workdir: dict[str, str] = {}
    order = dockerfile.build_order(target)
    for stage in order:
        parent = dockerfile.parent(stage)
        # ENV and WORKDIR carry over from a parent stage; ARGs never do.
        env = dict(stage_env[parent.name]) if parent else {}
        workdir = stage_workdir[parent.name] if parent else "/"
        args: dict[str, str] = {}
        for instruction in stage.instructions:
            where = f"{dockerfile.path.name}:{instruction.line}"
            values = {**env, **args}
            if instruction.keyword == "ARG":
                for name, default in _arg_declarations(instruction.value).items():
                    value = overrides.get(
                        name, default if default is not None else dockerfile.global_args.get(name)
                    )
                    if value is not None:
                        args[name] = expand(value, values, where)
            elif instruction.keyword == "ENV":
                for name, value in env_assignments(instruction.value).items():
                    # Only PIP_* values reach the mirror; others (PATH=/opt/venv/bin:$PATH) stay as written.
                    env[name] = expand(value, values, where) if name.startswith("PIP_") else value
            elif instruction.keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / expand(instruction.value, values, where))
            elif instruction.keyword in ("COPY", "ADD"):
                flags, words = _copy_flags(instruction.value)
                if "from" in flags:
                    continue  # between stages: the mirror's one venv stands in for /opt/venv
                if instruction.keyword == "ADD" or len(words) < 2:
                    raise MirrorError(f"{where}: only `COPY SRC... DEST` from the context can be mirrored")
                *sources, destination = (expand(word, values, where) for word in words)
                absolute = str(PurePosixPath(workdir) / destination)
                # A trailing "/" (or ".") makes the destination a directory even for one source.
                if destination.endswith("/") or destination in (".", ".."):
                    absolute = absolute.rstrip("/") + "/"
                copies.append(ContextCopy(stage.name, tuple(sources), absolute))
            elif instruction.keyword == "RUN":
                segments = [segment.strip() for segment in instruction.value.split("&&")]
                is_pip = [bool(_PIP_INSTALL.match(segment + " ")) for segment in segments]
                if any(is_pip) and not all(is_pip):
                    raise MirrorError(
                        f"{where}: a RUN mixes `pip install` with other commands; keep installs in a RUN "
                        "of their own so that CI can mirror them"
                    )
                for segment in segments if all(is_pip) else []:
                    words = shlex.split(expand(segment, values, where))
                    arguments = words[words.index("install") + 1 :]
                    pip_env = {name: value for name, value in env.items() if name.startswith("PIP_")}
                    installs.append(
                        PipInstall(stage.name, instruction.line, workdir, tuple(arguments), pip_env)
                    )
        stage_env[stage.name] = env
        stage_workdir[stage.name] = workdir
    return InstallPlan(target, tuple(stage.name for stage in order), tuple(copies), tuple(installs))


def _image_path(root: Path, absolute: str) -> Path:
    return root / PurePosixPath(absolute).relative_to("/")


def stage_context(plan: InstallPlan, context: Path, rootfs: Path) -> None:
    """Lay out under ROOTFS the files the plan's COPY lines take from the build context.

    A source that .dockerignore leaves out of the context is missing, as in `docker build`.
    """
    ignore = DockerIgnore.read(context)
    sent = set(ignore.context_files(context))
    for copy in plan.copies:
        if any(char in source for source in copy.sources for char in "*?["):
            raise MirrorError(f"stage {copy.stage!r}: wildcard COPY sources are not supported by the mirror")
        into_directory = copy.destination.endswith("/") or len(copy.sources) > 1
        for source in copy.sources:
            relative = os.path.normpath(source).lstrip("/")
            if relative in sent:
                target = _image_path(rootfs, copy.destination)
                if into_directory:
                    target = target / PurePosixPath(relative).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / relative, target)
                continue
            below = [
                path for path in sent if relative in (".", "") or path.startswith(relative.rstrip("/") + "/")
            ]
            if not below:
                raise MirrorError(
                    f"stage {copy.stage!r}: COPY {source} finds nothing in the build context "
                    "(missing, or left out by .dockerignore)"
                )
            prefix = "" if relative in (".", "") else relative.rstrip("/") + "/"
            for path in below:
                target = _image_path(rootfs, copy.destination) / path[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / path, target)


@dataclass(frozen=True)
class MirrorResult:
    venv: Path
    python: Path
    commands: tuple[str, ...]
    seconds: float


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def mirror(
    target: str,
    venv: Path,
    *,
    context: Path = REPO_ROOT,
    dockerfile: str = "Dockerfile",
    build_args: Mapping[str, str] | None = None,
    python: str = sys.executable,
    log: bool = False,
) -> MirrorResult:
    """Create VENV from PYTHON's base interpreter and run TARGET's pip installs in it.

    Raises MirrorError naming the failing Dockerfile line and showing pip's output.
    """
    started = time.monotonic()
    plan = install_plan(Dockerfile.read(context / dockerfile), target, build_args)
    if not plan.installs:
        raise MirrorError(f"target {target!r} installs nothing with pip")
    if venv.exists():
        raise MirrorError(f"{venv} exists; the mirror needs a fresh virtual environment")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    with tempfile.TemporaryDirectory(prefix="rnnserve-mirror-") as scratch:
        rootfs = Path(scratch)
        stage_context(plan, context, rootfs)
        commands = []
        for install in plan.installs:
            workdir = _image_path(rootfs, install.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            argv = [str(venv_python(venv)), "-m", "pip", "install", *install.arguments]
            if log:
                print(
                    f"[mirror] {install.stage} (Dockerfile line {install.line}): {install.command()}",
                    flush=True,
                )
            completed = subprocess.run(
                argv,
                cwd=workdir,
                env={**os.environ, **install.environment},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            if completed.returncode != 0:
                raise MirrorError(
                    f"stage {install.stage!r}, Dockerfile line {install.line}: `{install.command()}` "
                    f"exited {completed.returncode}:\n{completed.stdout[-4000:]}"
                )
            commands.append(install.command())
    return MirrorResult(venv, venv_python(venv), tuple(commands), time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/mirror_docker_install.py",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="Dockerfile stage to mirror, e.g. serve or train")
    parser.add_argument(
        "--venv", type=Path, help="new virtual environment to create (required unless --list)"
    )
    parser.add_argument("--context", type=Path, default=REPO_ROOT, help="build context (the repository root)")
    parser.add_argument("--file", default="Dockerfile", help="Dockerfile, relative to the context")
    parser.add_argument(
        "--build-arg", action="append", default=[], metavar="NAME=VALUE", help="override an ARG default"
    )
    parser.add_argument("--list", action="store_true", help="print the install commands and exit")
    args = parser.parse_args(argv)

    build_args = {}
    for item in args.build_arg:
        name, has_value, value = item.partition("=")
        if not has_value:
            parser.error(f"--build-arg {item!r}: expected NAME=VALUE")
        build_args[name] = value
    try:
        if args.list:
            plan = install_plan(Dockerfile.read(args.context / args.file), args.target, build_args)
            for install in plan.installs:
                print(f"{install.stage}\tline {install.line}\t(cd {install.workdir}) {install.command()}")
            return 0
        if args.venv is None:
            parser.error("--venv is required unless --list is given")
        result = mirror(
            args.target,
            args.venv,
            context=args.context,
            dockerfile=args.file,
            build_args=build_args,
            log=True,
        )
    except MirrorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = len(result.commands)
    print(f"[mirror] {args.target}: {count} install(s) into {result.venv} in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
