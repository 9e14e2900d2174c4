"""Versions of a job's image, end to end on the emulator: a rejected image is made again (the old
one kept in rejected/), an image edited by hand is kept and noticed once (or made again with
--redo-edited, the edit kept in edited/), a changed or deleted image bumps the version; a dry
run moves nothing; a crash between recording a version and moving its file is finished by the
next run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytest
from PIL import Image

from runner.core import versions as versions_module
from runner.core.lifecycle import Run, RunReport
from runner.core.plan import make_plan
from runner.emulator import Emulator
from runner.manifest.load import load_manifest
from runner.store import Decision, ReviewState, open_review_log
from runner.store.sqlite import SqliteStore
from tests.conftest import db_rows, folder_state, options, run_manifest, write_manifest
from tests.test_cli import run_cli

IDS = [f"shot-{n}" for n in range(5)]


def five_shots(tmp_path: Path) -> Path:
    jobs = [{"id": i, "prompt": f"a picture of {i}", "size": "1280x544"} for i in IDS]
    return write_manifest(tmp_path, jobs)


def decide(out: Path, decision: ReviewState, *job_ids: str) -> None:
    log = open_review_log(out)
    try:
        log.decide([Decision(job_id, decision) for job_id in job_ids], reviewer="tester")
    finally:
        log.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def retouch(path: Path) -> None:
    """Edit an image by hand, as a user would: the same file, other pixels."""
    with Image.open(path) as image:
        edited = image.convert("RGB")
    edited.paste((255, 255, 255), (0, 0, 64, 64))
    edited.save(path, format="PNG")


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").set_index("job_id")


def versions(out: Path) -> list[tuple[Any, ...]]:
    return db_rows(
        out,
        "SELECT job_id, version, image_path, sha256, reason FROM versions ORDER BY job_id, version",
    )


async def run_with(manifest: Path, out: Path, base_url: str, **changes: Any) -> RunReport:
    chosen = dataclasses.replace(options(out, base_url), **changes)
    return await Run(load_manifest(manifest), chosen).execute()


class CrashedMove(NamedTuple):
    manifest: Path
    out: Path
    image: Path  # shot-3's image, still in images/
    rejected: str  # its sha256
    inode: int


async def crash_before_the_move(
    tmp_path: Path, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> CrashedMove:
    """Five shots made, shot-3 rejected, then a plan whose process dies right after committing
    shot-3's new version and before moving its old file to rejected/."""
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, base_url)
    image = out / "images" / "shot-3.png"
    rejected, inode = sha256(image), image.stat().st_ino
    decide(out, "rejected", "shot-3")

    def crash(self: versions_module.Moves) -> None:
        raise SystemExit("killed right after the commit")

    with monkeypatch.context() as patch:
        patch.setattr(versions_module.Moves, "finish", crash)
        with SqliteStore.open(out) as store, pytest.raises(SystemExit):
            make_plan(load_manifest(manifest), store)
    return CrashedMove(manifest, out, image, rejected, inode)


