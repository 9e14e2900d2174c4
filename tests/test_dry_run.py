"""Dry runs: they plan and price what the run then does, change nothing, create nothing, and
read a folder a live run is writing."""

from __future__ import annotations

from pathlib import Path

from runner.emulator import Emulator
from runner.manifest.load import load_manifest
from runner.store.sqlite import SqliteStore
from tests.conftest import (
    db_exec,
    dry_run,
    folder_state,
    mixed_manifest,
    run_manifest,
    write_manifest,
)


async def test_a_dry_run_changes_nothing_and_plans_what_the_run_then_does(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A folder after a crash: a leftover temp file, an attempt cut off in flight, an image
    written but not recorded, an altered image, a job changed in the manifest. The dry run
    repairs none of it, yet plans exactly what the run that follows does."""
    jobs = [
        {"id": job_id, "prompt": f"a {job_id}", "size": "1280x544"}
        for job_id in ("keep", "adopt", "alter", "change", "lost")
    ]
    out = tmp_path / "out"
    await run_manifest(write_manifest(tmp_path, jobs), out, emulator.base_url)
    for job_id in ("adopt", "lost"):  # crashes between the rename and the commit; in flight
        db_exec(
            out, "UPDATE jobs SET status = 'pending', sha256 = NULL WHERE job_id = ?", (job_id,)
        )
        db_exec(
            out,
            "UPDATE attempts SET state = 'in_flight', cost_micro_usd = 0 WHERE job_id = ?",
            (job_id,),
        )
    (out / "images" / "lost.png").unlink()
    altered = out / "images" / "alter.png"
    altered.write_bytes(altered.read_bytes() + b"\0")
    (out / "images" / ".tmp-0123456789ab-lost.png").write_bytes(b"half an image")
    (out / "images" / "lost.png.tmp-0123456789ab").write_bytes(b"half an image")
    jobs[3]["prompt"] = "a changed picture"
    manifest = write_manifest(tmp_path, [*jobs, {"id": "new", "prompt": "a new one"}])
    sent = len(emulator.requests)
    before = folder_state(out)

    planned = await dry_run(manifest, out, emulator.base_url)
    assert folder_state(out) == before
    assert len(emulator.requests) == sent
    assert (planned.ledger, planned.pool) == (None, None)
    dry = planned.plan
    assert [j.id for j in dry.todo] == ["change", "lost", "new"]
    assert (dry.done, dry.adopted, dry.edited, dry.changed) == (3, 1, ["alter"], ["change"])
    assert dry.in_flight_settled == 2
    # keep, alter and change, and adopt's attempt once its image is adopted; lost's possible
    assert dry.spent_micro_usd == (4 * 30_000, 30_000)

    report = await run_manifest(manifest, out, emulator.base_url)
    real = report.plan
    assert real.temp_files_removed == 2
    figures = [
        "todo_edits",
        "done",
        "failed",
        "adopted",
        "missing",
        "edited",
        "changed",
        "retried_failed",
        "in_flight_settled",
        "spent_micro_usd",
        "rehashed",
    ]
    assert [getattr(dry, f) for f in figures] == [getattr(real, f) for f in figures]
    assert list(dry.todo) == list(real.todo)
    assert len(emulator.requests) == sent + 3


async def test_a_dry_run_on_a_new_folder_creates_nothing(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "new" / "out"
    planned = await dry_run(mixed_manifest(tmp_path), out, emulator.base_url)
    assert not (tmp_path / "new").exists()
    assert (len(planned.plan.todo), planned.plan.todo_edits) == (5, 2)
    assert emulator.requests == []


async def test_a_dry_run_reads_a_folder_a_live_run_is_writing(
    tmp_path: Path, emulator: Emulator
) -> None:
    """It takes no lock, so a live run goes on undisturbed, and it reads what the run has
    committed to the WAL: a request in flight counts as a possible charge."""
    manifest = write_manifest(
        tmp_path, [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(3)]
    )
    out = tmp_path / "out"
    jobs = load_manifest(manifest)
    live = SqliteStore.open(out)
    try:
        live.plan_jobs(jobs)
        live.commit_intent(jobs[0])
        assert (out / "checkpoint.sqlite-wal").stat().st_size > 0
        before = folder_state(out)
        planned = await dry_run(manifest, out, emulator.base_url)
        after = folder_state(out)
    finally:
        live.close()
    # A reader may write to SQLite's shared-memory index (its mtime), nothing else.
    for state in (before, after):
        is_dir, size_bytes, _ = state["files"]["checkpoint.sqlite-shm"]
        state["files"]["checkpoint.sqlite-shm"] = (is_dir, size_bytes)
    assert after == before
    assert len(planned.plan.todo) == 3
    assert (planned.plan.in_flight_settled, planned.plan.spent_micro_usd) == (1, (0, 30_000))
    assert emulator.requests == []
