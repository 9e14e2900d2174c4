"""Workers of a PostgreSQL run: their rows and leases, the heartbeat, and claiming jobs.

- A worker is one process running the pool on the run. Opening a store as a worker inserts its
  ``workers`` row with a lease on the database's clock (``now()``: no worker's clock decides
  whose lease expired); a :class:`Heartbeat` thread, on its own connection, renews it every
  third of :func:`lease_s` (or more often, to hear a stop within ``STOP_HEARD_S``), reads the
  run's stop (so that :meth:`stop_requested` costs nothing), and settles what dead workers
  left in flight, so that a killed worker's attempts are possible charges within about a lease.
- Leases fence: a lease is renewed only while it is valid (:data:`RENEW`), so a worker that
  stalled past it cannot take it back; and every write about a job checks that this worker
  still holds it (:mod:`.writes`).
- A worker is *dead* when its lease expired or it finished (:data:`DEAD_WORKERS`): its claims
  are free for others, its attempts in flight nobody's.
- :func:`claim_batch` claims the next few queued jobs in planning order with ``FOR UPDATE SKIP
  LOCKED`` (workers claiming together never wait on, nor take, each other's rows) and rebuilds
  each :class:`~runner.jobs.Job` from its row, without the manifest.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from runner.errors import StoreError
from runner.jobs import Job
from runner.manifest.spool import restore
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.store.postgres.connect import store_error
from runner.store.schema import now_iso

LEASE_ENV = "RUNNER_LEASE_S"
DEFAULT_LEASE_S = 30.0

DEAD_WORKERS = (
    "SELECT worker_id FROM workers WHERE lease_expires_at < now() OR finished_at IS NOT NULL"
)

# Attempts in flight that nobody works on: this worker's own (at its start and end) and those
# of dead workers (NULL: recorded by no worker).
SETTLEABLE = (
    "state = 'in_flight' AND (worker_id = %(me)s OR worker_id IS NULL "
    f"OR worker_id IN ({DEAD_WORKERS}))"
)

# What rebuilds a job, in :func:`runner.manifest.spool.restore`'s order, then ``seq``.
JOB_COLUMNS = (
    "job_id, prompt, model, size, response_format, content_hash, images, row, variant, vars, "
    "repeat_index, template, seq"
)


def lease_s() -> float:
    """How long a worker's lease lasts without a renewal: ``RUNNER_LEASE_S`` (tests make it a
    few seconds), else 30 s."""
    text = os.environ.get(LEASE_ENV, "")
    try:
        value = float(text) if text else DEFAULT_LEASE_S
    except ValueError:
        value = DEFAULT_LEASE_S
    return value if value > 0 else DEFAULT_LEASE_S


def register(conn: psycopg.Connection[Any], lease: float) -> int:
    """Insert this process's ``workers`` row, its lease starting now; returns its id."""
    row = conn.execute(
        "INSERT INTO workers (host, pid, lease_expires_at) "
        "VALUES (%s, %s, now() + make_interval(secs => %s)) RETURNING worker_id",
        (socket.gethostname(), os.getpid(), lease),
    ).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return int(row[0])


def retire(conn: psycopg.Connection[Any], worker_id: int) -> None:
    """The worker ends: its claims go back to the queue, its row says it finished."""
    with conn.transaction():
        conn.execute("UPDATE jobs SET claimed_by = NULL WHERE claimed_by = %s", (worker_id,))
        conn.execute("UPDATE workers SET finished_at = now() WHERE worker_id = %s", (worker_id,))


def settle(conn: psycopg.Connection[Any], worker_id: int | None) -> int:
    """Attempts nobody works on become possible charges (their price, already reserved on the
    budget, stays there), and dead workers' claims are cleared; returns how many attempts."""
    cursor = conn.execute(
        "UPDATE attempts SET state = 'possible', cost_micro_usd = %(price)s, "
        f"error = 'interrupted while in flight', finished_at = %(stamp)s WHERE {SETTLEABLE}",
        {"price": PRICE_PER_IMAGE_MICRO_USD, "stamp": now_iso(), "me": worker_id},
    )
    conn.execute(f"UPDATE jobs SET claimed_by = NULL WHERE claimed_by IN ({DEAD_WORKERS})")
    return cursor.rowcount


