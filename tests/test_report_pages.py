"""The report at scale: a contact sheet shown a page of cards at a time, the failures table
capped, an edit's references beside its output, review decisions shown and filtered, the page
without JavaScript, and the summary and jobs read from one snapshot. The basics (summary,
thumbnails, escaping): ``test_report.py``; speed and memory on 100,000 jobs: ``python -m bench
report``."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from runner.emulator import Emulator, EmulatorConfig
from runner.images.files import sha256_file
from runner.outputs import report, thumbs
from runner.outputs.report_page import CARDS_PER_PAGE
from runner.store import open_review_log
from runner.store.base import Decision
from runner.store.sqlite import SqliteStore
from tests.chromium import Browser
from tests.conftest import db_exec, make_ref, run_manifest, write_manifest
from tests.test_report import make_run, report_of, rows_of

JOBS = 300  # two full pages and a part
FAILED = [f"j{i:03d}" for i in range(7, JOBS, 50)]  # j007, j057, ... j257: six
CARD_IDS = "[...document.querySelectorAll('#sheet article')].map((c) => c.id.slice(4))"
PAGE_TEXT = "document.querySelector('.pager .page').textContent"


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 300 jobs, six of them refused by the content filter."""
    jobs = [
        {"id": job_id, "prompt": f"shot {i}" + (" [[faults:policy]]" if job_id in FAILED else "")}
        for i, job_id in enumerate(f"j{i:03d}" for i in range(JOBS))
    ]

    async def run() -> Path:
        emulator = Emulator(EmulatorConfig())
        await emulator.start("127.0.0.1", 0)
        try:
            folder = tmp_path_factory.mktemp("many")
            manifest = write_manifest(folder, jobs, {"size": "1280x544"})
            await run_manifest(manifest, folder / "out", emulator.base_url, concurrency=16)
            return folder / "out"
        finally:
            await emulator.stop()

    return asyncio.run(run())


async def test_the_contact_sheet_shows_a_page_of_cards_at_a_time(
    many: Path, tmp_path: Path
) -> None:
    url = (many / "report.html").as_uri()
    ids = [f"j{i:03d}" for i in range(JOBS)]
    async with Browser(tmp_path) as browser:
        page = await browser.open(url)
        assert await page.evaluate(CARD_IDS) == ids[:CARDS_PER_PAGE]
        assert await page.evaluate(PAGE_TEXT) == "page 1 of 3"
        assert await page.evaluate("document.querySelector('.pager .prev').disabled")
        await page.click(".pager .next")
        await page.wait_for(f"{PAGE_TEXT} === 'page 2 of 3'")
        assert await page.evaluate("location.hash") == "#status=all&sort=id&page=2"
        assert await page.evaluate(CARD_IDS) == ids[CARDS_PER_PAGE : 2 * CARDS_PER_PAGE]

        # A page past the last shows the last; a job's link opens the page holding its card.
        page = await browser.open(url + "#status=all&sort=id&page=99")
        assert await page.evaluate(CARD_IDS) == ids[2 * CARDS_PER_PAGE :]
        page = await browser.open(url + "#job=j250")
        assert await page.evaluate(PAGE_TEXT) == "page 3 of 3"
        assert await page.evaluate("document.querySelector('.card.target').id") == "job-j250"
        page = await browser.open(url + "#status=failed")
        assert await page.evaluate(CARD_IDS) == FAILED
        assert await page.evaluate("document.querySelector('.pager').hidden")  # one page
        assert not page.console, page.console


def test_the_failures_table_is_capped(many: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "FAILURES_LISTED", 2)
    page = report_of(many)
    listed = re.findall(r'<tr><td><a href="#status=failed&amp;job=(\w+)">', page)
    assert listed == FAILED[:2]
    assert (
        '<p class="sub" id="failures-more">The first 2 of 6 failed jobs, by id; all of them are '
        'on the contact sheet, <a href="#status=failed">filtered to the failures</a>.</p>'
    ) in page
    assert sum(r["status"] == "failed" for r in rows_of(page)) == 6  # every card is there


async def test_without_javascript_the_summary_and_failures_show(many: Path, tmp_path: Path) -> None:
    async with Browser(tmp_path) as browser:
        page = await browser.open("about:blank")
        await page.send("Emulation.setScriptExecutionDisabled", value=True)
        await page.goto((many / "report.html").as_uri())
        shown = await page.evaluate(
            "['needs-js', 'summary', 'failures-table', 'controls']"
            ".map((id) => document.getElementById(id).checkVisibility())"
        )
        assert shown == [True, True, True, False]
        assert await page.evaluate("document.getElementById('sheet').children.length") == 0


