"""The PostgreSQL backend of the Store: many runs in one database, many workers on each run.

:mod:`.connect` (the ``--state`` URL, a run's identity, errors without the password),
:mod:`.schema` (the shared schema and each run's, their migrations), :mod:`.store`
(:class:`PostgresStore`), :mod:`.writes` (attempts, the shared budget, planning),
:mod:`.claims` (workers, leases, claims), :mod:`.claimer` (a worker's claims, off the event
loop). The factories below are how a run opens it; which
backend a command uses is decided by :mod:`runner.store`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from runner.storage.base import location_url
from runner.store.postgres.connect import (
    connect,
    run_schema,
    set_search_path,
    store_error,
)
from runner.store.postgres.reviewlog import PostgresReviewLog
from runner.store.postgres.schema import RUN_MIGRATIONS, open_run
from runner.store.postgres.store import PostgresStore

__all__ = [
    "PostgresReviewLog",
    "PostgresStore",
    "open_pg_for_dry_run",
    "open_pg_read_only",
    "open_pg_review_log",
    "open_pg_store",
    "stop_pg_run",
]


def open_pg_store(
    state_url: str,
    out_url: str | Path,
    *,
    worker: bool = True,
    create: bool = True,
    budget: str | None = None,
    rpm: float | None = None,
) -> PostgresStore:
    """The run at ``out_url`` (a local folder or an object storage URL) in the database of
    ``state_url``, for a run or a worker (``worker``: it registers and may claim and send;
    False: it only plans or stops the run).

    ``create``: the planning run (``image-runner run``), which creates the schemas and the run
    as needed, names the shared budget it spends from (``budget``; None: the one an earlier
    run of it named, else the run's own, named after ``out_url``) and sets its cap
    (:meth:`PostgresStore.budget`), and records its ``--rpm`` (``rpm``; None: the ceiling an
    earlier run recorded, if any) as the run's ceiling. A joining worker (``image-runner
    work``) opens with ``create=False``: a run nobody planned is a
    :class:`~runner.errors.StoreError` saying so, not an empty run; the run's budget, cap and
    ceiling are the planner's (:meth:`PostgresStore.ceiling_rpm`)."""
    out = location_url(out_url)
    conn = open_run(state_url, out, create=create, budget=budget, rpm=rpm)
    return PostgresStore(
        state_url,
        out,
        conn,
        lambda: _run_connection(state_url, out),
        worker=worker,
        planner=create,
    )


def open_pg_read_only(state_url: str, out_url: str | Path) -> PostgresStore:
    """The run at ``out_url`` for the views; it must exist. Changes nothing."""
    out = location_url(out_url)
    conn = open_run(state_url, out, create=False)
    return PostgresStore(
        state_url, out, conn, lambda: _run_connection(state_url, out), worker=False, planner=False
    )


def open_pg_for_dry_run(state_url: str, out_url: str | Path) -> PostgresStore:
    """The run at ``out_url`` to plan from while changing nothing: every transaction read
    only. A run the database does not hold yet is planned against empty temporary tables, so
    that nothing is created."""
    out = location_url(out_url)
    conn = connect(state_url)
    try:
        known = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f'"{run_schema(out)}".migrations',)
        ).fetchone()
        if known and known[0]:
            set_search_path(conn, run_schema(out))
        else:
            conn.execute("SET search_path TO pg_temp")
            for script in RUN_MIGRATIONS:
                conn.execute(script)
            conn.execute("INSERT INTO control (id, budget) VALUES (1, %s)", (out,))
        conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        conn.close()
        raise store_error(exc, state_url, f"cannot read the run of {out}") from None
    except BaseException:
        conn.close()
        raise
    return PostgresStore(
        state_url, out, conn, lambda: _run_connection(state_url, out), worker=False, planner=False
    )


def open_pg_review_log(state_url: str, out_url: str | Path) -> PostgresReviewLog:
    """Where review decisions on the run at ``out_url`` are written (it must exist)."""
    return PostgresReviewLog(state_url, out_url)


def stop_pg_run(state_url: str, out_url: str | Path, reason: str) -> None:
    """Stop every worker of the run at ``out_url`` (it must exist): each hears it at its next
    heartbeat and finishes what it has in flight; the next plan of the run lifts it."""
    store = open_pg_read_only(state_url, out_url)
    try:
        store.request_stop(reason)
    finally:
        store.close()


def _run_connection(state_url: str, out_url: str) -> psycopg.Connection[Any]:
    """Another connection to the run (the writer's, the claimer's, the heartbeat's)."""
    conn = connect(state_url)
    set_search_path(conn, run_schema(out_url))
    return conn
