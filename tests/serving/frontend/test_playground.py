"""The playground page in a real browser: Debian's headless chromium, driven by Playwright.

The page generates with a fixed seed; its text must equal what rnnserve.v1 Generate gives for the
same request. A screenshot of the page is saved beside the test's files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.frontend import FrontDoorServer, grpc_generate_text
from tests.support.servers import run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)"
)

PROMPT = "to be or not"
MAX_TOKENS = 60
SEED = 1234


@pytest.fixture(scope="module")
def doors(model_repository: Path) -> Iterator[FrontDoorServer]:
    running = FrontDoorServer(model_repository)
    yield running
    running.stop()


def test_playground_streams_the_same_text_as_grpc_generate(doors: FrontDoorServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expected = run(grpc_generate_text(doors.target, "tiny-gru", PROMPT, MAX_TOKENS, SEED))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(doors.http_url + "/")
            expect(page.locator("#status")).to_have_text("ready")
            page.select_option("#model", "tiny-gru")
            expect(page.locator("#metadata")).to_contain_text("GRU")
            page.fill("#prompt", PROMPT)
            page.fill("#max-tokens", str(MAX_TOKENS))
            page.fill("#seed", str(SEED))
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done (length)")
            assert page.locator("#output").text_content() == expected
            expect(page.locator("#top5 .bar")).to_have_count(5)

            # Session mode: the second prompt continues the first one's state.
            page.check("#session-mode")
            page.fill("#prompt", "a")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done")
            page.fill("#prompt", "b")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done")
            expect(page.locator("#session-state")).to_contain_text(f"{2 + 2 * MAX_TOKENS} characters")
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            page.click("#reset")
            expect(page.locator("#session-state")).to_contain_text("new")
        finally:
            browser.close()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
