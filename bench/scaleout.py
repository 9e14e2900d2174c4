"""Scale-out: a 1,000,000-job run planned into PostgreSQL and claimed by several workers.

What the README's arithmetic for 10 million jobs rests on, measured on a PostgreSQL cluster the
benchmark starts itself (``initdb`` in a temp folder, as the tests do; ``fsync`` on, unlike the
tests' cluster, so that commits cost what they cost):

* **plan**: the manifest (a CSV of distinct prompts) validated and planned into the run's
  tables, and its to-do queued: time, rows, and the database's size afterwards.
* **claim**: ``WORKERS`` worker processes claim every queued job (``FOR UPDATE SKIP LOCKED``,
  batches, leases) and record for each the attempt's intent and its success, as a pool does
  around a request, ``CONCURRENCY`` jobs at a time each, with no request sent: the database's
  share of a job's cost. Jobs per second over all workers, and duplicates (must be 0).

``python -m bench.scaleout worker STATE OUT CONCURRENCY`` is one worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.figures import Options, Row, say
from bench.manifests import write_csv
from runner.jobs import Job

WORKERS = 4
CONCURRENCY = 32
TARGET_CLAIMS_PER_S = 1000.0  # 10M jobs claimed and recorded in under 3 hours of database time
PRICE_MICRO_USD = 30_000


def measure(options: Options) -> list[Row]:
    from tests.services import start_postgres

    jobs = 100_000 if options.quick else 1_000_000
    manifest = write_csv(options.work_dir / "scaleout.csv", jobs, "1280x544", distinct_prompts=True)
    with start_postgres(durable=True) as server:
        state = server.new_database()
        out = options.work_dir / "scaleout-out"
        plan_s = _plan(state, out, manifest)
        size_mb = _database_mb(state)
        say(f"  planned and queued {jobs:,} jobs in {plan_s:.1f} s; database {size_mb:.0f} MB")
        started = time.perf_counter()
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.scaleout",
                    "worker",
                    state,
                    str(out),
                    str(CONCURRENCY),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(WORKERS)
        ]
        done = [int((w.communicate()[0] or "0").strip() or 0) for w in workers]
        claim_s = time.perf_counter() - started
        duplicates = sum(done) - jobs
        final_mb = _database_mb(state)
    rate = jobs / claim_s
    say(
        f"  {WORKERS} workers: {sum(done):,} jobs in {claim_s:.1f} s ({rate:.0f}/s); "
        f"{final_mb:.0f} MB"
    )
    return [
        Row(
            f"scale-out: plan {jobs:,} jobs into PostgreSQL",
            f"{plan_s:.1f} s, {size_mb:.0f} MB",
            "",
            None,
        ),
        Row(
            f"scale-out: {WORKERS} workers claim + record {jobs:,} jobs",
            f"{rate:.0f} jobs/s, {duplicates} duplicates, {final_mb:.0f} MB",
            f">= {TARGET_CLAIMS_PER_S:.0f}/s, 0",
            rate >= TARGET_CLAIMS_PER_S and duplicates == 0,
        ),
    ]


def _plan(state: str, out: Path, manifest: Path) -> float:
    from runner.core.plan import make_plan
    from runner.manifest import load_manifest
    from runner.store.postgres import open_pg_store

    started = time.perf_counter()
    jobs = load_manifest(manifest)
    with contextlib.closing(open_pg_store(state, out, worker=False)) as store:
        plan = make_plan(jobs, store)
        store.queue([job.id for job in plan.todo])
    return time.perf_counter() - started


def _database_mb(state: str) -> float:
    import psycopg

    with psycopg.connect(state) as db:
        row = db.execute("SELECT pg_database_size(current_database())").fetchone()
    return (row[0] if row else 0) / 1e6


async def _work(state: str, out: Path, concurrency: int) -> int:
    """Claim until the run is done, ``concurrency`` jobs at a time: intent, then success."""
    from runner.store import Outcome, SavedImage
    from runner.store.postgres import open_pg_store

    store = open_pg_store(state, out)
    done = 0
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(job_id: str, job: Job) -> None:
        nonlocal done
        try:
            attempt = await store.begin_attempt(job)
            image = SavedImage(f"images/{job_id}.png", 1280, 544, "0" * 64)
            outcome = Outcome("confirmed", PRICE_MICRO_USD)
            await store.record_success(job_id, attempt, outcome, image)
            done += 1
        finally:
            slots.release()

    try:
        async for job in store.claim([]):
            await slots.acquire()
            task = asyncio.create_task(one(job.id, job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        await store.drain()
    finally:
        store.close()
    return done


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        os.environ.setdefault("RUNNER_LEASE_S", "30")
        print(asyncio.run(_work(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
    else:
        sys.exit("usage: python -m bench.scaleout worker STATE OUT CONCURRENCY")
