"""The documentation's commands run as printed: every `rnnserve SUB --flag` shown in README.md and
docs/*.md names a subcommand that exists and flags that its `--help` lists, and every relative
link points at a file that exists."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from serving import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
# `rnnserve ...` or `.venv/bin/rnnserve ...` where a command starts, after any VARIABLE=value.
COMMAND = re.compile(r"(?:^|[;&|(])\s*(?:[A-Z_]+=\S*\s+)*(?:\S*/)?rnnserve\s+([a-z]+)(.*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(document, subcommand, flags) for each rnnserve command in a fenced code block."""
    found = []
    for document in DOCUMENTS:
        for block in FENCE.findall(document.read_text()):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                code = line.split(" #", 1)[0]
                match = COMMAND.search(code)
                if match is None:
                    continue
                try:
                    words = shlex.split(match.group(2))
                except ValueError:
                    words = match.group(2).split()
                flags = sorted({w.split("=", 1)[0] for w in words if w.startswith("--")})
                found.append((document.relative_to(REPO_ROOT).as_posix(), match.group(1), flags))
    return found


@cache
def help_text(subcommand: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        cli.main([subcommand, "--help"])
    return buffer.getvalue()


COMMANDS = documented_commands()


def test_the_documents_show_commands() -> None:
    subcommands = {subcommand for _, subcommand, _ in COMMANDS}
    assert {"serve", "generate", "health", "export", "train", "bench"} <= subcommands, subcommands


@pytest.mark.parametrize(("document", "subcommand", "flags"), COMMANDS)
def test_a_documented_command_uses_flags_its_help_lists(
    document: str, subcommand: str, flags: list[str]
) -> None:
    assert subcommand in cli.SUBCOMMANDS, f"{document}: `rnnserve {subcommand}` is not a subcommand"
    listed = help_text(subcommand)
    assert listed, f"`rnnserve {subcommand} --help` printed nothing"
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", listed)]
    assert not missing, f"{document}: `rnnserve {subcommand}` shows {missing}, which its --help does not list"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_point_at_files_that_exist(document: Path) -> None:
    targets = [target for target in LINK.findall(document.read_text()) if "://" not in target]
    broken = [target for target in targets if not (document.parent / target).exists()]
    assert not broken, f"{document.name} links to missing files: {broken}"


def test_the_serving_page_shows_the_generated_settings_table() -> None:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        cli.main(["serve", "--print-config-table"])
    table = buffer.getvalue().strip()
    assert table.startswith("| flag |")
    assert table in (REPO_ROOT / "docs" / "serving.md").read_text(), (
        "docs/serving.md's settings table is not `rnnserve serve --print-config-table`'s: paste it again"
    )
