"""Many workers on one PostgreSQL run (tests/services.py's cluster): claims that never overlap,
a dead worker's claims and attempts taken over when its lease expires, one budget admitting
exactly its cap, a stop heard by every worker, and a real Pool on the emulator."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runner.core.pool import Pool
from runner.core.retry import RetryConfig
from runner.emulator import Emulator
from runner.errors import BudgetReached
from runner.http.client import ClientConfig, ImagesClient
from runner.jobs import Job
from runner.store import Outcome, SavedImage
from runner.store.postgres import PostgresStore
from tests.conftest import TEST_KEY, make_job
from tests.conftest import planned_jobs as planned

PRICE = 30_000
LEASE_S = "1.5"


def job(n: int) -> Job:
    return make_job(f"j{n:05d}", f"picture {n}")


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_S", LEASE_S)


def until(condition: Callable[[], Any], what: str, limit_s: float = 30.0) -> None:
    """Wait for ``condition`` (a safety limit, not a measure: the test asserts no timing)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


async def work_through(store: PostgresStore) -> list[str]:
    """Claim until the run is done, each job made at once (as a pool would)."""
    done = []
    async for claimed in store.claim([]):
        attempt = await store.begin_attempt(claimed)
        image = SavedImage(f"images/{claimed.id}.png", 8, 8, "0" * 64)
        await store.record_success(claimed.id, attempt, Outcome("confirmed", PRICE), image)
        done.append(claimed.id)
    return done


def test_workers_claiming_together_get_disjoint_sets_covering_all(
    open_worker: Callable[[], PostgresStore],
) -> None:
    planner = open_worker()
    jobs = planned(planner, 2000)
    workers = [open_worker() for _ in range(4)]
    results: dict[int, list[str]] = {}

    def run(n: int) -> None:
        results[n] = asyncio.run(work_through(workers[n]))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [job_id for n in range(4) for job_id in results[n]]
    assert len(claimed) == len(set(claimed)) == 2000
    assert set(claimed) == {j.id for j in jobs}
    assert all(results[n] for n in range(4)), "each worker got a share"
    assert planner.spend_micro_usd() == (2000 * PRICE, 0)


async def test_a_dead_workers_claims_and_attempts_are_taken_over(
    open_worker: Callable[[], PostgresStore],
) -> None:
    dead, alive = open_worker(), open_worker()
    planned(dead, 5)
    claims = dead.claim([])
    first = await anext(claims)
    await dead.begin_attempt(first)  # then it dies with its request in flight
    assert dead._heartbeat is not None
    dead._heartbeat.close()
    dead._heartbeat = None
    assert alive._heartbeat is not None
    with psycopg.connect(alive.state_url, autocommit=True) as conn:
        expired = "SELECT lease_expires_at < now() FROM {}.workers WHERE worker_id = %s"
        schema = alive.conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        until(
            lambda: (
                conn.execute(expired.format(schema[0]), (dead.worker_id,)).fetchone() == (True,)
            ),
            "the dead worker's lease expires",
        )
    beats = alive._heartbeat.beats
    until(lambda: alive._heartbeat and alive._heartbeat.beats >= beats + 1, "a beat passes")
    # The heartbeat made the dead worker's attempt a possible charge, its price counted.
    assert alive.spend_micro_usd() == (0, PRICE)
    assert alive.adoption_charge(first.id) == ("possible", PRICE)
    assert sorted(await work_through(alive)) == [job(n).id for n in range(5)]
    await claims.aclose()


def test_the_budget_admits_exactly_its_cap_across_workers(
    open_worker: Callable[[], PostgresStore],
) -> None:
    workers = [open_worker() for _ in range(4)]
    jobs = planned(workers[0], 20)
    workers[0].budget(7 * PRICE)
    admitted: list[tuple[int, str, int]] = []
    refused: list[str] = []

    async def try_all(n: int) -> None:
        async def one(j: Job) -> None:
            try:
                admitted.append((n, j.id, await workers[n].begin_attempt(j)))
            except BudgetReached as exc:
                refused.append(str(exc))

        await asyncio.gather(*(one(j) for j in jobs[n * 5 : n * 5 + 5]))

    threads = [threading.Thread(target=asyncio.run, args=(try_all(n),)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 7 and len(refused) == 13
    assert set(refused) == {"the budget of $0.21 is reached"}
    # Two end unbilled: their prices come back, and two more attempts fit.
    for n, job_id, attempt in admitted[:2]:
        asyncio.run(workers[n].record_outcome(job_id, attempt, Outcome("none")))
    (n, job_id, attempt) = admitted[2]
    asyncio.run(workers[n].record_outcome(job_id, attempt, Outcome("confirmed", PRICE)))
    more = [j for j in jobs if j.id not in {a[1] for a in admitted}][:3]
    asyncio.run(workers[0].begin_attempt(more[0]))
    asyncio.run(workers[1].begin_attempt(more[1]))
    with pytest.raises(BudgetReached):
        asyncio.run(workers[2].begin_attempt(more[2]))
    assert workers[0].budget(None).cap_micro_usd is None  # the database is the cap


def test_a_stop_reaches_every_worker_within_two_beats(
    open_worker: Callable[[], PostgresStore],
) -> None:
    asking, other = open_worker(), open_worker()
    assert other._heartbeat is not None
    beats = other._heartbeat.beats
    asking.request_stop("stopped by the operator")
    asking.request_stop("a later reason")
    assert asking.stop_requested() == "stopped by the operator"
    until(lambda: other.stop_requested() is not None, "the other worker hears the stop")
    assert other.stop_requested() == "stopped by the operator"
    assert other._heartbeat.beats <= beats + 2
    asking.queue([])  # a new plan lifts it
    assert asking.stop_requested() is None
    until(lambda: other.stop_requested() is None, "the other worker hears it lifted")


async def test_a_pool_runs_on_the_postgres_store(
    open_worker: Callable[[], PostgresStore], emulator: Emulator, tmp_path: Path
) -> None:
    store = open_worker()
    jobs = planned(store, 6)
    config = ClientConfig(base_url=emulator.base_url, api_key=TEST_KEY)
    async with ImagesClient(config) as client:
        pool = Pool(
            client,
            store,
            tmp_path / "out" / "images",
            concurrency=3,
            retry=RetryConfig(backoff_initial_s=0.001),
            budget=store.budget(None),
        )
        result = await pool.run(jobs)
    assert result.stop_reason is None and result.progress.succeeded == 6
    assert store.spend_micro_usd() == (6 * PRICE, 0)
    records = store.job_records([j.id for j in jobs])
    assert {r.status for r in records.values()} == {"succeeded"}
    assert all(
        (tmp_path / "out" / r.image_path).is_file() for r in records.values() if r.image_path
    )
    assert emulator.billed_usd == pytest.approx(6 * 0.03)