async def test_edits_show_their_references_beside_the_output(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = tmp_path / "refs"
    make_ref(refs, "mug.png", (96, 64))
    make_ref(refs, "beach.jpg", (64, 96))
    jobs = [
        {"id": "on-beach", "prompt": "the mug of image1 on image2", "images": [
            "refs/mug.png", "refs/beach.jpg"]},
        {"id": "glossy", "prompt": "make image1 glossy", "images": ["refs/mug.png"]},
        {"id": "plain", "prompt": "a plain mug"},
    ]  # fmt: skip
    out = await make_run(tmp_path, emulator.base_url, jobs)
    page = report_of(out)
    mug, beach = (f"ref-{sha256_file(refs / n)[:12]}.webp" for n in ("mug.png", "beach.jpg"))
    by_id = {r["id"]: r["refs"] for r in rows_of(page)}
    assert by_id == {
        "glossy": [[mug, "mug.png"]],
        "on-beach": [[mug, "mug.png"], [beach, "beach.jpg"]],
        "plain": [],
    }
    assert {mug, beach} < {p.name for p in (out / "thumbs").iterdir()}  # one file a reference

    async with Browser(tmp_path) as browser:
        tab = await browser.open((out / "report.html").as_uri())
        loaded = await tab.wait_for(
            "(() => { const imgs = [...document.querySelectorAll('#job-on-beach img')];"
            " return imgs.length === 3 && imgs.every((i) => i.complete && i.naturalWidth > 0)"
            " && imgs.map((i) => i.getAttribute('src')); })()"
        )
        assert loaded[:2] == [f"thumbs/{mug}", f"thumbs/{beach}"]  # beside the output

    # A second report decodes nothing; a reference gone shows as such, its thumb swept.
    (refs / "beach.jpg").unlink()

    def no_decoding(source: Path) -> bytes:
        raise AssertionError(f"{source} decoded again")

    monkeypatch.setattr(thumbs, "make_thumb", no_decoding)
    by_id = {r["id"]: r["refs"] for r in rows_of(report_of(out))}
    assert by_id["on-beach"] == [[mug, "mug.png"], ["", f"reference missing: {refs / 'beach.jpg'}"]]
    assert not (out / "thumbs" / beach).exists() and (out / "thumbs" / mug).exists()


def test_the_summary_and_the_jobs_are_of_one_moment(many: Path, tmp_path: Path) -> None:
    """A change committed while the jobs are being read is in neither the summary nor them."""
    out = Path(shutil.copytree(many, tmp_path / "out"))
    store = SqliteStore.open_read_only(out)
    try:
        with store.views().report_snapshot() as snap:
            assert (snap.summary.succeeded, snap.summary.failed) == (JOBS - 6, 6)
            first = next(snap.jobs)
            db_exec(out, "UPDATE jobs SET status = 'failed' WHERE job_id = 'j299'")
            statuses = [first.status] + [job.status for job in snap.jobs]
        assert statuses.count("failed") == 6 and len(statuses) == JOBS
        with store.views().report_snapshot() as snap:
            assert snap.summary.failed == 7
    finally:
        store.close()


async def test_review_decisions_show_and_filter(many: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(many, tmp_path / "out"))
    log = open_review_log(out)
    try:
        log.decide(
            [Decision("j001", "approved"), Decision("j002", "rejected"),
             Decision("j003", "rejected")],
            reviewer="ana",
        )  # fmt: skip
    finally:
        log.close()
    page_html = report_of(out)
    assert '<b id="reviews">1 approved, 2 rejected, 291 unreviewed</b>' in page_html
    reviews = {r["id"]: r["review"] for r in rows_of(page_html)}
    assert (reviews["j001"], reviews["j002"], reviews["j000"], reviews["j007"]) == (
        "approved", "rejected", "unreviewed", "",  # j007 failed: nothing to review
    )  # fmt: skip
    async with Browser(tmp_path) as browser:
        page = await browser.open((out / "report.html").as_uri() + "#review=rejected")
        assert await page.evaluate(CARD_IDS) == ["j002", "j003"]
        badges = "[...document.querySelectorAll('#job-j002 .badge')].map((b) => b.textContent)"
        assert await page.evaluate(badges) == ["succeeded", "rejected"]
        await page.click("#controls button[name=review][value=approved]")
        await page.wait_for("document.getElementById('shown').textContent === '1 of 300 shown'")
        assert await page.evaluate("location.hash") == "#status=all&review=approved&sort=id&page=1"
        assert await page.evaluate(CARD_IDS) == ["j001"]