def claim_batch(conn: psycopg.Connection[Any], worker_id: int, limit: int) -> list[Job]:
    """Claim up to ``limit`` queued jobs, in planning order, that nobody alive holds."""
    rows = conn.execute(
        f"UPDATE jobs SET claimed_by = %(me)s WHERE job_id IN (SELECT job_id FROM jobs "
        "WHERE queued AND status <> 'succeeded' AND (claimed_by IS NULL OR claimed_by IN "
        f"({DEAD_WORKERS})) ORDER BY seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
        f"RETURNING {JOB_COLUMNS}",
        {"me": worker_id, "limit": limit},
    ).fetchall()
    rows.sort(key=lambda row: row[-1])
    return [job_of(row) for row in rows]


def others_hold_work(conn: psycopg.Connection[Any], worker_id: int) -> bool:
    """Whether queued jobs are claimed by other live workers: they may still come back (if
    those die), so the run is not over for this worker."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE queued AND status <> 'succeeded' "
        f"AND claimed_by <> %s AND claimed_by NOT IN ({DEAD_WORKERS}))",
        (worker_id,),
    ).fetchone()
    return bool(row and row[0])


class QueueCounts(NamedTuple):
    """The run at a glance, cheap enough to poll at any size: each count read from a partial
    index, the spend from one row.

    Jobs still queued, those of them claimed by a live worker, the run's failed jobs and those
    of them queued again (a rerun retries them); attempts in flight; and what the run's budget
    row holds (every charge of the runs spending from it, confirmed or possible, plus the price
    of each attempt in flight: the attempt row is the reservation). Between two readings, the
    jobs that left the queue split exactly into failures (the change of ``failed`` less that
    of ``failed_queued``: a failed job retried that fails again leaves both alone) and
    successes (the rest)."""

    queued: int
    claimed: int
    failed: int
    failed_queued: int
    in_flight: int
    committed_micro_usd: int


def queue_counts(conn: psycopg.Connection[Any], budget: str) -> QueueCounts:
    row = conn.execute(
        "SELECT (SELECT COUNT(*) FROM jobs WHERE queued), "
        "(SELECT COUNT(*) FROM jobs WHERE queued AND claimed_by IS NOT NULL "
        f"AND claimed_by NOT IN ({DEAD_WORKERS})), "
        "(SELECT COUNT(*) FROM jobs WHERE status = 'failed'), "
        "(SELECT COUNT(*) FROM jobs WHERE status = 'failed' AND queued), "
        "(SELECT COUNT(*) FROM attempts WHERE state = 'in_flight'), "
        "(SELECT COALESCE(MAX(committed_micro_usd), 0) FROM budgets WHERE name = %s)",
        (budget,),
    ).fetchone()
    assert row is not None  # a SELECT of subqueries returns its row
    return QueueCounts(*(int(n) for n in row))


def end_processes(conn: psycopg.Connection[Any], processes: Sequence[tuple[str, int]]) -> int:
    """The unfinished workers of these ``(host, pid)`` processes finish: the caller knows the
    processes ended (it killed them), without their leases having expired yet. A live process
    is named by its host and pid alone, as it registered (:func:`register`). Returns how many
    workers; :func:`settle` then settles what they left."""
    cursor = conn.execute(
        "UPDATE workers SET finished_at = now() "
        "FROM unnest(%s::text[], %s::int[]) AS ended(host, pid) "
        "WHERE workers.finished_at IS NULL AND workers.host = ended.host "
        "AND workers.pid = ended.pid",
        ([host for host, _ in processes], [pid for _, pid in processes]),
    )
    return cursor.rowcount


def live_workers(conn: psycopg.Connection[Any]) -> int:
    """Workers whose lease is valid and who have not finished: the run is being worked on."""
    row = conn.execute(
        "SELECT COUNT(*) FROM workers WHERE finished_at IS NULL AND lease_expires_at > now()"
    ).fetchone()
    return int(row[0]) if row else 0


def job_of(row: tuple[Any, ...]) -> Job:
    """The job of a ``jobs`` row (:data:`JOB_COLUMNS`), as the manifest made it; its fields were
    checked when it was planned."""
    images = tuple(Path(p) for p in json.loads(row[6]))
    variables = tuple(json.loads(row[9] or "{}").items())
    job_id, prompt, model, size, response_format, content_hash = row[:6]
    return restore(
        job_id,
        prompt,
        model,
        size,
        response_format,
        content_hash,
        images,
        row[7],
        row[8],
        variables,
        row[10],
        row[11] or "",
    )


STOP_HEARD_S = 2.0  # the longest a worker goes without reading the run's stop

# A lease renewed only while it is still valid and the worker has not finished: a worker whose
# lease expired (others may have taken its jobs and settled its attempts) cannot take it back.
RENEW = (
    "UPDATE workers SET lease_expires_at = now() + make_interval(secs => %s) "
    "WHERE worker_id = %s AND lease_expires_at > now() AND finished_at IS NULL "
    "RETURNING worker_id"
)


class Heartbeat:
    """The thread that keeps this worker's lease (on its own connection), hears the run's stop
    and settles dead workers' attempts, every third of the lease but at least every
    ``STOP_HEARD_S``.

    Each beat renews the lease first, alone, in autocommit: nothing another worker holds can
    delay it. Settling comes after, in its own transaction whose lock waits are cut short
    (``lock_timeout`` a fraction of the lease); a settle that waits too long is left to the
    next beat. A renewal refused (the lease had expired, or the worker was marked finished) is
    final: the worker stops, others have its jobs. A beat that fails on the network is not:
    the worker stops only once its last renewal is older than the lease minus a margin, before
    others can see it as dead."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        state_url: str,
        worker_id: int,
        lease: float,
    ) -> None:
        self.worker_id = worker_id
        self.lease = lease
        self.db_stop: str | None = None  # control.stop_reason, as the last beat read it
        self.failure: str | None = None  # why this worker's lease is lost
        self.beats = 0
        self._connect = connect
        self._state_url = state_url
        self._renewed_at = time.monotonic()  # register() just set the lease
        self._stops = threading.Lock()  # db_stop against queue() / request_stop()
        self._generation = 0  # bumped when this process changes the stop itself
        self._done = threading.Event()
        self._conn = connect()  # a StoreError already, without the password
        try:
            self.beat()  # the run may be stopped already: known before the first claim
        except psycopg.Error as exc:
            self._conn.close()
            raise store_error(exc, state_url, "cannot start this worker's heartbeat") from None
        self._thread = threading.Thread(target=self._run, name="pg-heartbeat", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Heartbeat worker={self.worker_id} beats={self.beats} stop={self.stop_reason!r}>"

    @property
    def stop_reason(self) -> str | None:
        """Why this worker must stop: its lease is lost (or about to be, the database out of
        reach), or the run was stopped."""
        return self.failure or self.db_stop

    def set_stop(self, reason: str | None) -> None:
        """This process changed the run's stop (a plan lifted it, a stop was asked): a beat
        that read the old value in the meantime must not bring it back."""
        with self._stops:
            self._generation += 1
            self.db_stop = reason if reason is None else (self.db_stop or reason)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._conn.close()

    def _deadline_s(self) -> float:
        # A sixth of the lease (and a beat's wait at most) before others may see it expired.
        return self.lease - max(self.lease / 6, min(self.lease / 3, STOP_HEARD_S))

    def _run(self) -> None:
        while not self._done.wait(min(self.lease / 3, STOP_HEARD_S)):
            try:
                if self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                self.beat()
            except (psycopg.Error, StoreError):
                # A lost connection: tried again next beat, until others may see the lease
                # as expired. (A beat merely late is no failure: the renewal says if it was.)
                if time.monotonic() - self._renewed_at > self._deadline_s():
                    self.failure = self.failure or (
                        f"this worker's lease could not be renewed for {self.lease:g} s: "
                        "others may take its jobs, so it stops (check the database)"
                    )

    def beat(self) -> None:
        """Renew the lease, read the stop, settle dead workers' attempts."""
        conn = self._conn
        if conn.execute(RENEW, (self.lease, self.worker_id)).fetchone() is None:
            self.failure = self.failure or (
                "this worker's lease expired before it was renewed: others may have taken its "
                "jobs, so it stops (a stalled process or an unreachable database)"
            )
            return
        self._renewed_at = time.monotonic()
        generation = self._generation
        row = conn.execute("SELECT stop_reason FROM control").fetchone()
        with self._stops:
            if generation == self._generation:
                self.db_stop = None if row is None or row[0] is None else str(row[0])
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = {int(self.lease * 1000 / 6)}")
                settle(conn, None)
        except psycopg.errors.LockNotAvailable:
            pass  # another worker holds those rows now: the next beat settles them
        self.beats += 1
