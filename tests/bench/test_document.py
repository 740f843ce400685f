"""bench.document: the report replaces exactly the marked section of a page."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import parse_config
from bench.document import BEGIN, END, DocumentError, replace_section, update_document

PAGE = f"# Benchmarks\n\nintro\n\n{BEGIN}\n\nold figures\n\n{END}\n\nwhat bounds them\n"


def test_the_section_between_the_markers_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    update_document(page, "| new | figures |\n")
    text = page.read_text()
    assert "old figures" not in text
    assert text == f"# Benchmarks\n\nintro\n\n{BEGIN}\n\n| new | figures |\n\n{END}\n\nwhat bounds them\n"
    update_document(page, "| newer |")
    assert page.read_text().count(BEGIN) == 1
    assert "| new | figures |" not in page.read_text()
    assert "| newer |" in page.read_text()


@pytest.mark.parametrize(
    "page",
    ["no markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{BEGIN}\n{END}\n", f"{BEGIN}\nonly the start\n"],
)
def test_a_page_without_one_ordered_pair_of_markers_is_refused(page: str) -> None:
    with pytest.raises(DocumentError, match="expected one"):
        replace_section(page, "report")


def test_the_command_line_checks_the_page_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "page.md"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit):
        parse_config(["--document", str(page)])
    assert "--document" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--document", str(tmp_path / "missing.md")])


def test_the_repository_page_has_its_markers() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
    replace_section(page.read_text(), "report")
