"""The Store contract on both backends: the same calls through the protocol, the same answers,
on a SQLite checkpoint and on a real PostgreSQL run (tests/services.py's cluster). And what is
PostgreSQL's own: every operation implemented, jobs rebuilt from their rows, the dry run, the
password never in an error."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from runner.errors import ApiError, JobFailedError, StoreError
from runner.jobs import Job
from runner.manifest.spool import restore
from runner.store import Outcome, SavedImage, SqliteStore, Store
from runner.store.base import ImageStat
from runner.store.postgres import (
    PostgresStore,
    open_pg_for_dry_run,
    open_pg_read_only,
    open_pg_store,
)
from runner.store.postgres.claims import JOB_COLUMNS, job_of
from tests.conftest import make_job
from tests.services import PG_PASSWORD
from tests.test_store import protocol_operations

PRICE = 30_000


def job(n: int, prompt: str = "") -> Job:
    return make_job(f"j{n:05d}", prompt or f"picture {n}")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore.open(tmp_path / "out")
    else:
        opened = open_pg_store(request.getfixturevalue("pg_url"), tmp_path / "out")
    try:
        yield opened
    finally:
        opened.close()


def image(n: int) -> SavedImage:
    return SavedImage(f"images/j{n:05d}.png", 64, 32, f"{n:064x}", ImageStat(10, 20, 30))


async def test_a_job_goes_from_intent_to_success(store: Store) -> None:
    store.plan_jobs([job(1), job(2)])
    attempt = await store.begin_attempt(job(1))
    assert attempt == 1
    assert store.in_flight_count() == 1
    await store.record_success(job(1).id, attempt, Outcome("confirmed", PRICE), image(1))
    records = store.job_records([job(1).id, job(2).id, "nope"])
    assert set(records) == {job(1).id, job(2).id}
    done = records[job(1).id]
    assert (done.status, done.sha256, done.image_stat) == ("succeeded", f"{1:064x}", (10, 20, 30))
    assert (done.version, done.review, done.has_metadata) == (1, "unreviewed", True)
    assert records[job(2).id].status == "pending"
    assert store.finished_images([job(1).id, job(2).id]) == {"images/j00001.png"}
    assert store.spend_micro_usd() == (PRICE, 0)
    assert store.in_flight_count() == 0


async def test_a_failure_is_recorded_with_its_outcome(store: Store) -> None:
    store.plan_jobs([job(1)])
    attempt = await store.begin_attempt(job(1))
    error: ApiError = JobFailedError("refused", job_id=job(1).id, status=400)
    await store.record_failure(
        job(1).id, attempt, Outcome("none", error="refused"), error, retry_later=True
    )
    record = store.job_records([job(1).id])[job(1).id]
    assert (record.status, record.retryable) == ("failed", 1)
    assert store.spend_micro_usd() == (0, 0)
    assert await store.begin_attempt(job(1)) == 2


async def test_what_was_left_in_flight_becomes_a_possible_charge(store: Store) -> None:
    store.plan_jobs([job(1)])
    await store.begin_attempt(job(1))
    await store.drain()
    assert store.settle_in_flight() == 1
    assert store.spend_micro_usd() == (0, PRICE)
    assert store.adoption_charge(job(1).id) == ("possible", PRICE)
    store.adopt(job(1).id, image(1))
    assert store.spend_micro_usd() == (PRICE, 0)
    assert store.job_records([job(1).id])[job(1).id].status == "succeeded"
    assert store.adoption_charge(job(1).id) is None


async def test_a_changed_job_starts_over_and_an_unchanged_one_is_kept(store: Store) -> None:
    store.plan_jobs([job(1), job(2)])
    attempt = await store.begin_attempt(job(1))
    await store.record_success(job(1).id, attempt, Outcome("confirmed", PRICE), image(1))
    attempt = await store.begin_attempt(job(2))
    await store.record_success(job(2).id, attempt, Outcome("confirmed", PRICE), image(2))
    store.plan_jobs([job(1), job(2, "another picture")])
    records = store.job_records([job(1).id, job(2).id])
    assert [records[j].status for j in (job(1).id, job(2).id)] == ["succeeded", "pending"]


async def test_versions_are_retired_moved_and_edits_kept(store: Store) -> None:
    store.plan_jobs([job(1), job(2)])
    for n in (1, 2):
        attempt = await store.begin_attempt(job(n))
        await store.record_success(job(n).id, attempt, Outcome("confirmed", PRICE), image(n))
    store.retire_image(job(1).id, "rejected", "rejected/j00001.v1.png")
    store.record_edit(job(2).id, "e" * 64, ImageStat(1, 2, 3), (64, 32))
    (kept,) = store.unmoved_versions()
    assert (kept.job_id, kept.version, kept.image_path) == (job(1).id, 1, "rejected/j00001.v1.png")
    store.mark_moved([(job(1).id, 1)])
    assert store.unmoved_versions() == []
    records = store.job_records([job(1).id, job(2).id])
    assert (records[job(1).id].status, records[job(1).id].version) == ("pending", 2)
    edited = records[job(2).id]
    assert (edited.status, edited.version, edited.sha256) == ("succeeded", 2, "e" * 64)
    assert edited.edited_at is not None
    store.record_image_stat(job(2).id, ImageStat(4, 5, 6))
    assert store.job_records([job(2).id])[job(2).id].image_stat == (4, 5, 6)


def test_runs_are_recorded(store: Store) -> None:
    run_id = store.start_run()
    store.finish_run(run_id, "finished")
    assert store.start_run() > run_id


def test_metadata_is_recorded_for_older_jobs(store: Store) -> None:
    store.plan_jobs([job(1)])
    store.record_metadata([job(1)])
    assert store.job_records([job(1).id])[job(1).id].has_metadata


# --- PostgreSQL's own ---------------------------------------------------------------------------


def test_the_postgres_store_implements_every_operation_of_the_protocol() -> None:
    for name in protocol_operations():
        declared = inspect.getattr_static(Store, name)
        if isinstance(declared, property):
            continue
        implemented = inspect.getattr_static(PostgresStore, name, None)
        assert implemented is not None, name
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(declared), (
            name
        )
        assert inspect.isasyncgenfunction(implemented) == inspect.isasyncgenfunction(
            getattr(SqliteStore, name)
        ), name


def test_a_worker_rebuilds_every_job_from_its_row(pg_url: str, tmp_path: Path) -> None:
    edit = make_job("edit", "make it blue", size="auto", images=(tmp_path / "ref.png",))
    plain = job(2)
    fields = [getattr(plain, f.name) for f in dataclasses.fields(Job)][:7]
    matrix = restore(*fields, "row 3", "style=ink #2", (("style", "ink"), ("n", 2)), 2, "a {style}")
    jobs = [job(1), edit, matrix]
    with open_pg_store(pg_url, tmp_path) as store:
        store.plan_jobs(jobs)
        rows = store.conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq").fetchall()
    assert [job_of(row) for row in rows] == jobs


def test_planning_a_million_rows_goes_in_batches(pg_url: str, tmp_path: Path) -> None:
    jobs = [job(n) for n in range(12_000)]
    with open_pg_store(pg_url, tmp_path) as store:
        store.plan_jobs(iter(jobs))
        records = store.job_records([j.id for j in jobs])
    assert len(records) == 12_000


def test_the_dry_run_changes_nothing(pg_url: str, tmp_path: Path) -> None:
    with open_pg_for_dry_run(pg_url, tmp_path) as store:  # a run the database does not hold
        assert store.job_records([job(1).id]) == {}
        assert store.spend_micro_usd() == (0, 0)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regnamespace('image_runner')").fetchone() == (None,)
    with open_pg_store(pg_url, tmp_path, worker=False) as store:
        store.plan_jobs([job(1)])
    with open_pg_for_dry_run(pg_url, tmp_path) as store:
        assert set(store.job_records([job(1).id])) == {job(1).id}
        with pytest.raises(StoreError, match="read-only transaction"):
            store.plan_jobs([job(2)])


def test_store_errors_never_show_the_password(pg_url: str, tmp_path: Path) -> None:
    with open_pg_store(pg_url, tmp_path, worker=False) as store:
        store.plan_jobs([job(1)])
        store.conn.execute("DROP TABLE attempts")
        failures = []
        for call in (
            store.spend_micro_usd,
            store.in_flight_count,
            lambda: store.adoption_charge(job(1).id),
            store.settle_in_flight,
        ):
            with pytest.raises(StoreError) as caught:
                call()
            failures.append(str(caught.value))
    assert all("postgres:***@127.0.0.1" in text and PG_PASSWORD not in text for text in failures)
    assert any('relation "attempts" does not exist' in text for text in failures)
    with pytest.raises(StoreError) as caught:
        open_pg_read_only(pg_url, tmp_path / "elsewhere")
    assert PG_PASSWORD not in str(caught.value)
