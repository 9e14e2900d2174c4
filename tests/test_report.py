"""The HTML report: summary, failures and contact sheet from a real run on the emulator, the
thumbnail cache, and the page as a real headless Chromium renders it (script run, screenshot).
Paging, edits' references and big folders: ``test_report_pages.py``."""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runner.emulator import Emulator, EmulatorConfig
from runner.errors import StoreError
from runner.images.files import is_temp_name
from runner.outputs import thumbs
from runner.outputs.report import write_report
from runner.outputs.report_page import CardRow
from runner.store.sqlite import SqliteStore
from tests.chromium import Browser
from tests.conftest import db_exec, db_rows, run_manifest, write_manifest

LONG_PROMPT = "<script>alert('owned')</script> a cat & a \"dog\", " + "very detailed, " * 12
JOBS = [
    {"id": "fox-red", "prompt": "a red fox in the snow", "size": "1280x720"},
    {"id": "fox-url", "prompt": "a blue fox", "size": "848x1280", "response_format": "url"},
    {"id": "xss", "prompt": LONG_PROMPT, "size": "1280x1280"},
    {"id": "banned", "prompt": "a forbidden thing [[faults:policy]]", "size": "1280x544"},
    {"id": "maybe", "prompt": "lost on the way back [[faults:reset]]", "size": "1280x544"},
    # A 401 stops the run (concurrency 1 keeps the order): it and the job after stay pending.
    {"id": "stopper", "prompt": "a refused key [[faults:401]]", "size": "1280x544"},
    {"id": "never", "prompt": "never sent", "size": "1280x544"},
]
STATUS = {
    "fox-red": "succeeded",
    "fox-url": "succeeded",
    "xss": "succeeded",
    "banned": "failed",
    "maybe": "failed",
    "stopper": "pending",
    "never": "pending",
}
ROWS = re.compile(r'<script type="application/json" id="jobs">(.*?)</script>', re.DOTALL)


async def make_run(folder: Path, base_url: str, jobs: list[dict[str, str]] = JOBS) -> Path:
    out = folder / "out"
    manifest = write_manifest(folder, jobs)
    await run_manifest(manifest, out, base_url, max_attempts=1, concurrency=1)
    return out


def report_of(out: Path) -> str:
    store = SqliteStore.open_read_only(out)
    try:
        path = write_report(store)
    finally:
        store.close()
    assert path == out / "report.html"
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)], "temp files left behind"
    return path.read_text()


def rows_of(page: str) -> list[dict[str, Any]]:
    """The jobs' rows the page embeds, each as a dict of its fields."""
    (text,) = ROWS.findall(page)
    return [dict(zip(CardRow._fields, row, strict=True)) for row in json.loads(text)]


