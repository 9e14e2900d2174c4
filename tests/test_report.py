"""The HTML report: summary, failures and contact sheet from a real run on the emulator, the
thumbnail cache, and the page as a real headless Chromium renders it (script run, screenshot)."""

from __future__ import annotations

import asyncio
import base64
import html
import io
import re
import shutil
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.emulator import Emulator, EmulatorConfig
from runner.errors import StoreError
from runner.images.files import is_temp_name
from runner.outputs import report
from runner.outputs.report import write_report
from runner.store.sqlite import SqliteStore
from tests.conftest import db_exec, db_rows, run_manifest, write_manifest

CHROMIUM = Path("/usr/bin/chromium")
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
CARD = re.compile(r'<article class="card[^"]*" id="job-([^"]+)"[^>]*data-status="(\w+)"[^>]*>')


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


def thumbnails(page: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/webp;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in uris]


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
    assert dict(CARD.findall(page)) == STATUS
    # Without JavaScript every card shows, and the controls (which would do nothing) do not.
    assert not re.search(r"<article[^>]* hidden", page)
    assert '<div id="controls" hidden>' in page
    assert "1280&times;720 &middot; $0.03" in page  # actual size and cost
    assert "asked 1280x544 &middot; $0.00" in page  # a failed job: the size it asked for
    assert "last try: HTTP 401 invalid_api_key" in page  # a pending job's last attempt


def test_failures_are_listed_with_error_and_cause(made: tuple[Path, str]) -> None:
    out, page = made
    table = page[page.index('<table id="failures-table">') : page.index("</table>")]
    rows = re.findall(r"<tr><td><a href=\"#job-(\w+)\">.*?</tr>", table)
    assert rows == ["banned", "maybe"]
    error = db_rows(out, "SELECT error FROM jobs WHERE job_id = 'banned'")[0][0]
    assert "content_policy_violation" in error
    assert f'<td>content_policy_violation</td><td class="error">{html.escape(error)}<' in table
    assert "<td>ambiguous</td>" in table and "next run" in table


def test_untrusted_text_is_escaped(made: tuple[Path, str]) -> None:
    _, page = made
    assert page.count("<script") == 1  # the page's own
    assert "alert('owned')" not in page
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page
    # Truncated on the card, whole in its title attribute.
    full = html.escape(LONG_PROMPT)
    assert f'title="{full}"' in page
    assert f">{full}<" not in page and "\u2026</p>" in page


def test_self_contained_thumbnails(made: tuple[Path, str]) -> None:
    out, page = made
    thumbs = thumbnails(page)
    assert [t.format for t in thumbs] == ["WEBP"] * 3
    # Cards are in job id order: fox-red 1280x720, fox-url 848x1280, xss 1280x1280.
    assert [t.size for t in thumbs] == [(256, 144), (170, 256), (256, 256)]
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("data:image/webp;base64,", "#")) for link in links)
    assert "http" not in page.replace("http-equiv", "")
    assert not re.search(r"<link|@import|url\(", page)
    files = sorted(p.name for p in (out / "thumbs").iterdir())
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
        patch.setattr(report, "_make_thumb", no_decoding)
        page = report_of(out)
    assert first.stat().st_mtime_ns == mtime_ns and len(thumbnails(page)) == 1

    # A new prompt under the same id: a new image, so a new thumb, and the old one goes.
    jobs[0]["prompt"] = "a green fox"
    await make_run(tmp_path, emulator.base_url, jobs)
    page = report_of(out)
    (second,) = (out / "thumbs").iterdir()
    assert second.name != first.name and second.name.startswith("fox-")
    expected = thumbnails(page)[0].convert("RGB").getpixel((5, 5))
    with Image.open(second) as image:
        assert image.convert("RGB").getpixel((5, 5)) == expected


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
    assert "image file missing: images/gone.png" in page
    assert "image unreadable: images/broken.png" in page
    assert "2 finished image(s) cannot be shown" in page
    assert len(thumbnails(page)) == 1
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


def chromium(tmp_path: Path, *args: str) -> str:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Chromium first")
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def visible_cards(dom: str) -> list[tuple[str, str, bool]]:
    """(job id, status, visible) of each card, in the order of the DOM."""
    cards = re.findall(r"<article ([^>]*)>", dom)
    attrs = [dict(re.findall(r'([\w-]+)(?:="([^"]*)")?', card)) for card in cards]
    return [(a["id"].removeprefix("job-"), a["data-status"], "hidden" not in a) for a in attrs]


def test_browser_runs_the_script_and_filters_by_hash(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = made
    url = (out / "report.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", url)
    # All shown, in job id order (as the page was written).
    assert [(i, s) for i, s, shown in visible_cards(dom) if shown] == sorted(STATUS.items())
    assert '<span id="shown">7 of 7 shown</span>' in dom  # written by the script
    assert '<div id="controls">' in dom

    dom = chromium(tmp_path, "--dump-dom", url + "#status=failed&sort=status")
    cards = visible_cards(dom)
    assert [(i, shown) for i, s, shown in cards if s == "failed"] == [
        ("banned", True),
        ("maybe", True),
    ]
    assert not any(shown for _, s, shown in cards if s != "failed")
    # Sorted by status (problems first), then by id.
    assert [i for i, _, _ in cards] == [
        "banned",
        "maybe",
        "never",
        "stopper",
        "fox-red",
        "fox-url",
        "xss",
    ]
    assert '<span id="shown">2 of 7 shown</span>' in dom
    assert '<button type="button" value="failed" aria-pressed="true">' in dom


def test_browser_screenshot_shows_the_thumbnails(made: tuple[Path, str], tmp_path: Path) -> None:
    out, page = made
    shot = tmp_path / "shot.png"
    chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars",
        (out / "report.html").as_uri(),
    )  # fmt: skip
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the screenshot is blank"
    thumbs = thumbnails(page)
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
    assert not (tmp_path / "out" / "report.html").exists()
