"""The counts a Ray driver polls for its progress bar (:meth:`PostgresStore.queue_counts`, each
from a partial index or one row), the exact split of the jobs that left the queue into successes
and failures (:func:`runner.workers.ray.moved`), and workers ended from outside
(:meth:`PostgresStore.end_workers`: Ray actors their driver killed), on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from runner.errors import ApiError, ClaimLost, JobFailedError
from runner.jobs import Job
from runner.store import Outcome, SavedImage
from runner.store.postgres import PostgresStore
from runner.store.postgres.claims import QueueCounts
from runner.workers.ray import moved
from tests.conftest import planned_jobs

PRICE = 30_000


def refused(job: Job) -> ApiError:
    return JobFailedError("refused", job_id=job.id, status=400)


async def succeed(worker: PostgresStore, job: Job) -> None:
    attempt = await worker.begin_attempt(job)
    image = SavedImage(f"images/{job.id}.png", 8, 8, "0" * 64)
    await worker.record_success(job.id, attempt, Outcome("confirmed", PRICE), image)


async def fail(worker: PostgresStore, job: Job, outcome: Outcome) -> None:
    attempt = await worker.begin_attempt(job)
    await worker.record_failure(job.id, attempt, outcome, refused(job), retry_later=False)


def sql(store: PostgresStore, statement: str) -> None:
    with store.batch() as db:
        db.conn.execute(statement)


async def test_the_jobs_that_left_the_queue_split_exactly_into_successes_and_failures(
    open_worker: Callable[[], PostgresStore],
) -> None:
    worker = open_worker()
    jobs = planned_jobs(worker, 5)
    claims = worker.claim([])
    for _ in jobs:
        await anext(claims)
    # A first run failed j0 and j4; a rerun queues them again with the rest.
    await fail(worker, jobs[0], Outcome("none"))
    await fail(worker, jobs[4], Outcome("none"))
    worker.queue([jobs[0].id, jobs[4].id])
    start = worker.queue_counts()
    assert start == QueueCounts(5, 5, 2, 2, 0, 0)

    await succeed(worker, jobs[0])  # failed before, succeeds: failed - 1, failed_queued - 1
    await fail(worker, jobs[4], Outcome("none"))  # failed before, fails again: failed_queued - 1
    await fail(worker, jobs[1], Outcome("confirmed", PRICE))  # a billed failure: failed + 1
    await succeed(worker, jobs[2])
    await worker.begin_attempt(jobs[3])  # in flight: reserved on the budget, not spent
    now = worker.queue_counts()
    assert now == QueueCounts(1, 1, 2, 0, 1, 4 * PRICE)

    progress = moved(start, now, requests=5)
    assert (progress.succeeded, progress.failed, progress.in_flight) == (2, 2, 1)
    assert progress.confirmed_micro_usd == 3 * PRICE  # j0, j2 and j1's billed failure
    assert progress.requests == 5
    await claims.aclose()


async def test_workers_of_ended_processes_finish_and_their_requests_become_possible(
    open_worker: Callable[[], PostgresStore],
) -> None:
    """A worker of another process (here: its row says so) that its driver killed: its lease
    still runs, but it is marked finished at once, its attempt in flight a possible charge,
    its claims back in the queue; it may send nothing more. Another process's worker is left
    alone."""
    killed, alive = open_worker(), open_worker()
    jobs = planned_jobs(killed, 4)
    claims = killed.claim([])
    first = await anext(claims)
    await killed.begin_attempt(first)
    assert killed.worker_id is not None
    sql(
        killed,
        f"UPDATE workers SET host = 'node-b', pid = 4242 WHERE worker_id = {killed.worker_id}",
    )

    assert alive.end_workers([("node-b", 4242), ("node-c", 7)]) == 1
    assert alive.live_workers() == 1
    counts = alive.queue_counts()
    assert (counts.claimed, counts.in_flight, counts.committed_micro_usd) == (0, 0, PRICE)
    assert alive.views().status_facts().possible_micro_usd == PRICE  # type: ignore[union-attr]
    with pytest.raises(ClaimLost):
        await killed.begin_attempt(jobs[1])
    assert alive.end_workers([("node-b", 4242)]) == 0  # settled once
    await claims.aclose()
