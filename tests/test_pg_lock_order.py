"""The order a PostgreSQL run's writes take their row locks in: an attempt's row before its
job's, by every writer (an attempt's end with the job's success or failure, adoption, settling),
so that two of them on one job wait for each other in turn instead of deadlocking. Found by a
review: the one-statement end of an attempt locked the job first, and a re-plan adopting the
job's image at that moment (attempt, then job) made PostgreSQL abort one of them."""

from __future__ import annotations

import asyncio
import time

import psycopg

from runner.errors import ApiError, JobFailedError
from runner.store import Outcome
from runner.store.postgres import PostgresStore
from tests.conftest import planned_jobs

WAITING = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
)


async def test_an_attempts_end_locks_the_attempt_before_the_job(
    open_worker: object,
) -> None:
    worker: PostgresStore = open_worker()  # type: ignore[operator]
    planned_jobs(worker, 1)
    claims = worker.claim([])
    job = await anext(claims)
    attempt = await worker.begin_attempt(job)
    schema = worker.conn.execute("SELECT current_schema()").fetchone()
    assert schema is not None
    with psycopg.connect(worker.state_url) as adopter:  # adoption's order: attempt, then job
        # This session is the one PostgreSQL aborts if the locks make a cycle: its deadlock
        # check runs first.
        adopter.execute("SET deadlock_timeout = '10ms'")
        adopter.execute(f'SET search_path TO "{schema[0]}"')
        adopter.execute(
            "SELECT 1 FROM attempts WHERE job_id = %s AND attempt = %s FOR UPDATE",
            (job.id, attempt),
        )
        error: ApiError = JobFailedError("refused", job_id=job.id, status=400)
        ending = asyncio.ensure_future(
            worker.record_failure(job.id, attempt, Outcome("none"), error, retry_later=False)
        )
        deadline = time.monotonic() + 20
        while adopter.execute(WAITING).fetchone() != (1,):  # the end waits on the attempt
            assert time.monotonic() < deadline, "the attempt's end never waited for its row"
            await asyncio.sleep(0.02)
        # The job's row is free: the end waits on the attempt without holding the job.
        adopter.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", (job.id,))
        adopter.commit()
    await ending
    await claims.aclose()
    record = worker.job_records([job.id])[job.id]
    assert record.status == "failed"
