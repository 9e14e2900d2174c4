"""Earlier versions of images in object storage, as the next plan finds them: an image edited
in S3 is kept and recorded as an edit (checked by the sha256 S3 reports, no request); one
rejected in review goes to ``rejected/`` by copy and delete, and the job is made again."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from runner.emulator import Emulator
from runner.storage import open_location
from runner.store.base import Decision
from runner.store.postgres.reviewlog import PostgresReviewLog
from tests.test_remote import manifest_of, run_to


def results_of(out: str) -> pd.DataFrame:
    data = open_location(out).read_bytes("results.parquet")
    return pd.read_parquet(io.BytesIO(data)).set_index("job_id")


async def test_an_image_edited_in_s3_is_kept_as_an_edit(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    manifest = manifest_of(tmp_path, jobs=4)
    out = f"s3://{s3_bucket}/edits"
    await run_to(manifest, out, emulator, pg_url)
    location = open_location(out)
    key = str(results_of(out).loc["shot-1", "image_path"])
    with Image.open(io.BytesIO(location.read_bytes(key))) as old:
        edited = tmp_path / "edited.png"
        Image.new("RGB", old.size, (1, 2, 3)).save(edited)
    location.delete(key)
    location.put(key, edited)

    await run_to(manifest, out, emulator, pg_url)
    assert len(emulator.requests) == 4  # kept, not made again
    row = results_of(out).loc["shot-1"]
    assert row["sha256"] == hashlib.sha256(edited.read_bytes()).hexdigest()
    assert row["version"] == 2


async def test_a_rejected_image_moves_to_rejected_and_is_made_again(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    manifest = manifest_of(tmp_path, jobs=4)
    out = f"s3://{s3_bucket}/rejects"
    await run_to(manifest, out, emulator, pg_url)
    location = open_location(out)
    first = location.read_bytes("images/shot-2.png")
    with PostgresReviewLog(pg_url, out) as log:
        log.decide([Decision("shot-2", "rejected")], "tester")

    await run_to(manifest, out, emulator, pg_url)
    assert len(emulator.requests) == 5
    assert location.read_bytes("rejected/shot-2.v1.png") == first
    row = results_of(out).loc["shot-2"]
    assert row["status"] == "succeeded" and row["version"] == 2
    assert hashlib.sha256(location.read_bytes("images/shot-2.png")).hexdigest() == row["sha256"]
