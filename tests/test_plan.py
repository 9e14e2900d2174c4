"""runner.core.plan against a real checkpoint and real files, without a server: batches, the stat
check that spares re-hashing finished images, and what a rerun finds intact or not.

Successes are recorded as the pool records them (an intent, the image written, the outcome), so
the plan sees exactly what a run leaves behind."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from runner.core import plan as plan_module
from runner.core.plan import IMAGES_DIR, Plan, make_plan
from runner.errors import JobFailedError, ServerError, StoreError
from runner.jobs import Job
from runner.store import Outcome, SavedImage
from runner.store.sqlite import SqliteStore
from tests.conftest import db_rows, folder_state, make_job


def job(n: int, prompt: str = "") -> Job:
    return make_job(f"j{n:02d}", prompt or f"picture {n}")


def png(color: str = "navy", compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1280, 544), color).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def finish(store: SqliteStore, j: Job, data: bytes | None = None) -> Path:
    """Record ``j`` as the pool does: intent, image durably written, then the outcome."""
    data = data or png()
    attempt = store.commit_intent(j)
    path = store.folder / IMAGES_DIR / f"{j.id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    image = SavedImage(f"{IMAGES_DIR}/{j.id}.png", 1280, 544, hashlib.sha256(data).hexdigest())
    store.commit_success(j.id, attempt, Outcome("confirmed", 30_000), image)
    return path


def fail(store: SqliteStore, j: Job, *, for_good: bool) -> None:
    attempt = store.commit_intent(j)
    error = (
        JobFailedError("refused", job_id=j.id, status=400, code="content_policy_violation")
        if for_good
        else ServerError("down", job_id=j.id, status=503)
    )
    store.commit_failure(j.id, attempt, Outcome("none"), error, retry_later=not for_good)


def plan_of(out: Path, jobs: list[Job], **kwargs: object) -> Plan:
    with SqliteStore.open(out) as store:
        return make_plan(jobs, store, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the plan hashes, in order."""
    calls: list[Path] = []
    real = plan_module.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(plan_module, "sha256_file", counting)
    return calls


def a_folder_in_every_state(out: Path) -> list[Job]:
    """Ten jobs: done, done then deleted, done then edited, failed for good, failed for now,
    an image written but not recorded (to adopt), pending, and three never planned."""
    jobs = [job(n) for n in range(10)]
    with SqliteStore.open(out) as store:
        make_plan(jobs[:7], store)
        for n in (0, 1, 2):
            finish(store, jobs[n])
        fail(store, jobs[3], for_good=True)
        fail(store, jobs[4], for_good=False)
        (out / IMAGES_DIR / f"{jobs[5].id}.png").write_bytes(png("olive"))  # crash before commit
    (out / IMAGES_DIR / f"{jobs[1].id}.png").unlink()
    altered = out / IMAGES_DIR / f"{jobs[2].id}.png"
    altered.write_bytes(altered.read_bytes() + b"\0")
    return jobs


def summary(plan: Plan) -> tuple[object, ...]:
    return (
        [j.id for j in plan.todo],
        plan.todo_edits,
        plan.done,
        plan.failed,
        plan.adopted,
        sorted(plan.missing),
        plan.edited,
        plan.changed,
        plan.rehashed,
    )


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batches_of_any_size_plan_the_same(tmp_path: Path, batch_size: int) -> None:
    reference, batched = tmp_path / "one-batch", tmp_path / "batched"
    jobs = a_folder_in_every_state(tmp_path / "made")
    for folder in (reference, batched):  # copies alike: their files' ctimes are new
        shutil.copytree(tmp_path / "made", folder)

    whole = plan_of(reference, jobs, batch_size=1000)
    small = plan_of(batched, jobs, batch_size=batch_size)

    assert summary(small) == summary(whole)
    assert [j.id for j in whole.todo] == ["j01", "j04", "j06", "j07", "j08", "j09"]
    assert (whole.done, whole.failed, whole.adopted) == (3, 1, 1)  # j00, j02, j05 adopted; j03
    assert (whole.missing, whole.edited) == (["j01"], ["j02"])
    assert whole.rehashed == 2  # j00 (intact, copied) and j02 (edited); j01 is gone
    assert (batched / IMAGES_DIR / "j02.png").is_file()  # edited: kept in place
    for folder in (reference, batched):
        rows = db_rows(folder, "SELECT job_id, status FROM jobs ORDER BY job_id")
        assert rows == [
            ("j00", "succeeded"),
            ("j01", "pending"),
            ("j02", "succeeded"),
            ("j03", "failed"),
            ("j04", "failed"),
            ("j05", "succeeded"),
            ("j06", "pending"),
            ("j07", "pending"),
            ("j08", "pending"),
            ("j09", "pending"),
        ]


