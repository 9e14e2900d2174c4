"""Group commit on PostgreSQL (optimistic): a batch runs without savepoints, and only when a write
of it raises is it rolled back whole and run again a savepoint a write, so that each write still
succeeds or fails alone and is committed once."""

from __future__ import annotations

import asyncio
from collections import Counter

import psycopg
import pytest

from runner.store.groupcommit import GroupCommit, batch_transaction
from runner.store.postgres.connect import Translated


def open_commits(pg_url: str) -> GroupCommit[Translated]:
    db = Translated(psycopg.connect(pg_url, autocommit=True))
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t VALUES (1, 'first')")
    return GroupCommit(db, lambda: batch_transaction(db, "BEGIN", psycopg.Error), optimistic=True)


async def test_a_batch_that_succeeds_runs_each_write_once(pg_url: str) -> None:
    commits = open_commits(pg_url)
    ran: Counter[int] = Counter()

    async def insert(k: int) -> None:
        def write(db: Translated) -> None:
            ran[k] += 1
            db.execute("INSERT INTO t VALUES (?, 'x')", (k,))

        await commits.run(write)

    await asyncio.gather(*(insert(k) for k in range(2, 12)))
    assert ran == Counter(range(2, 12))
    assert (commits.batches, commits.writes, commits.retried) == (1, 10, 0)
    commits.close()
    commits.db.conn.close()


async def test_a_failing_write_fails_alone_and_the_others_commit_once(pg_url: str) -> None:
    commits = open_commits(pg_url)
    ran: Counter[int] = Counter()

    async def insert(k: int, *, then_raise: bool = False) -> None:
        def write(db: Translated) -> None:
            ran[k] += 1
            db.execute("INSERT INTO t VALUES (?, 'x')", (k,))
            if then_raise:
                raise ValueError(f"write {k} refused after writing")

        await commits.run(write)

    results = await asyncio.gather(
        insert(2), insert(1), insert(3), insert(4, then_raise=True), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], psycopg.errors.UniqueViolation)
    assert isinstance(results[3], ValueError)
    # The first try stopped at the first failure and was rolled back whole; then every write
    # ran under its own savepoint.
    assert ran == Counter({2: 2, 1: 2, 3: 1, 4: 1})
    assert commits.retried == 1
    rows = commits.db.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    assert rows == [(1, "first"), (2, "x"), (3, "x")]
    commits.close()
    commits.db.conn.close()


@pytest.mark.parametrize("optimistic", [True, False])
async def test_a_lost_connection_fails_every_write(pg_url: str, optimistic: bool) -> None:
    commits = open_commits(pg_url)
    commits.optimistic = optimistic
    commits.db.conn.close()

    results = await asyncio.gather(
        commits.run(lambda db: db.execute("INSERT INTO t VALUES (5, 'x')")),
        commits.run(lambda db: db.execute("INSERT INTO t VALUES (6, 'x')")),
        return_exceptions=True,
    )
    assert all(isinstance(r, psycopg.OperationalError) for r in results)
    commits.close()
