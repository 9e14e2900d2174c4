"""``report``, ``export`` and ``review`` of a run whose images are in object storage, against the
emulator, a real PostgreSQL and moto's S3 server: the page and its thumbnails in S3 (made once,
an edited image's again, the unused ones swept), a local dataset from the images in S3 (one
deleted and one altered there skipped and counted), the review app's images and thumbnails read
from S3, and no credential in any output."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from runner.cli.main import main
from runner.emulator import Emulator
from runner.outputs import thumbs
from runner.outputs.report_page import CardRow
from runner.outputs.thumbs import CHANGED_NOTE
from runner.review import ReviewServer
from runner.storage import Location, open_location
from tests.reviewing import client_of
from tests.test_export import hf  # noqa: F401 (a fixture)
from tests.test_export_dataset import load
from tests.test_remote import SECRETS, manifest_of, run_to

JOBS = 20
ROWS = re.compile(r'<script type="application/json" id="jobs">(.*?)</script>', re.S)


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str) -> str:
    """A run of 20 jobs (every fifth an edit of a local reference) into S3, its end-of-run
    report made there."""
    out = f"s3://{s3_bucket}/night"
    await run_to(manifest_of(tmp_path, jobs=JOBS), out, emulator, pg_url)
    return out


def page_rows(location: Location) -> dict[str, dict[str, Any]]:
    """The jobs' rows of the report in ``location``, by job id."""
    page = location.read_bytes("report.html").decode()
    (text,) = ROWS.findall(page)
    rows = [dict(zip(CardRow._fields, row, strict=True)) for row in json.loads(text)]
    return {row["id"]: row for row in rows}


def thumb_names(location: Location) -> set[str]:
    return {found.key.removeprefix("thumbs/") for found in location.list("thumbs/")}


def shown(rows: dict[str, dict[str, Any]]) -> set[str]:
    """The thumbs a page shows: the jobs' and their references'."""
    names = {row["thumb"] for row in rows.values() if row["thumb"]}
    return names | {name for row in rows.values() for name, _ in row["refs"] if name}


def until_the_store_dates_after(location: Location, mtime_s: float, tmp_path: Path) -> None:
    """Wait until an object put in ``location`` is dated after ``mtime_s`` by the store's
    clock (whole seconds on S3), so that what was put before is older than what comes next."""
    marker = tmp_path / "marker"
    marker.write_bytes(b"")
    while (location.put("marker", marker).mtime_s or 0) <= mtime_s:
        time.sleep(0.1)
    location.delete("marker")


def test_the_run_puts_its_report_and_thumbs_in_s3(out: str) -> None:
    location = open_location(out)
    rows = page_rows(location)
    assert sorted(rows) == sorted(f"shot-{n}" for n in range(JOBS))
    assert all(row["status"] == "succeeded" and row["thumb"] for row in rows.values())
    assert rows["shot-3"]["image"] == "images/shot-3.png"  # relative, as in a folder
    assert thumb_names(location) == shown(rows)
    assert any(name.startswith("ref-") for name in shown(rows))  # the edits' reference
    with Image.open(io.BytesIO(location.read_bytes(f"thumbs/{rows['shot-3']['thumb']}"))) as im:
        assert im.format == "WEBP" and max(im.size) <= thumbs.THUMB_MAX_PX
    page = location.read_bytes("report.html").decode()
    assert out in page and not any(secret in page for secret in SECRETS)


