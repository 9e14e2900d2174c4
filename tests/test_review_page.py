"""The review page in a real headless Chromium, beyond the walk-through of
test_review_browser.py: Enter on a focused button is the button's; the grid shows reference
thumbnails, the viewer the full-size files; the API is called with the token of the page's own
URL and no cookie; a decision a run keeps waiting is refused on the page, which stays usable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from runner.emulator import Emulator
from runner.review import ReviewServer
from runner.store import schema
from runner.store.schema import DB_NAME
from tests.chromium import Browser, Page
from tests.reviewing import item_of, made_run, shots

LOADED = "document.body.dataset.loaded"


def card(job_id: str) -> str:
    return f'#grid .card[data-job="{job_id}"]'


async def srcs(page: Page, selector: str) -> list[str]:
    """The paths (no query) of the images matching ``selector``, once all have loaded."""
    found = json.dumps(selector)
    await page.wait_for(
        f"[...document.querySelectorAll({found})].every(i => i.complete && i.naturalWidth)"
    )
    paths = await page.evaluate(
        f"[...document.querySelectorAll({found})].map(i => new URL(i.src).pathname)"
    )
    assert isinstance(paths, list)
    return paths


async def test_the_page_in_chromium(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "REVIEW_BUSY_TIMEOUT_MS", 100)  # not 5 s in a test
    out = await made_run(tmp_path, emulator.base_url, shots(6))
    async with ReviewServer(out, reviewer="ada") as server, Browser(tmp_path) as browser:
        page = await browser.open(server.url)
        await page.wait_for(LOADED)

        # The grid: the references' thumbnails; the viewer (Enter on the shot): full size.
        assert await srcs(page, f"{card('shot-00')} img") == [
            "/refthumb/shot-00/0", "/refthumb/shot-00/1", "/thumb/shot-00",
        ]  # fmt: skip
        await page.key("Enter")
        assert await srcs(page, "#viewer img") == [
            "/ref/shot-00/0",
            "/ref/shot-00/1",
            "/image/shot-00",
        ]
        await page.key("Escape")
        assert await page.evaluate("document.cookie") == ""

        # Enter on a focused button presses that button, and opens no viewer.
        await page.evaluate(
            f"document.querySelector({json.dumps(card('shot-02'))} + ' button.approve').focus()"
        )
        await page.key("Enter")
        await page.wait_for(
            f"document.querySelector({json.dumps(card('shot-02'))})?.dataset.review === 'approved'"
        )
        assert await page.evaluate("document.getElementById('viewer').hidden") is True
        assert item_of(out, "shot-02").review == "approved"

        # A run holding the checkpoint: the decision is refused, said so, and taken again.
        await page.click(f"{card('shot-03')} .meta")
        db = sqlite3.connect(out / DB_NAME, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            await page.key("r")
            await page.wait_for(
                "document.getElementById('message').textContent.includes("
                "'a run is writing the checkpoint; try again in a moment')"
            )
            assert await page.evaluate("document.getElementById('message').className") == "bad"
            db.execute("COMMIT")
        finally:
            db.close()
        assert item_of(out, "shot-03").review == "unreviewed"
        await page.key("r")
        await page.wait_for(
            f"document.querySelector({json.dumps(card('shot-03'))})?.dataset.review === 'rejected'"
        )
        assert not [line for line in page.console if line.startswith("uncaught")]