def test_each_batch_is_one_transaction(tmp_path: Path) -> None:
    jobs = [job(n) for n in range(10)]
    with SqliteStore.open(tmp_path / "out") as store:
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        make_plan(jobs, store, batch_size=4)
        store.db.set_trace_callback(None)
    assert len(db_rows(tmp_path / "out", "SELECT * FROM jobs")) == 10
    # Settling attempts left in flight, then 3 batches (4 + 4 + 2 jobs).
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 1 + 3


def test_a_failing_batch_rolls_back_whole_and_earlier_batches_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(6)]
    with SqliteStore.open(out) as store:
        make_plan(jobs[:4], store)
        finish(store, jobs[3])
    (out / IMAGES_DIR / "j03.png").unlink()
    (out / IMAGES_DIR / "j03.png").mkdir()  # unreadable, not missing: the plan must stop

    with pytest.raises(StoreError, match="cannot read"), SqliteStore.open(out) as store:
        make_plan(jobs, store, batch_size=3)
    ids = [r[0] for r in db_rows(out, "SELECT job_id FROM jobs ORDER BY job_id")]
    assert ids == ["j00", "j01", "j02", "j03"]  # the second batch (j03-j05) left no trace


def test_a_rerun_hashes_no_intact_image(tmp_path: Path, hashed: list[Path]) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(5)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        for j in jobs:
            finish(store, j)
    again = plan_of(out, jobs, batch_size=2)
    assert (again.done, len(again.todo), again.rehashed) == (5, 0, 0)
    assert hashed == []


def test_a_touched_image_is_hashed_once_then_trusted_again(
    tmp_path: Path, hashed: list[Path]
) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(3)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        touched = [finish(store, j) for j in jobs][1]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

    first = plan_of(out, jobs)
    assert (first.done, first.rehashed, first.missing, first.edited) == (3, 1, [], [])
    assert hashed == [touched]
    second = plan_of(out, jobs)  # its new stat was recorded: no second hash
    assert (second.done, second.rehashed) == (3, 0)
    assert hashed == [touched]


def test_an_image_edited_keeping_its_size_and_mtime_is_noticed(
    tmp_path: Path, hashed: list[Path]
) -> None:
    """A tool that rewrites a file in place and puts its mtime back (``touch -r``, ``cp -p``,
    ``exiftool -P``) cannot put back its ctime: the image is hashed and found edited."""
    out = tmp_path / "out"
    jobs = [job(n) for n in range(2)]
    # Stored uncompressed, another colour is the same number of bytes (and still an image).
    generated, data = (png(color, compress_level=0) for color in ("navy", "olive"))
    assert len(generated) == len(data)
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        image, _ = (finish(store, j, generated) for j in jobs)
    before = image.stat()
    image.write_bytes(data)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    again = plan_of(out, jobs)
    assert again.edited == ["j00"] and not again.todo
    assert again.done == 2
    assert hashed == [image]
    assert image.read_bytes() == data


