"""Runs whose output is in object storage (``--out s3://...`` with ``--state``), end to end
against the emulator, a real PostgreSQL and moto's S3 server: images created in S3 and
verified by checksum, results and ledger put there, a second run that sends nothing, an image
deleted from S3 made again, one left by a worker that died before its commit adopted, and no
credential anywhere."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from runner.cli.main import main
from runner.core.lifecycle import Run
from runner.emulator import Emulator
from runner.manifest import load_manifest
from runner.storage import open_location
from runner.store.postgres import open_pg_store
from tests import services
from tests.conftest import make_ref, options, write_manifest

SECRETS = ("testing-secret-key-5d2e", services.PG_PASSWORD)


def manifest_of(tmp_path: Path, jobs: int = 30) -> Path:
    ref = make_ref(tmp_path / "refs", "ref.png")
    rows = [
        {"id": f"shot-{n}", "prompt": f"picture {n}"}
        | ({"images": [str(ref)]} if n % 5 == 0 else {})
        for n in range(jobs)
    ]
    return write_manifest(tmp_path, rows)


async def run_to(manifest: Path, out: str, emulator: Emulator, pg_url: str) -> Run:
    run = Run(
        load_manifest(manifest),
        dataclasses.replace(options(Path(), emulator.base_url), out_dir=out, state_url=pg_url),
    )
    await run.execute()
    return run


def image_sha256s(out: str) -> dict[str, str]:
    location = open_location(out)
    return {
        info.key: hashlib.sha256(location.read_bytes(info.key)).hexdigest()
        for info in location.list("images/")
    }


async def test_a_run_to_s3_makes_verified_images_and_books_and_resumes(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    manifest = manifest_of(tmp_path)
    out = f"s3://{s3_bucket}/run1"
    await run_to(manifest, out, emulator, pg_url)
    assert len(emulator.requests) == 30

    location = open_location(out)
    results = pd.read_parquet(io.BytesIO(location.read_bytes("results.parquet")))
    assert (results["status"] == "succeeded").all() and len(results) == 30
    assert len(pd.read_csv(io.BytesIO(location.read_bytes("ledger.csv")))) == 30
    assert len(pd.read_csv(io.BytesIO(location.read_bytes("results.csv")))) == 30
    stored = image_sha256s(out)
    assert stored == dict(zip(results["image_path"], results["sha256"], strict=True))
    assert all(key.startswith("images/shot-") for key in stored)

    await run_to(manifest, out, emulator, pg_url)  # all done: nothing is sent
    assert len(emulator.requests) == 30

    location.delete("images/shot-7.png")  # gone from S3: made again, and only it
    await run_to(manifest, out, emulator, pg_url)
    assert len(emulator.requests) == 31
    assert "images/shot-7.png" in image_sha256s(out)


async def test_an_image_whose_success_was_not_recorded_is_adopted(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    """A worker died between the object's create and the commit of its success: the next
    plan finds the object, verifies it and adopts it, without a request."""
    manifest = manifest_of(tmp_path, jobs=6)
    out = f"s3://{s3_bucket}/run2"
    await run_to(manifest, out, emulator, pg_url)
    store = open_pg_store(pg_url, out, worker=False)
    try:
        with store.batch():
            store.retire_image("shot-3", "missing", None, None)  # its success forgotten
    finally:
        store.close()
    await run_to(manifest, out, emulator, pg_url)
    assert len(emulator.requests) == 6
    results = pd.read_parquet(io.BytesIO(open_location(out).read_bytes("results.parquet")))
    row = results.set_index("job_id").loc["shot-3"]
    assert row["status"] == "succeeded"
    assert image_sha256s(out)[str(row["image_path"])] == row["sha256"]


def test_a_remote_out_without_state_is_refused_before_anything_is_sent(
    tmp_path: Path, emulator: Emulator, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = manifest_of(tmp_path, jobs=2)
    argv = ["run", str(manifest), "--out", f"s3://{s3_bucket}/x", "--base-url", emulator.base_url]
    assert main(argv) == 2
    assert "--state" in capsys.readouterr().err
    assert emulator.requests == []
    assert list(open_location(f"s3://{s3_bucket}").list()) == []


def test_the_cli_runs_to_s3_and_shows_no_credential(
    tmp_path: Path,
    emulator: Emulator,
    pg_url: str,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = manifest_of(tmp_path, jobs=3)
    out = f"s3://{s3_bucket}/cli/{{date}}/"
    log_file = tmp_path / "run.log"
    date = f"{datetime.now(UTC):%Y-%m-%d}"
    argv = ["run", str(manifest), "--out", out, "--state", pg_url, "--emulate", "-vv"]
    with caplog.at_level(logging.DEBUG):
        assert main([*argv, "--log-file", str(log_file), "--json"]) == 0
        assert main(["status", f"s3://{s3_bucket}/cli/{date}", "--state", pg_url]) == 0
    printed = capsys.readouterr()
    assert f"s3://{s3_bucket}/cli/" in printed.out
    location = open_location(f"s3://{s3_bucket}/cli")
    written = [
        location.read_bytes(info.key) for info in location.list() if "images/" not in info.key
    ]
    texts = [printed.out, printed.err, caplog.text, log_file.read_text()]
    texts += [data.decode(errors="replace") for data in written]
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret
