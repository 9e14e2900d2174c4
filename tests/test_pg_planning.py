"""A PostgreSQL run as its planner and its joining workers see it (tests/services.py's
cluster): a worker never creates a run nobody planned, the plan marker, a named budget shared
by runs and capped by the planner only, the queue's counts and live workers for progress and
status, and the schema's second migration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from runner.errors import ApiError, JobFailedError, StoreError
from runner.jobs import Job
from runner.store import Outcome, SavedImage
from runner.store.postgres import PostgresStore, open_pg_store
from runner.store.postgres.claims import QueueCounts
from tests.conftest import make_job
from tests.services import PG_PASSWORD

PRICE = 30_000


def job(n: int) -> Job:
    return make_job(f"j{n:05d}", f"picture {n}")


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_S", "1.5")


@pytest.fixture
def opener(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    opened: list[PostgresStore] = []

    def make(out: Path, **kwargs: object) -> PostgresStore:
        opened.append(open_pg_store(pg_url, out, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def sql(store: PostgresStore, statement: str) -> list[tuple[object, ...]]:
    schema = store.conn.execute("SELECT current_schema()").fetchone()
    assert schema is not None
    with psycopg.connect(store.state_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema[0]}", image_runner')
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


def test_a_worker_joining_a_run_nobody_planned_is_told_so(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    with pytest.raises(
        StoreError, match=r"no run planned at .* plan it with `image-runner run`"
    ) as e:
        opener(tmp_path / "never-planned", create=False)
    assert PG_PASSWORD not in str(e.value)
    planner = opener(tmp_path / "out")
    joiner = opener(tmp_path / "out", create=False)
    assert not joiner.planned()  # created, its queue not made yet
    planner.plan_jobs([job(0)])
    planner.queue([job(0).id])
    assert joiner.planned() and planner.planned()


def test_runs_naming_one_budget_share_it_and_only_the_planner_caps_it(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    first = opener(tmp_path / "a", budget="team")
    second = opener(tmp_path / "b", budget="team")
    first.budget(2 * PRICE)
    for store in (first, second):
        store.plan_jobs([job(0)])
        store.queue([job(0).id])
    asyncio.run(first.begin_attempt(job(0)))
    asyncio.run(second.begin_attempt(job(0)))
    assert sql(first, "SELECT cap_micro_usd, committed_micro_usd FROM budgets WHERE name = 'team'")[
        0
    ] == (2 * PRICE, 2 * PRICE)
    joiner = opener(tmp_path / "a", create=False)
    assert joiner.budget(None).cap_micro_usd is None  # the database is the cap
    assert sql(first, "SELECT cap_micro_usd FROM budgets WHERE name = 'team'") == [(2 * PRICE,)]
    replanned = opener(tmp_path / "a", budget="team")
    replanned.budget(None)  # run without --max-cost: the cap stays as set
    assert sql(first, "SELECT cap_micro_usd FROM budgets WHERE name = 'team'") == [(2 * PRICE,)]
    replanned.budget(3 * PRICE)  # until a run sets it again
    assert sql(first, "SELECT cap_micro_usd FROM budgets WHERE name = 'team'") == [(3 * PRICE,)]
    rerun = opener(tmp_path / "a")  # without a name: the budget the run spends from
    assert sql(rerun, "SELECT budget FROM control") == [("team",)]
    own = opener(tmp_path / "a", budget=rerun.out_url)  # its own, named as it is
    assert sql(own, "SELECT budget FROM control") == [(own.out_url,)]


def test_a_rerun_without_budget_or_rpm_keeps_the_ones_the_run_has(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """Night 1 plans with --budget team --rpm 60; a rerun that adds jobs gives neither: the run
    stays on the shared budget (not its own, uncapped one) under the same ceiling."""
    out = tmp_path / "out"
    first = opener(out, worker=False, budget="team", rpm=60.0)
    assert sql(first, "SELECT budget, rpm FROM control") == [("team", 60.0)]
    rerun = opener(out, worker=False)
    assert sql(rerun, "SELECT budget, rpm FROM control") == [("team", 60.0)]
    assert rerun.ceiling_rpm(None) == 60.0
    changed = opener(out, worker=False, budget="other", rpm=30.0)
    assert sql(changed, "SELECT budget, rpm FROM control") == [("other", 30.0)]
    assert sql(changed, "SELECT name FROM budgets WHERE name = 'other'") == [("other",)]
    fresh = opener(tmp_path / "fresh", worker=False)
    fresh_url = sql(fresh, "SELECT out_url FROM locations WHERE out_url LIKE '%fresh'")[0][0]
    assert sql(fresh, "SELECT budget, rpm FROM control") == [(fresh_url, None)]


async def test_the_queue_counts_and_live_workers(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    worker = opener(tmp_path / "out")
    other = opener(tmp_path / "out", create=False)
    assert worker.live_workers() == 2
    jobs = [job(n) for n in range(4)]
    worker.plan_jobs(jobs)
    worker.queue([j.id for j in jobs])
    assert worker.queue_counts() == QueueCounts(4, 0, 0, 0, 0, 0)
    claims = worker.claim([])
    first, second = await anext(claims), await anext(claims)
    assert worker.queue_counts() == QueueCounts(4, 4, 0, 0, 0, 0)
    attempt = await worker.begin_attempt(first)
    image = SavedImage(f"images/{first.id}.png", 8, 8, "0" * 64)
    await worker.record_success(first.id, attempt, Outcome("confirmed", PRICE), image)
    attempt = await worker.begin_attempt(second)
    error: ApiError = JobFailedError("refused", job_id=second.id, status=400)
    await worker.record_failure(second.id, attempt, Outcome("none"), error, retry_later=False)
    assert worker.queue_counts() == QueueCounts(2, 2, 1, 0, 0, PRICE)
    await claims.aclose()
    other.close()
    assert worker.live_workers() == 1
    run_id = worker.start_run()
    assert sql(worker, f"SELECT pid, worker_id FROM runs WHERE run_id = {run_id}") == [
        (None, worker.worker_id)
    ]


async def test_a_job_a_worker_finished_after_it_was_planned_is_not_queued_again(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """A planning run computes its to-do, then queues it; a worker of the run may finish one
    of those jobs in between (seen at 2000 jobs with workers killed and restarted: 10 jobs
    succeeded and queued, so the queue never emptied)."""
    planner = opener(tmp_path / "out")
    worker = opener(tmp_path / "out", create=False)
    jobs = [job(n) for n in range(3)]
    planner.plan_jobs(jobs)
    planner.queue([j.id for j in jobs])
    claims = worker.claim([])
    first = await anext(claims)
    attempt = await worker.begin_attempt(first)
    image = SavedImage(f"images/{first.id}.png", 8, 8, "0" * 64)
    await worker.record_success(first.id, attempt, Outcome("confirmed", PRICE), image)
    await claims.aclose()
    planner.queue([j.id for j in jobs])  # a rerun's plan, made before that success
    counts = planner.queue_counts()
    assert (counts.queued, counts.claimed, counts.failed) == (2, 2, 0)
    assert sql(planner, "SELECT job_id FROM jobs WHERE queued ORDER BY job_id") == [
        (jobs[1].id,),
        (jobs[2].id,),
    ]


def test_a_run_at_the_first_schema_version_is_migrated(
    opener: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    old = opener(tmp_path / "out", worker=False)
    for statement in (
        "DELETE FROM migrations WHERE version >= 2",
        "ALTER TABLE control DROP COLUMN planned_at",
        "ALTER TABLE control DROP COLUMN rpm",
        "DROP INDEX jobs_failed",
        "CREATE INDEX attempts_state ON attempts (state)",
        "ALTER TABLE jobs RESET (fillfactor)",
    ):
        sql(old, statement)
    with pytest.raises(StoreError, match="older image-runner"):
        opener(tmp_path / "out", create=False)
    store = opener(tmp_path / "out", worker=False)
    assert not store.planned()
    assert sql(store, "SELECT to_regclass('attempts_state')") == [(None,)]
    options = sql(store, "SELECT reloptions FROM pg_class WHERE oid = 'jobs'::regclass")
    assert "fillfactor=80" in options[0][0]  # type: ignore[operator]