def test_a_deleted_image_is_made_again_without_hashing(tmp_path: Path, hashed: list[Path]) -> None:
    out = tmp_path / "out"
    jobs = [job(0)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        finish(store, jobs[0]).unlink()
    again = plan_of(out, jobs)
    assert again.missing == ["j00"] and len(again.todo) == 1
    assert hashed == []


def test_images_recorded_before_the_stat_columns_are_hashed_once(
    tmp_path: Path, hashed: list[Path]
) -> None:
    """A checkpoint from before migration 3 has no stat: the first run hashes every finished
    image (as every run used to) and records its stat; the next run hashes none."""
    out = tmp_path / "out"
    jobs = [job(n) for n in range(3)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        for j in jobs:
            finish(store, j)
    db = sqlite3.connect(out / "checkpoint.sqlite")
    with db:  # back to the schema of migration 2
        for column in ("image_size_bytes", "image_mtime_ns", "image_ctime_ns"):
            db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        db.execute("DELETE FROM migrations WHERE version = 3")
    db.close()

    with pytest.raises(StoreError, match="older"), SqliteStore.open_for_dry_run(out) as store:
        make_plan(jobs, store, dry_run=True)  # which cannot bring it up to date
    assert plan_of(out, jobs).rehashed == 3
    assert len(hashed) == 3
    assert plan_of(out, jobs).rehashed == 0
    assert len(hashed) == 3


def test_an_adopted_image_gets_its_stat_recorded(tmp_path: Path, hashed: list[Path]) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(4)]
    plan_of(out, jobs)
    (out / IMAGES_DIR / "j03.png").write_bytes(png())  # crash between rename and commit
    adopted = plan_of(out, jobs, batch_size=2)  # in the second batch
    assert adopted.adopted == 1 and [j.id for j in adopted.todo] == ["j00", "j01", "j02"]
    again = plan_of(out, jobs)
    assert (again.done, again.rehashed) == (1, 0)
    assert hashed == []


def test_an_image_of_a_job_not_in_the_manifest_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stray = out / IMAGES_DIR / "someone-else.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(png())
    result = plan_of(out, [job(0)])
    assert result.adopted == 0 and stray.is_file()


def test_changed_content_in_a_later_batch_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(5)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        for j in jobs:
            finish(store, j)
    edited = [*jobs[:4], job(4, "a different picture")]
    again = plan_of(out, edited, batch_size=2)
    assert again.changed == ["j04"] and [j.prompt for j in again.todo] == ["a different picture"]
    assert (out / "replaced" / "j04.v1.png").is_file()
    assert again.done == 4


def test_failed_for_good_are_skipped_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = [job(n) for n in range(4)]
    with SqliteStore.open(out) as store:
        make_plan(jobs, store)
        fail(store, jobs[1], for_good=True)
        fail(store, jobs[2], for_good=False)
    skipped = plan_of(out, jobs, batch_size=3)
    assert [j.id for j in skipped.todo] == ["j00", "j02", "j03"] and skipped.failed == 1
    retried = plan_of(out, jobs, batch_size=3, retry_failed=True)
    assert [j.id for j in retried.todo] == ["j00", "j01", "j02", "j03"]
    assert retried.retried_failed == ["j01"]
    narrowed = plan_of(out, jobs, retry_failed=True, only=frozenset({"server_error"}))
    assert narrowed.failed == 1 and narrowed.retried_failed == []


def test_the_todo_list_reads_jobs_from_the_manifest_as_needed(tmp_path: Path) -> None:
    jobs = [job(n, f"with an image {n}") if n % 2 else job(n) for n in range(7)]
    jobs = [
        make_job(j.id, j.prompt, images=(tmp_path / "ref.png",)) if n % 3 == 0 else j
        for n, j in enumerate(jobs)
    ]
    result = plan_of(tmp_path / "out", jobs, batch_size=2)
    assert len(result.todo) == 7 and result.todo_edits == 3
    assert list(result.todo) == jobs
    assert result.todo[2] == jobs[2] and result.todo[-1] == jobs[-1]
    assert result.todo[1:3] == jobs[1:3]


def test_an_unrecorded_image_whose_id_has_tmp_in_it_is_adopted(tmp_path: Path) -> None:
    """An id may contain ``.tmp-``: its image, written but not recorded, is adopted, not swept
    away as a temp file and paid for again."""
    out = tmp_path / "out"
    jobs = [make_job("shot.tmp-1", job(0).prompt), job(1)]
    plan_of(out, jobs)
    (out / IMAGES_DIR / "shot.tmp-1.png").write_bytes(png())  # crash between rename and commit
    again = plan_of(out, jobs)
    assert (again.adopted, again.temp_files_removed) == (1, 0)
    assert [j.id for j in again.todo] == ["j01"]
    assert (out / IMAGES_DIR / "shot.tmp-1.png").is_file()


def full_summary(plan: Plan) -> tuple[object, ...]:
    return (
        *summary(plan),
        plan.retried_failed,
        plan.in_flight_settled,
        plan.spent_micro_usd,
    )


@pytest.mark.parametrize("batch_size", [2, 1000])
def test_a_dry_run_plans_what_a_run_would_and_changes_nothing(
    tmp_path: Path, batch_size: int
) -> None:
    made = tmp_path / "made"
    jobs = a_folder_in_every_state(made)
    with SqliteStore.open(made) as store:
        store.commit_intent(jobs[6])  # cut off in flight
        store.commit_intent(jobs[5])  # j05's image was written, then the crash
    (made / IMAGES_DIR / ".tmp-0123456789ab-j07.png").write_bytes(b"half an image")
    (made / IMAGES_DIR / "j08.png.tmp-0123456789ab").write_bytes(b"half an image")
    edited = [job(0, "a different picture"), *jobs[1:]]  # j00 changed under the same id
    dry_folder, real_folder = tmp_path / "dry", tmp_path / "real"
    for folder in (dry_folder, real_folder):  # copies alike: their files' ctimes are new
        shutil.copytree(made, folder)
    before = folder_state(dry_folder)

    with SqliteStore.open_for_dry_run(dry_folder) as store:
        dry = make_plan(edited, store, dry_run=True, batch_size=batch_size)
    assert folder_state(dry_folder) == before
    real = plan_of(real_folder, edited, batch_size=batch_size)

    assert full_summary(dry) == full_summary(real)
    assert [j.id for j in dry.todo] == ["j00", "j01", "j04", "j06", "j07", "j08", "j09"]
    assert (dry.done, dry.failed, dry.adopted, dry.changed) == (2, 1, 1, ["j00"])
    assert (dry.missing, dry.edited) == (["j01"], ["j02"])
    assert dry.in_flight_settled == 2
    # j00-j02 confirmed, j05's attempt confirmed by its adoption, j06's possible
    assert dry.spent_micro_usd == (4 * 30_000, 30_000)
    assert (dry.temp_files_removed, real.temp_files_removed) == (0, 2)


def test_a_dry_run_of_a_folder_without_checkpoint_creates_nothing(tmp_path: Path) -> None:
    """With no checkpoint yet, every job is new, but an image found on disk would be adopted."""
    out = tmp_path / "out"
    (out / IMAGES_DIR).mkdir(parents=True)
    (out / IMAGES_DIR / "j01.png").write_bytes(png())
    jobs = [job(n) for n in range(3)]
    before = folder_state(out)
    with SqliteStore.open_for_dry_run(out) as store:
        dry = make_plan(jobs, store, dry_run=True)
    assert folder_state(out) == before
    assert [j.id for j in dry.todo] == ["j00", "j02"] and dry.adopted == 1

    nowhere = tmp_path / "nowhere"
    with SqliteStore.open_for_dry_run(nowhere) as store:
        dry = make_plan(jobs, store, dry_run=True)
    assert not nowhere.exists()
    assert len(dry.todo) == 3 and dry.spent_micro_usd == (0, 0)
