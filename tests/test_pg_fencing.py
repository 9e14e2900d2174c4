"""Leases fence a PostgreSQL run's workers (tests/services.py's cluster): a lease that expired
cannot be renewed, a job that moved on (claimed by another worker, succeeded, or changed by a
new plan) is neither sent nor overwritten, claim() never yields a job twice, and a beat renews
the lease even while other workers hold the rows it would settle."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import psycopg
import pytest

from runner.errors import ClaimLost, JobFailedError
from runner.jobs import Job
from runner.store import Outcome, SavedImage
from runner.store.postgres import PostgresStore
from tests.conftest import make_job
from tests.conftest import planned_jobs as planned

PRICE = 30_000


def job(n: int, prompt: str = "") -> Job:
    return make_job(f"j{n:05d}", prompt or f"picture {n}")


def image(n: int) -> SavedImage:
    return SavedImage(f"images/j{n:05d}.png", 8, 8, f"{n:064x}")


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_S", "1.5")


def sql(store: PostgresStore, statement: str, params: tuple[object, ...] = ()) -> list[tuple]:
    """A statement on a connection of its own, in the run's schema."""
    schema = store.conn.execute("SELECT current_schema()").fetchone()
    assert schema is not None
    with psycopg.connect(store.state_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema[0]}", image_runner')
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def expire(store: PostgresStore) -> None:
    """The worker stalled past its lease (its heartbeat thread stopped, the lease gone)."""
    assert store._heartbeat is not None
    store._heartbeat._done.set()
    store._heartbeat._thread.join()
    sql(
        store,
        "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = %s",
        (store.worker_id,),
    )


async def test_an_expired_lease_is_not_renewed_and_its_jobs_are_not_sent(
    open_worker: Callable[[], PostgresStore],
) -> None:
    stalled, other = open_worker(), open_worker()
    planned(stalled, 3)
    claims = stalled.claim([])
    first = await anext(claims)
    expire(stalled)
    assert stalled._heartbeat is not None
    stalled._heartbeat.beat()  # it wakes up: the lease stays lost
    assert "lease expired" in (stalled.stop_requested() or "")
    assert sql(
        stalled,
        "SELECT lease_expires_at < now() FROM workers WHERE worker_id = %s",
        (stalled.worker_id,),
    ) == [(True,)]
    other.settle_in_flight()  # the stalled worker's claims are free: another takes them
    taken = [j async for j in other.claim([])]
    assert first.id in {j.id for j in taken}
    with pytest.raises(ClaimLost) as lost:
        await stalled.begin_attempt(first)
    assert lost.value.job_id == first.id
    assert sql(stalled, "SELECT COUNT(*) FROM attempts") == [(0,)]
    assert sql(stalled, "SELECT committed_micro_usd FROM budgets") == [(0,)]
    await claims.aclose()


async def test_a_job_another_worker_holds_or_made_is_not_sent_again(
    open_worker: Callable[[], PostgresStore],
) -> None:
    first_worker, second = open_worker(), open_worker()
    planned(first_worker, 1)
    claimed = [j async for j in second.claim([])]
    assert [j.id for j in claimed] == [job(0).id]
    with pytest.raises(ClaimLost):  # held by the other, alive
        await first_worker.begin_attempt(job(0))
    attempt = await second.begin_attempt(job(0))
    await second.record_success(job(0).id, attempt, Outcome("confirmed", PRICE), image(0))
    sql(second, "UPDATE jobs SET claimed_by = NULL")  # even unclaimed, a success is final
    with pytest.raises(ClaimLost):
        await first_worker.begin_attempt(job(0))
    assert sql(second, "SELECT attempt, worker_id FROM attempts") == [(1, second.worker_id)]


async def test_an_outcome_for_a_job_a_new_plan_changed_leaves_the_job_alone(
    open_worker: Callable[[], PostgresStore],
) -> None:
    worker, planner = open_worker(), open_worker()
    planned(worker, 2)
    claims = worker.claim([])
    first, second = await anext(claims), await anext(claims)
    sent = [await worker.begin_attempt(first), await worker.begin_attempt(second)]
    planner.plan_jobs([job(0, "a new prompt"), job(1, "another new prompt")])
    with pytest.raises(ClaimLost):
        await worker.record_success(first.id, sent[0], Outcome("confirmed", PRICE), image(0))
    refused = JobFailedError("refused", job_id=second.id, status=400)
    with pytest.raises(ClaimLost):
        await worker.record_failure(second.id, sent[1], Outcome("none"), refused, retry_later=False)
    rows = sql(
        worker,
        "SELECT job_id, status, image_path, claimed_by, content_hash = %s FROM jobs "
        "ORDER BY job_id",
        (job(0, "a new prompt").content_hash,),
    )
    assert rows[0] == (first.id, "pending", None, None, True)
    assert rows[1][:4] == (second.id, "pending", None, None)
    # The attempt's outcome is recorded all the same: its cost is known.
    assert sql(worker, "SELECT job_id, state, cost_micro_usd FROM attempts ORDER BY job_id") == [
        (first.id, "confirmed", PRICE),
        (second.id, "unbilled", 0),
    ]
    with pytest.raises(ClaimLost):  # the old content is not sent again
        await worker.begin_attempt(first)
    await claims.aclose()


async def test_claim_never_yields_a_job_twice_to_one_worker(
    open_worker: Callable[[], PostgresStore],
) -> None:
    worker = open_worker()
    planned(worker, 3)
    claims = worker.claim([])
    yielded = [await anext(claims)]
    sql(worker, "UPDATE jobs SET claimed_by = NULL")  # as if settled: claimable again
    yielded += [j async for j in claims]
    assert sorted(j.id for j in yielded) == [job(n).id for n in range(3)]


def test_a_beat_renews_the_lease_while_other_workers_hold_the_rows_to_settle(
    open_worker: Callable[[], PostgresStore],
) -> None:
    dead, alive = open_worker(), open_worker()
    planned(dead, 1)
    asyncio.run(dead.begin_attempt(job(0)))
    expire(dead)
    assert alive._heartbeat is not None
    with psycopg.connect(alive.state_url) as holder:  # another worker's long transaction
        schema = alive.conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        holder.execute(f'SET search_path TO "{schema[0]}"')
        holder.execute("SELECT * FROM attempts FOR UPDATE")
        beat = threading.Thread(target=alive._heartbeat.beat)
        beat.start()
        beat.join(20)  # a safety limit: without the fix the beat waits the 60 s lock timeout
        assert not beat.is_alive()
        # Read while the rows are still held: once they are free, the heartbeat's own next
        # beat (every half second here) settles the attempt, as it should.
        assert sql(alive, "SELECT state FROM attempts") == [("in_flight",)]
        holder.rollback()
    assert alive.stop_requested() is None


def test_a_lost_connection_does_not_stop_the_worker_while_its_lease_lasts(
    open_worker: Callable[[], PostgresStore],
) -> None:
    worker = open_worker()
    heartbeat = worker._heartbeat
    assert heartbeat is not None
    heartbeat._conn.close()  # the network dropped it
    beats = heartbeat.beats
    for _ in range(400):
        if heartbeat.beats > beats:
            break
        threading.Event().wait(0.05)
    assert heartbeat.beats > beats, "the heartbeat reconnected"
    assert worker.stop_requested() is None