async def test_rejected_images_are_made_again_and_approved_ones_never_touched(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    images = {i: out / "images" / f"{i}.png" for i in IDS}
    before = {i: (sha256(p), p.stat().st_ino, p.stat().st_mtime_ns) for i, p in images.items()}
    decide(out, "rejected", "shot-1", "shot-3")
    decide(out, "approved", "shot-0")

    report = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 7 and report.plan.rejected == ["shot-1", "shot-3"]
    assert report.plan.done == 3 and not report.plan.edited
    for i in ("shot-1", "shot-3"):  # the old file kept as it was, a new one in its place
        kept = out / "rejected" / f"{i}.v1.png"
        assert (sha256(kept), kept.stat().st_ino) == before[i][:2]
        assert images[i].stat().st_ino != before[i][1]
    assert versions(out) == [
        ("shot-1", 1, "rejected/shot-1.v1.png", before["shot-1"][0], "rejected"),
        ("shot-3", 1, "rejected/shot-3.v1.png", before["shot-3"][0], "rejected"),
    ]
    for i in ("shot-0", "shot-2", "shot-4"):
        stat = images[i].stat()
        assert (sha256(images[i]), stat.st_ino, stat.st_mtime_ns) == before[i]

    table = results(out)
    assert list(table["version"]) == [1, 2, 1, 2, 1]
    assert list(table["review"]) == ["approved", *["unreviewed"] * 4]
    assert not table["edited"].any()
    assert table.loc["shot-1", "sha256"] == sha256(images["shot-1"])
    assert list(table["attempts"]) == [1, 2, 1, 2, 1]
    ledger = pd.read_csv(out / "ledger.csv")
    assert len(ledger) == 7 and round(ledger["cost_usd"].sum(), 2) == 0.21
    assert report.ledger is not None and report.ledger.totals.confirmed_usd == 0.21

    with SqliteStore.open_read_only(out) as store:
        (old,) = store.views().job_versions("shot-1")
    assert (old.version, old.review, old.reviewed_by) == (1, "rejected", "tester")

    third = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 7 and not third.plan.todo and not third.plan.rejected


async def test_an_edited_image_is_kept_and_noticed_once(tmp_path: Path, emulator: Emulator) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    image = out / "images" / "shot-2.png"
    generated = sha256(image)
    decide(out, "approved", "shot-2")
    retouch(image)
    edit = image.read_bytes()

    report = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 5 and not report.plan.todo
    assert report.plan.edited == ["shot-2"] and report.plan.done == 5
    assert image.read_bytes() == edit
    assert not (out / "edited").exists()
    assert versions(out) == [("shot-2", 1, None, generated, "edited")]
    row = results(out).loc["shot-2"]
    assert (row["version"], row["review"], bool(row["edited"])) == (2, "unreviewed", True)
    assert row["sha256"] == sha256(image) and (row["width"], row["height"]) == (1280, 544)
    assert results(out)["edited"].sum() == 1

    again = await run_manifest(manifest, out, emulator.base_url)
    assert (again.plan.edited, again.plan.rehashed, len(emulator.requests)) == ([], 0, 5)
    assert bool(results(out).loc["shot-2", "edited"])


async def test_redo_edited_moves_the_edits_aside_and_makes_them_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    """One edit noticed by an earlier run, one found by this one: both go to edited/."""
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    retouch(out / "images" / "shot-0.png")
    await run_manifest(manifest, out, emulator.base_url)  # noticed, kept: version 2
    retouch(out / "images" / "shot-4.png")
    edits = {i: sha256(out / "images" / f"{i}.png") for i in ("shot-0", "shot-4")}

    report = await run_with(manifest, out, emulator.base_url, redo_edited=True)
    assert report.plan.redo_edited == ["shot-0", "shot-4"] and not report.plan.edited
    assert len(emulator.requests) == 7
    for i, edit in edits.items():
        assert sha256(out / "edited" / f"{i}.v2.png") == edit
        assert sha256(out / "images" / f"{i}.png") != edit
    assert [(v[0], v[1], v[2], v[4]) for v in versions(out)] == [
        ("shot-0", 1, None, "edited"),
        ("shot-0", 2, "edited/shot-0.v2.png", "edited"),
        ("shot-4", 1, None, "edited"),
        ("shot-4", 2, "edited/shot-4.v2.png", "edited"),
    ]
    table = results(out)
    assert list(table["version"]) == [3, 1, 1, 1, 3] and not table["edited"].any()


async def test_a_changed_or_deleted_image_is_a_new_version(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    decide(out, "approved", "shot-0", "shot-1")
    old = sha256(out / "images" / "shot-0.png")
    (out / "images" / "shot-1.png").unlink()
    jobs = [{"id": i, "prompt": f"a picture of {i}", "size": "1280x544"} for i in IDS]
    jobs[0]["prompt"] = "another picture"
    manifest = write_manifest(tmp_path, jobs)

    report = await run_manifest(manifest, out, emulator.base_url)
    assert (report.plan.changed, report.plan.missing) == (["shot-0"], ["shot-1"])
    assert len(emulator.requests) == 7
    assert versions(out) == [
        ("shot-0", 1, "replaced/shot-0.v1.png", old, "changed"),
        ("shot-1", 1, None, db_rows(out, "SELECT sha256 FROM versions")[1][0], "missing"),
    ]
    assert sha256(out / "replaced" / "shot-0.v1.png") == old
    table = results(out)
    assert list(table["version"]) == [2, 2, 1, 1, 1]
    # the approval was of the old images: the new ones are not approved unseen
    assert list(table["review"])[:2] == ["unreviewed", "unreviewed"]


async def test_a_dry_run_counts_and_prices_without_moving_anything(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    decide(out, "rejected", "shot-1", "shot-3")
    retouch(out / "images" / "shot-2.png")
    before = folder_state(out)

    dry = await run_with(manifest, out, emulator.base_url, dry_run=True)
    assert folder_state(out) == before
    assert (dry.plan.rejected, dry.plan.edited) == (["shot-1", "shot-3"], ["shot-2"])
    assert [j.id for j in dry.plan.todo] == ["shot-1", "shot-3"]
    redo = await run_with(manifest, out, emulator.base_url, dry_run=True, redo_edited=True)
    assert folder_state(out) == before
    assert [j.id for j in redo.plan.todo] == ["shot-1", "shot-2", "shot-3"]
    assert (redo.plan.redo_edited, redo.plan.edited) == (["shot-2"], [])
    assert len(emulator.requests) == 5

    real = await run_manifest(manifest, out, emulator.base_url)
    assert (real.plan.rejected, real.plan.edited) == (dry.plan.rejected, dry.plan.edited)
    assert list(real.plan.todo) == list(dry.plan.todo)


async def test_a_crash_between_recording_a_version_and_moving_it(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version is committed, then the process dies before the file moves: the next run
    finds the old image in images/ as an unrecorded file of a pending job, and finishes the
    move instead of adopting it as the new image."""
    manifest, out, image, rejected, inode = await crash_before_the_move(
        tmp_path, emulator.base_url, monkeypatch
    )
    assert db_rows(out, "SELECT status, version FROM jobs WHERE job_id = 'shot-3'") == [
        ("pending", 2)
    ]
    assert versions(out) == [("shot-3", 1, "rejected/shot-3.v1.png", rejected, "rejected")]
    assert sha256(image) == rejected and not (out / "rejected").exists()

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.adopted == 0 and [j.id for j in report.plan.todo] == ["shot-3"]
    assert len(emulator.requests) == 6
    assert (out / "rejected" / "shot-3.v1.png").stat().st_ino == inode
    assert image.stat().st_ino != inode and results(out).loc["shot-3", "version"] == 2


def test_the_cli_counts_them_and_redoes_edits_on_request(tmp_path: Path) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    first = run_cli("run", manifest, "--out", out, "--emulate", "--no-progress")
    assert first.returncode == 0, first.stderr
    decide(out, "rejected", "shot-1")
    retouch(out / "images" / "shot-2.png")

    done = run_cli("run", manifest, "--out", out, "--emulate", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["versions"] == {
        "rejected_redone": 1,
        "edited_kept": 1,
        "edited_redone": 0,
        "unreadable_redone": 0,
    }
    assert summary["counts"]["requests"] == 1
    assert "1 rejected image made again" in done.stderr
    assert "1 image found edited by hand: kept in place" in done.stderr
    assert "--redo-edited makes it again" in done.stderr

    redo = run_cli("run", manifest, "--out", out, "--emulate", "--no-progress", "--redo-edited")
    assert redo.returncode == 0, redo.stderr
    assert "1 image edited by hand made again" in redo.stdout
    assert "1 request this run" in redo.stdout
    assert (out / "edited" / "shot-2.v2.png").is_file()