def test_report_again_makes_no_thumb_then_only_an_edited_images_and_sweeps(
    out: str, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    location = open_location(out)
    before = page_rows(location)
    made: list[int] = []
    make_thumb = thumbs.make_thumb

    def counted(source: Path | bytes) -> bytes:
        made.append(1)
        return make_thumb(source)

    monkeypatch.setattr(thumbs, "make_thumb", counted)
    assert main(["report", out, "--state", pg_url]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == f"report: {out}/report.html"
    assert made == []  # every image as recorded (its sha256 in S3), every thumb there
    assert page_rows(location) == before

    edited = tmp_path / "edited.png"
    Image.new("RGB", (64, 64), "blue").save(edited)
    location.put("images/shot-3.png", edited)  # by hand, in S3
    stray = tmp_path / "gone-0123456789ab.webp"  # a job's thumb no page shows any more
    stray.write_bytes(make_thumb(edited))
    stray_at = location.put(f"thumbs/{stray.name}", stray).mtime_s
    assert stray_at is not None
    until_the_store_dates_after(location, stray_at, tmp_path)
    assert main(["report", out, "--state", pg_url]) == 0
    rows = page_rows(location)
    assert made == [1]  # the edited image's, and only it
    assert rows["shot-3"]["note"] == CHANGED_NOTE
    assert rows["shot-3"]["thumb"] != before["shot-3"]["thumb"]
    assert location.read_bytes(f"thumbs/{rows['shot-3']['thumb']}") == make_thumb(edited)
    assert thumb_names(location) == shown(rows)  # the old thumb of shot-3 and the stray swept
    texts = [*capsys.readouterr(), location.read_bytes("report.html").decode()]
    assert not any(secret in text for text in texts for secret in SECRETS)


def test_export_reads_the_images_from_s3_and_skips_those_gone_or_altered(
    out: str,
    pg_url: str,
    tmp_path: Path,
    hf: ModuleType,  # noqa: F811
    capsys: Any,
) -> None:
    location = open_location(out)
    location.delete("images/shot-1.png")
    altered = tmp_path / "altered.png"
    Image.new("RGB", (64, 64), "red").save(altered)
    location.put("images/shot-2.png", altered)
    kept = {f"shot-{n}" for n in range(JOBS)} - {"shot-1", "shot-2"}

    folder, parquet = tmp_path / "ds-folder", tmp_path / "ds-parquet"
    assert main(["export", out, str(folder), "--state", pg_url]) == 0
    assert main(["export", out, str(parquet), "--format", "parquet", "--state", pg_url]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("exported 18 images") == 2
    assert printed.out.count("2 skipped: image missing or altered") == 2
    assert not any(secret in printed.out + printed.err for secret in SECRETS)

    images = load(hf, tmp_path, "imagefolder", data_dir=str(folder), split="train")
    assert set(images["job_id"]) == kept
    assert (folder / "train" / "shot-3.png").read_bytes() == location.read_bytes(
        "images/shot-3.png"
    )
    rows = load(hf, tmp_path, "parquet", data_dir=str(parquet), split="train")
    assert set(rows["job_id"]) == kept
    assert rows[0]["image"].size == (rows[0]["width"], rows[0]["height"])  # decodes
    card = (parquet / "README.md").read_text()
    assert out in card and not any(secret in card for secret in SECRETS)


async def test_the_review_app_serves_images_and_thumbs_from_s3(out: str, pg_url: str) -> None:
    location = open_location(out)
    rows = page_rows(location)
    location.delete(f"thumbs/{rows['shot-4']['thumb']}")  # made again on demand, into S3
    server = ReviewServer(out, reviewer="ada", state_url=pg_url)
    async with server, client_of(server) as session:
        for job_id in ("shot-3", "shot-4"):
            async with session.get(f"/image/{job_id}") as response:
                assert response.status == 200 and response.content_type == "image/png"
                assert await response.read() == location.read_bytes(f"images/{job_id}.png")
            async with session.get(f"/thumb/{job_id}") as response:
                assert response.status == 200 and response.content_type == "image/webp"
                thumb = await response.read()
            assert thumb == location.read_bytes(f"thumbs/{rows[job_id]['thumb']}")
        async with session.get("/refthumb/shot-5/0") as response:
            assert response.status == 200 and response.content_type == "image/webp"
        async with session.get("/api/items") as response:
            assert (await response.json())["total"] == JOBS
        location.delete("images/shot-6.png")
        async with session.get("/image/shot-6") as response:
            assert response.status == 404
            error = (await response.json())["error"]
    assert "shot-6" in error and not any(secret in error for secret in SECRETS)
