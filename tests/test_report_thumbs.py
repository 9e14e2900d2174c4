"""The thumbnail cache shared by reports and review apps: an image changed after the run gets a
thumb of its own (its stat no longer the one recorded), and neither a report's sweep nor its
temp cleanup deletes what another user of ``thumbs/`` is making; the review app makes a thumb
again when a sweep deleted it under it. The report's page and its thumbs: ``test_report.py``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from runner.emulator import Emulator
from runner.images.files import temp_path_for
from runner.outputs import thumbs
from runner.outputs.report import write_report
from runner.outputs.thumbs import CHANGED_NOTE, Thumb, Thumbnails
from runner.review import ReviewServer
from runner.store import ImageStat
from runner.store.sqlite import SqliteStore
from tests.conftest import run_manifest, write_manifest
from tests.reviewing import client_of
from tests.test_report import rows_of

JOBS = [
    {"id": "fox", "prompt": "a red fox", "size": "1280x720"},
    {"id": "owl", "prompt": "a white owl", "size": "1280x720"},
    {"id": "cat", "prompt": "a black cat", "size": "1280x720"},
]
HOUR_S = 3600


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    """A run's folder, with the thumbs its own report made."""
    await run_manifest(write_manifest(tmp_path, JOBS), tmp_path / "out", emulator.base_url)
    return tmp_path / "out"


def report_rows(out: Path) -> dict[str, dict[str, object]]:
    store = SqliteStore.open_read_only(out)
    try:
        page = write_report(store).read_text()
    finally:
        store.close()
    return {str(row["id"]): row for row in rows_of(page)}


def paint(path: Path, colour: str) -> None:
    """Replace the image at ``path`` by hand: a flat picture of ``colour``, same size."""
    with Image.open(path) as image:
        size = image.size
    Image.new("RGB", size, colour).save(path, format="PNG")


def thumb_names(out: Path) -> set[str]:
    return {p.name for p in (out / "thumbs").iterdir()}


def age_thumbs(out: Path) -> None:
    """Date the thumbs there an hour back: made well before the next report starts."""
    for path in (out / "thumbs").iterdir():
        os.utime(path, (time.time() - HOUR_S,) * 2)


async def test_an_image_changed_after_the_run_gets_a_thumb_of_its_own(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = report_rows(out)
    paint(out / "images" / "fox.png", "blue")
    owl = out / "images" / "owl.png"  # only touched: the same bytes, a new mtime
    os.utime(owl, ns=(owl.stat().st_atime_ns, owl.stat().st_mtime_ns + 10**9))
    make_thumb, sha256_file = thumbs.make_thumb, thumbs.sha256_file

    def decoded(source: Path) -> bytes:
        assert source.name == "fox.png", f"{source} decoded"
        return make_thumb(source)

    def hashed(source: Path) -> str:
        assert source.name != "cat.png", f"{source} hashed though its stat is the one recorded"
        return sha256_file(source)

    with monkeypatch.context() as patch:
        patch.setattr(thumbs, "make_thumb", decoded)
        patch.setattr(thumbs, "sha256_file", hashed)
        rows = report_rows(out)
    assert rows["fox"]["thumb"] != first["fox"]["thumb"] and rows["fox"]["note"] == CHANGED_NOTE
    made = (out / "thumbs" / str(rows["fox"]["thumb"])).read_bytes()
    assert made == make_thumb(out / "images" / "fox.png")  # the picture there now
    for unchanged in ("owl", "cat"):
        assert rows[unchanged]["thumb"] == first[unchanged]["thumb"]
        assert rows[unchanged]["note"] == ""


async def test_the_review_app_shows_the_image_there_now(out: Path) -> None:
    paint(out / "images" / "fox.png", "blue")
    async with (
        ReviewServer(out, reviewer="ada") as server,
        client_of(server) as session,
        session.get("/thumb/fox") as response,
    ):
        assert response.status == 200
        shown = await response.read()
    assert shown == thumbs.make_thumb(out / "images" / "fox.png")


async def test_the_sweep_leaves_what_others_make_meanwhile(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    age_thumbs(out)
    folder = out / "thumbs"
    writing = temp_path_for(folder / "fox-0123456789ab.webp")  # a review app writing one now
    writing.write_bytes(b"half a thumb")
    left = temp_path_for(folder / "owl-0123456789ab.webp")  # an interrupted write, long ago
    left.write_bytes(b"half a thumb")
    os.utime(left, (time.time() - 2 * HOUR_S,) * 2)
    old = folder / "gone-0123456789ab.webp"  # a job no longer done, before this report
    old.write_bytes(b"old")
    os.utime(old, (time.time() - HOUR_S,) * 2)
    make_thumb = thumbs.make_thumb

    def and_the_review_app(source: Path) -> bytes:
        if not (folder / "meanwhile-0123456789ab.webp").exists():
            (folder / "meanwhile-0123456789ab.webp").write_bytes(make_thumb(source))
        return make_thumb(source)

    monkeypatch.setattr(thumbs, "make_thumb", and_the_review_app)
    paint(out / "images" / "fox.png", "blue")  # so that the report makes one thumb
    rows = report_rows(out)
    used = {str(row["thumb"]) for row in rows.values()}
    assert thumb_names(out) == used | {writing.name, "meanwhile-0123456789ab.webp"}


async def test_the_sweep_waits_for_the_page_in_place(out: Path) -> None:
    age_thumbs(out)
    before = thumb_names(out)
    paint(out / "images" / "fox.png", "blue")  # the old page's thumb of it is unused now
    (out / "report.html").unlink()
    (out / "report.html").mkdir()  # the new page cannot be renamed into place
    store = SqliteStore.open_read_only(out)
    try:
        with pytest.raises(OSError):
            write_report(store)
    finally:
        store.close()
    assert before < thumb_names(out)  # the old page's thumbs are all there


async def test_a_thumb_swept_as_the_review_app_reads_it_is_made_again(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = Thumbnails.of_image
    swept: list[str] = []

    def then_swept(
        self: Thumbnails, job_id: str, path: str | None, sha: str | None, st: ImageStat | None
    ) -> Thumb:
        thumb = found(self, job_id, path, sha, st)
        if thumb.name and not swept:  # a report's sweep, between finding it and reading it
            (self.dir / thumb.name).unlink()
            swept.append(thumb.name)
        return thumb

    monkeypatch.setattr(Thumbnails, "of_image", then_swept)
    async with (
        ReviewServer(out, reviewer="ada") as server,
        client_of(server) as session,
        session.get("/thumb/owl") as response,
    ):
        assert response.status == 200 and response.content_type == "image/webp"
        shown = await response.read()
    assert swept and (out / "thumbs" / swept[0]).read_bytes() == shown
    assert shown == thumbs.make_thumb(out / "images" / "owl.png")
