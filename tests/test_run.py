"""The core run end to end against the emulator: both endpoints and formats, the checkpoint,
resume, and the ledger against the emulator's own billing record."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import pandas as pd
import pytest
from PIL import Image

from runner.core.lifecycle import Run
from runner.core.pool import Pool
from runner.core.retry import RetryConfig
from runner.emulator import Emulator
from runner.errors import OutputLockedError, StoreError
from runner.http.client import ImageResult, ImagesClient
from runner.images.files import is_temp_name, temp_path_for
from runner.jobs import Job
from runner.manifest.load import load_manifest
from runner.store.sqlite import SqliteStore
from tests.conftest import (
    MakeEmulator,
    db_exec,
    db_rows,
    dry_run,
    make_job,
    make_ref,
    mixed_manifest,
    options,
    run_manifest,
    write_manifest,
)


async def test_both_endpoints_both_formats(tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out"
    report = await run_manifest(mixed_manifest(tmp_path), out, emulator.base_url)

    results = pd.read_parquet(out / "results.parquet")
    assert list(results["status"]) == ["succeeded"] * 5
    assert report.ledger.totals.succeeded == 5
    by_id = results.set_index("job_id")
    for job_id, size in [
        ("gen-b64", (1280, 720)),
        ("gen-url", (848, 1280)),
        ("edit-three", (2048, 1152)),
    ]:
        path = out / by_id.loc[job_id, "image_path"]
        with Image.open(path) as image:
            assert image.size == size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == by_id.loc[job_id, "sha256"]
    # size=auto follows the 48x64 (3:4) reference.
    assert (by_id.loc["edit-auto-url", "width"], by_id.loc["edit-auto-url", "height"]) == (
        960,
        1280,
    )
    derived = [i for i in results["job_id"] if i.startswith("a-fox-without-an-id-")]
    assert len(derived) == 1

    edits = [r for r in emulator.requests if r.endpoint == "edits"]
    three = next(r for r in edits if r.image_count == 3)
    assert three.image_part_names == ("image", "image", "image")
    formats = {r.prompt: r.response_format for r in emulator.requests}
    assert formats["a red fox"] == "b64_json" and formats["a blue fox"] == "url"
    assert "Modify image1: make it blue" in formats

    ledger = pd.read_csv(out / "ledger.csv")
    assert len(ledger) == 5 and set(ledger["billing"]) == {"confirmed"}
    assert round(ledger["cost_usd"].sum(), 2) == emulator.billed_usd == 0.15
    # usage is recorded when the API sends it (edits).
    edit_rows = ledger[ledger["endpoint"] == "edits"]
    assert edit_rows["total_tokens"].notna().all()


async def test_rerun_of_finished_run_sends_nothing(tmp_path: Path, emulator: Emulator) -> None:
    manifest, out = mixed_manifest(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    sent = len(emulator.requests)
    report = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == sent
    assert report.plan.done == 5 and not report.plan.todo
    assert report.ledger.totals.confirmed_usd == 0.15


async def test_deleted_image_is_redone_an_edited_one_kept(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = mixed_manifest(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    (out / "images" / "gen-b64.png").unlink()
    altered = out / "images" / "gen-url.png"
    altered.write_bytes(altered.read_bytes() + b"\0")
    sent = len(emulator.requests)

    report = await run_manifest(manifest, out, emulator.base_url)
    assert (report.plan.missing, report.plan.edited) == (["gen-b64"], ["gen-url"])
    assert len(emulator.requests) == sent + 1
    results = pd.read_csv(out / "results.csv").set_index("job_id")
    for job_id in ("gen-b64", "gen-url"):
        data = (out / results.loc[job_id, "image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == results.loc[job_id, "sha256"]


async def test_image_on_disk_without_outcome_is_adopted(tmp_path: Path, emulator: Emulator) -> None:
    """A crash between the rename and the commit: the image is there, the row says in flight."""
    manifest, out = mixed_manifest(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    db_exec(out, "UPDATE jobs SET status = 'pending', sha256 = NULL WHERE job_id = 'gen-b64'")
    db_exec(
        out, "UPDATE attempts SET state = 'in_flight', cost_micro_usd = 0 WHERE job_id = 'gen-b64'"
    )
    sent = len(emulator.requests)

    report = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == sent
    assert report.plan.adopted == 1
    assert db_rows(out, "SELECT state FROM attempts WHERE job_id = 'gen-b64'") == [("confirmed",)]
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.15
    assert report.ledger.totals.possible_usd == 0


async def test_attempt_left_in_flight_becomes_possible_charge(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A crash while a request was out: no image, so the job is redone and the lost attempt is
    counted as possibly billed."""
    manifest, out = mixed_manifest(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    (out / "images" / "gen-b64.png").unlink()
    db_exec(out, "UPDATE jobs SET status = 'pending', sha256 = NULL WHERE job_id = 'gen-b64'")
    db_exec(
        out, "UPDATE attempts SET state = 'in_flight', cost_micro_usd = 0 WHERE job_id = 'gen-b64'"
    )
    temp_path_for(out / "images" / "gen-b64.png").write_bytes(b"half an image")

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.in_flight_settled == 1
    assert report.plan.temp_files_removed == 1
    assert not [p for p in (out / "images").iterdir() if is_temp_name(p.name)]
    ledger = pd.read_csv(out / "ledger.csv")
    rows = ledger[ledger["job_id"] == "gen-b64"].sort_values("attempt")
    assert list(rows["billing"]) == ["possible", "confirmed"]
    assert list(rows["attempt"]) == [1, 2]
    assert report.ledger.totals.possible_usd == 0.03


async def test_changed_job_under_same_id_is_redone(tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "one", "prompt": "a cat", "size": "1280x720"}])
    await run_manifest(manifest, out, emulator.base_url)
    manifest = write_manifest(tmp_path, [{"id": "one", "prompt": "a dog", "size": "1280x544"}])
    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.changed == ["one"]
    assert [r.prompt for r in emulator.requests] == ["a cat", "a dog"]
    with Image.open(out / "images" / "one.png") as image:
        assert image.size == (1280, 544)
    assert (out / "replaced" / "one.v1.png").is_file()


async def test_reordered_and_extended_manifest_only_runs_new_jobs(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    first = [{"prompt": f"prompt {i}", "size": "1280x544"} for i in range(4)]
    await run_manifest(write_manifest(tmp_path, first), out, emulator.base_url)
    second = [*reversed(first), {"prompt": "prompt new", "size": "1280x544"}]
    await run_manifest(write_manifest(tmp_path, second), out, emulator.base_url)
    assert [r.prompt for r in emulator.requests][4:] == ["prompt new"]


async def test_second_run_on_same_folder_is_refused(tmp_path: Path, emulator: Emulator) -> None:
    manifest, out = mixed_manifest(tmp_path), tmp_path / "out"
    holder = SqliteStore.open(out)
    try:
        with pytest.raises(OutputLockedError, match="in use by another"):
            await run_manifest(manifest, out, emulator.base_url)
    finally:
        holder.close()
    assert emulator.requests == []


async def test_concurrency_is_bounded(tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = await make_emulator(latency_s=0.05)
    jobs = [{"prompt": f"p{i}", "size": "1280x544"} for i in range(12)]
    run = Run(
        load_manifest(write_manifest(tmp_path, jobs)),
        options(tmp_path / "out", emulator.base_url, concurrency=3),
    )
    await run.execute()
    # In flight as the server saw them (progress reports are too few to see every peak):
    # an answer is recorded before it is sent, so the next request arrives after it.
    events = sorted(
        [(r.received_at, 1) for r in emulator.requests]
        + [(r.answered_at, -1) for r in emulator.requests]
    )
    in_flight = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(in_flight) == 3
    assert len(emulator.requests) == 12


async def test_unwritable_images_folder_stops_the_run_and_counts_the_charge(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "a", "size": "1280x544"}])
    (out / "images").mkdir(parents=True)
    (out / "images" / "a.png").mkdir()  # the final name is taken by a folder: rename fails
    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.stop_reason is not None and "cannot write images" in report.stop_reason
    assert report.ledger.totals.pending == 1
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.03


async def test_an_unexpected_error_costs_one_attempt_not_the_run(tmp_path: Path) -> None:
    """A bug-shaped exception in one request is a possible charge for that attempt; the other
    jobs go on and the job is retried."""
    out = tmp_path / "out"
    jobs = load_manifest(
        write_manifest(
            tmp_path, [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(3)]
        )
    )
    calls: list[str] = []

    class Flaky:
        async def create(self, job: Job, folder: Path) -> ImageResult:
            calls.append(job.id)
            if job.id == "j1" and calls.count("j1") == 1:
                raise RecursionError("maximum recursion depth exceeded")
            buffer = io.BytesIO()
            Image.new("RGB", (1280, 544), "navy").save(buffer, format="PNG")
            tmp = temp_path_for(folder / f"{job.id}.part")
            tmp.write_bytes(buffer.getvalue())
            return ImageResult(tmp, len(buffer.getvalue()), None)

    store = SqliteStore.open(out)
    try:
        pool = Pool(
            Flaky(),
            store,
            out / "images",
            concurrency=2,
            retry=RetryConfig(backoff_initial_s=0.001),
        )
        result = await pool.run(jobs)
    finally:
        store.close()
    rows = db_rows(out, "SELECT job_id, attempt, state FROM attempts ORDER BY job_id, attempt")
    assert result.stop_reason is None and result.progress.succeeded == 3
    assert not [p for p in (out / "images").iterdir() if is_temp_name(p.name)]
    assert [tuple(r) for r in rows if r[0] == "j1"] == [
        ("j1", 1, "possible"),
        ("j1", 2, "confirmed"),
    ]


async def test_reference_deleted_after_validation_fails_the_job_unbilled(
    tmp_path: Path, emulator: Emulator
) -> None:
    ref = make_ref(tmp_path / "refs", "r.png")
    manifest = write_manifest(
        tmp_path,
        [
            {"id": "edit", "prompt": "edit image1", "images": ["refs/r.png"]},
            {"id": "plain", "prompt": "plain", "size": "1280x544"},
        ],
    )
    jobs = load_manifest(manifest)
    ref.unlink()
    report = await Run(jobs, options(tmp_path / "out", emulator.base_url)).execute()
    assert report.stop_reason is None
    assert db_rows(
        tmp_path / "out", "SELECT status, error_cause FROM jobs WHERE job_id='edit'"
    ) == [("failed", "reference_unreadable")]
    assert report.ledger.totals.succeeded == 1
    assert report.ledger.totals.confirmed_usd == emulator.billed_usd == 0.03
    assert report.ledger.totals.possible_usd == 0


async def test_every_replaced_version_is_kept(tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out"
    for prompt in ("version A", "version B", "version C"):
        manifest = write_manifest(tmp_path, [{"id": "x", "prompt": prompt, "size": "1280x544"}])
        await run_manifest(manifest, out, emulator.base_url)
    kept = sorted((out / "replaced").iterdir())
    assert len(kept) == 2
    prompts = {Image.open(p).text["prompt"] for p in kept}  # type: ignore[attr-defined]
    assert prompts == {"version A", "version B"}


async def test_an_unreadable_finished_image_stops_instead_of_paying_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "a", "size": "1280x544"}])
    await run_manifest(manifest, out, emulator.base_url)
    (out / "images" / "a.png").unlink()
    (out / "images" / "a.png").mkdir()  # reading it fails, but it is not "missing"
    with pytest.raises(StoreError, match="cannot read"):
        await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 1
    # Recorded with its error, not as a finished run.
    [(outcome,)] = db_rows(out, "SELECT outcome FROM runs WHERE run_id = 2")
    assert "cannot read" in outcome


async def test_an_id_with_tmp_in_it_is_paid_for_once(tmp_path: Path, emulator: Emulator) -> None:
    """The start-up sweep took ``images/shot.tmp-1.png`` for a temp file a crash left, so every
    run, dry runs included, deleted the image and the next run paid for it again."""
    ids = ["shot.tmp-1", "a.tmp-123456789abc", "b.part.tmp-0123456789ab"]
    manifest = write_manifest(
        tmp_path, [{"id": i, "prompt": f"a picture of {i}", "size": "1280x544"} for i in ids]
    )
    out = tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 3

    planned = await dry_run(manifest, out, emulator.base_url)
    assert (planned.plan.done, len(planned.plan.todo)) == (3, 0)
    again = await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == 3
    assert (again.plan.done, again.plan.temp_files_removed) == (3, 0)
    assert again.ledger.totals.confirmed_usd == emulator.billed_usd == 0.09
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in ids)


async def test_temp_files_of_every_kind_are_swept_and_the_images_kept(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest = write_manifest(tmp_path, [{"id": "shot.tmp-1", "prompt": "a", "size": "1280x544"}])
    out, images = tmp_path / "out", tmp_path / "out" / "images"
    await run_manifest(manifest, out, emulator.base_url)
    # A download the crash cut off before it was saved, as the client names it ...
    async with ImagesClient(options(out, emulator.base_url).client) as client:
        crashed = await client.create(load_manifest(manifest)[0], images)
    # ... and what write_atomic and the results leave, named now and by earlier versions.
    written = [
        images / ".tmp-0123456789ab-shot.tmp-1.png",
        images / "shot.tmp-1.png.tmp-0123456789ab",
        images / "shot.tmp-1.part.tmp-0123456789ab",
        out / ".tmp-0123456789ab-results.csv",
        out / ".results.csv.tmp-01234567",
    ]
    for path in written:
        path.write_bytes(b"half a file")
    sent = len(emulator.requests)

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.temp_files_removed == 1 + len(written)
    assert not [p for p in [crashed.path, *written] if p.exists()]
    assert [p.name for p in images.iterdir()] == ["shot.tmp-1.png"]
    assert len(emulator.requests) == sent and report.plan.done == 1


async def test_a_cancelled_run_writes_its_books_then_passes_the_cancel_on(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    """Cancelling execute() (a timeout, a Ctrl-C under a bare asyncio.run) stops the run at
    once, but only after its books are written and its folder released; and the cancel is
    passed on, not swallowed, so that the timeout is seen."""
    emulator = await make_emulator(latency_s=2.0)
    out = tmp_path / "out"
    jobs = [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(4)]
    run = Run(
        load_manifest(write_manifest(tmp_path, jobs)),
        options(out, emulator.base_url, concurrency=2),
    )
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await run.execute()
    ledger = pd.read_csv(out / "ledger.csv")
    assert list(ledger["billing"]) == ["possible", "possible"]  # the two dropped in flight
    assert len(pd.read_csv(out / "results.csv")) == 4
    SqliteStore.open(out).close()  # the folder is free again


class _ManyJobs(Sequence[Job]):
    """A large manifest, made as it is read; ``read`` is set once planning starts reading it."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.read = threading.Event()

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | Sequence[Job]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        return make_job(f"j{index}", f"p{index}")

    def __iter__(self) -> Iterator[Job]:
        self.read.set()
        for index in range(self.count):
            yield self[index]


async def test_a_dry_run_of_a_large_manifest_is_stopped_at_once(tmp_path: Path) -> None:
    """Ctrl-C cancels the dry run's task: planning, in a thread, ends at its next job; a dry
    run planned on the event loop would only hear it once the whole plan was made."""
    out = tmp_path / "out"
    jobs = _ManyJobs(2_000_000)
    plans: list[object] = []
    opts = dataclasses.replace(options(out, "http://127.0.0.1:9/v1"), dry_run=True)
    task = asyncio.create_task(Run(jobs, opts, on_plan=plans.append).execute())
    assert await asyncio.to_thread(jobs.read.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert plans == []
    assert not out.exists()