def thumbnails(out: Path, page: str) -> list[Image.Image]:
    """The thumbnails the page shows, in the order of its rows, read from ``thumbs/``."""
    return [Image.open(out / "thumbs" / r["thumb"]) for r in rows_of(page) if r["thumb"]]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run and its report, shared by the read-only tests below."""

    async def run() -> Path:
        emulator = Emulator(EmulatorConfig())
        await emulator.start("127.0.0.1", 0)
        try:
            return await make_run(tmp_path_factory.mktemp("report"), emulator.base_url)
        finally:
            await emulator.stop()

    out = asyncio.run(run())
    return out, report_of(out)


def tiles_of(page: str) -> dict[str, str]:
    return dict(re.findall(r'<div class="tile" id="t-(\w+)"><b[^>]*>([^<]+)</b>', page))


def test_summary_counts_spend_and_wall_time(made: tuple[Path, str]) -> None:
    out, page = made
    tiles = tiles_of(page)
    assert tiles["jobs"] == "7"
    assert (tiles["succeeded"], tiles["failed"], tiles["pending"]) == ("3", "2", "2")
    assert tiles["confirmed"] == "$0.09"  # three images
    assert tiles["possible"] == "$0.03"  # the reset: sent, outcome unknown
    ((started, finished),) = db_rows(out, "SELECT started_at, finished_at FROM runs")
    wall_s = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    assert tiles["wall"] == f"{wall_s:.1f} s"
    assert tiles["throughput"] == f"{3 / wall_s * 60:.1f}"
    assert re.search(r'id="causes">[^<]*ambiguous: 1, content_policy_violation: 1<', page)


def test_every_job_has_a_card_with_its_status(made: tuple[Path, str]) -> None:
    _, page = made
    rows = {r["id"]: r for r in rows_of(page)}
    assert list(rows) == sorted(STATUS)  # in job id order
    assert {job_id: r["status"] for job_id, r in rows.items()} == STATUS
    # Without JavaScript a note says what the contact sheet needs; the controls stay hidden.
    assert (
        '<p id="needs-js" class="note">The contact sheet of the 7 job(s) needs JavaScript' in page
    )
    assert '<div id="controls" hidden>' in page
    assert (rows["fox-red"]["size"], rows["fox-red"]["confirmed"]) == ("1280\u00d7720", 30_000)
    assert rows["fox-red"]["image"] == "images/fox-red.png"
    assert (rows["banned"]["size"], rows["banned"]["confirmed"]) == ("asked 1280x544", 0)
    assert rows["maybe"]["possible"] == 30_000
    assert rows["stopper"]["detail"].startswith(
        "last try: HTTP 401 invalid_api_key"
    )  # its last attempt
    assert rows["never"]["detail"] == "not tried yet"


def test_failures_are_listed_with_error_and_cause(made: tuple[Path, str]) -> None:
    out, page = made
    table = page[page.index('<table id="failures-table">') : page.index("</table>")]
    rows = re.findall(r'<tr><td><a href="#status=failed&amp;job=(\w+)">.*?</tr>', table)
    assert rows == ["banned", "maybe"]
    error = db_rows(out, "SELECT error FROM jobs WHERE job_id = 'banned'")[0][0]
    assert "content_policy_violation" in error
    assert f'<td>content_policy_violation</td><td class="error">{html.escape(error)}<' in table
    assert "<td>ambiguous</td>" in table and "next run" in table
    assert 'id="failures-more"' not in page  # all of them are listed


def test_untrusted_text_is_escaped(made: tuple[Path, str]) -> None:
    _, page = made
    # The page's own two script elements, and no prompt can close one or open another.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<script>alert" not in page and "\\u003cscript>alert('owned')\\u003c/script>" in page
    (xss,) = [r for r in rows_of(page) if r["id"] == "xss"]
    assert xss["prompt"] == LONG_PROMPT  # whole: the card truncates it, its title shows it all


def test_thumbnails_are_files_beside_the_page(made: tuple[Path, str]) -> None:
    out, page = made
    thumbs = thumbnails(out, page)
    assert [t.format for t in thumbs] == ["WEBP"] * 3
    # Rows are in job id order: fox-red 1280x720, fox-url 848x1280, xss 1280x1280.
    assert [t.size for t in thumbs] == [(256, 144), (170, 256), (256, 256)]
    assert "img-src 'self';" in page  # local files only: no data: URI, nothing from a network
    assert "data:" not in page and "http" not in page.replace("http-equiv", "")
    assert not re.search(r"<link|@import|url\(", page)
    files = sorted(p.name for p in (out / "thumbs").iterdir())
    assert files == sorted(r["thumb"] for r in rows_of(page) if r["thumb"])
    assert [f.rsplit("-", 1)[0] for f in files] == ["fox-red", "fox-url", "xss"]
    for name in files:
        sha = db_rows(out, f"SELECT sha256 FROM jobs WHERE job_id = '{name.rsplit('-', 1)[0]}'")
        assert name.endswith(f"-{sha[0][0][:12]}.webp")


async def test_thumbnails_reused_then_replaced_when_the_image_changes(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [{"id": "fox", "prompt": "a red fox", "size": "1280x720"}]
    out = await make_run(tmp_path, emulator.base_url, jobs)
    report_of(out)
    (first,) = (out / "thumbs").iterdir()
    mtime_ns = first.stat().st_mtime_ns

    def no_decoding(source: Path) -> bytes:
        raise AssertionError(f"{source} decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(thumbs, "make_thumb", no_decoding)
        page = report_of(out)
    assert first.stat().st_mtime_ns == mtime_ns and len(thumbnails(out, page)) == 1

    # A new prompt under the same id: a new image, so a new thumb, and the old one goes.
    jobs[0]["prompt"] = "a green fox"
    await make_run(tmp_path, emulator.base_url, jobs)
    page = report_of(out)
    (second,) = (out / "thumbs").iterdir()
    assert second.name != first.name and second.name.startswith("fox-")
    assert [r["thumb"] for r in rows_of(page)] == [second.name]
    assert second.read_bytes() == thumbs.make_thumb(out / "images" / "fox.png")  # the new image


async def test_missing_or_unreadable_images_show_a_placeholder(
    tmp_path: Path, emulator: Emulator
) -> None:
    jobs = [
        {"id": "gone", "prompt": "a fox", "size": "1280x720"},
        {"id": "broken", "prompt": "a cat", "size": "1280x720"},
        {"id": "fine", "prompt": "a dog", "size": "1280x720"},
    ]
    out = await make_run(tmp_path, emulator.base_url, jobs)
    (out / "images" / "gone.png").unlink()
    (out / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.rmtree(out / "thumbs")  # the run's own report made them while the images were good
    page = report_of(out)
    notes = {r["id"]: r["note"] for r in rows_of(page)}
    assert notes["gone"] == "image file missing: images/gone.png"
    assert notes["broken"].startswith("image unreadable: images/broken.png (")
    assert notes["fine"] == ""
    assert "2 finished image(s) cannot be shown" in page
    assert len(thumbnails(out, page)) == 1
    assert [p.name.split("-")[0] for p in (out / "thumbs").iterdir()] == ["fine"]


def test_wall_time_counts_an_unfinished_run_until_its_last_attempt(tmp_path: Path) -> None:
    SqliteStore.open(tmp_path).close()
    db_exec(tmp_path, "INSERT INTO runs (started_at, finished_at) VALUES (?, ?)", (
        "2026-01-01T10:00:00.000+00:00", "2026-01-01T10:01:00.000+00:00"))  # fmt: skip
    db_exec(tmp_path, "INSERT INTO runs (started_at) VALUES ('2026-01-01T11:00:00.000+00:00')")
    db_exec(
        tmp_path,
        "INSERT INTO attempts (job_id, attempt, endpoint, model, state, started_at, finished_at) "
        "VALUES ('a', 1, 'generations', 'm', 'possible', ?, ?)",
        ("2026-01-01T11:00:05.000+00:00", "2026-01-01T11:00:30.000+00:00"),
    )
    assert tiles_of(report_of(tmp_path))["wall"] == "1 min 30 s"


# --- in a real browser ------------------------------------------------------------------------

CARDS_JS = (
    "[...document.querySelectorAll('#sheet article')].map((c) => [c.id.slice(4), c.dataset.status])"
)


async def test_browser_runs_the_script_and_filters_by_hash(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = made
    url = (out / "report.html").as_uri()
    async with Browser(tmp_path) as browser:
        page = await browser.open(url)
        # All shown, in job id order; the note for pages without JavaScript is gone.
        assert await page.evaluate(CARDS_JS) == [list(item) for item in sorted(STATUS.items())]
        assert await page.evaluate("document.getElementById('shown').textContent") == (
            "7 of 7 shown"
        )
        assert await page.evaluate("document.getElementById('needs-js')") is None
        assert not await page.evaluate("document.getElementById('controls').hidden")
        # The prompt is text, truncated on the card, whole in its title; it ran no script.
        prompt = await page.evaluate(
            "(() => { const p = document.querySelector('#job-xss .prompt');"
            " return [p.textContent, p.title, document.scripts.length]; })()"
        )
        assert prompt == [LONG_PROMPT[:139] + "\u2026", LONG_PROMPT, 2]
        facts = await page.evaluate("document.querySelector('#job-fox-red .facts').textContent")
        assert facts == "1280\u00d7720 \u00b7 $0.03 \u00b7 1 attempt"

        page = await browser.open(url + "#status=failed&sort=status")  # a fresh load
        assert await page.evaluate(CARDS_JS) == [["banned", "failed"], ["maybe", "failed"]]
        assert await page.evaluate("document.getElementById('shown').textContent") == (
            "2 of 7 shown"
        )
        pressed = "document.querySelector('button[aria-pressed=\"true\"]').value"
        assert await page.evaluate(pressed) == "failed"
        # A click changes the hash; sorted by status, problems come first, then by id.
        await page.click("#controls button[value=all]")
        await page.wait_for("document.getElementById('shown').textContent === '7 of 7 shown'")
        assert await page.evaluate("location.hash") == "#status=all&sort=status&page=1"
        assert [i for i, _ in await page.evaluate(CARDS_JS)] == [
            "banned", "maybe", "never", "stopper", "fox-red", "fox-url", "xss",
        ]  # fmt: skip


async def test_browser_screenshot_shows_the_thumbnails(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    out, page_html = made
    shot = tmp_path / "shot.png"
    async with Browser(tmp_path, width=1280, height=1600) as browser:
        page = await browser.open((out / "report.html").as_uri())
        loaded = "[...document.images].filter((i) => i.complete && i.naturalWidth > 0).length"
        assert await page.wait_for(f"{loaded} === 3 && {loaded}") == 3
        await page.screenshot(shot)
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the screenshot is blank"
    thumbs = thumbnails(out, page_html)
    assert len(thumbs) == 3
    for thumb in thumbs:
        # The emulator paints each image mostly in one colour, taken from its prompt.
        colours, counts = np.unique(
            np.asarray(thumb.convert("RGB")).reshape(-1, 3), axis=0, return_counts=True
        )
        colour = colours[counts.argmax()].astype(np.int16)
        close = (np.abs(pixels - colour).max(axis=2) < 12).sum()
        assert close > 5000, f"no thumbnail of colour {colour} on the screenshot"


def test_a_checkpoint_being_created_is_a_store_error(tmp_path: Path) -> None:
    """The store, not SQLite, tells that it cannot be read; nothing is written."""
    (tmp_path / "out").mkdir()
    sqlite3.connect(tmp_path / "out" / "checkpoint.sqlite").close()  # no tables yet
    store = SqliteStore.open_read_only(tmp_path / "out")
    try:
        with pytest.raises(StoreError, match="out: cannot read the checkpoint: no such table"):
            write_report(store)
    finally:
        store.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint.sqlite"]
