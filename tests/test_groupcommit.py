"""Group commit: many workers' writes land in few transactions, each worker resumes only after
its own write is durable, and a failing write fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from runner.store.groupcommit import GroupCommit


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    return db


async def test_concurrent_writes_share_transactions(tmp_path: Path) -> None:
    db = open_db(tmp_path / "a.sqlite")
    commits = GroupCommit(db)

    async def worker(k: int) -> int:
        row = await commits.run(lambda d: d.execute("INSERT INTO t VALUES (?, 'x')", (k,)))
        assert row.lastrowid == k
        # Committed: another connection sees it as soon as the write returns.
        other = sqlite3.connect(tmp_path / "a.sqlite")
        try:
            return int(other.execute("SELECT COUNT(*) FROM t WHERE k = ?", (k,)).fetchone()[0])
        finally:
            other.close()

    seen = await asyncio.gather(*(worker(k) for k in range(1, 201)))
    assert seen == [1] * 200
    assert commits.writes == 200
    assert commits.batches < 100  # one fsync per batch, not per write
    db.close()


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    db = open_db(tmp_path / "b.sqlite")
    commits = GroupCommit(db)
    await commits.run(lambda d: d.execute("INSERT INTO t VALUES (1, 'first')"))

    async def insert(k: int) -> None:
        await commits.run(lambda d: d.execute("INSERT INTO t VALUES (?, 'x')", (k,)))

    results = await asyncio.gather(insert(2), insert(1), insert(3), return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    rows = db.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    assert rows == [(1, "first"), (2, "x"), (3, "x")]
    db.close()


async def test_drain_waits_for_everything_handed_over(tmp_path: Path) -> None:
    db = open_db(tmp_path / "c.sqlite")
    commits = GroupCommit(db)
    tasks = [
        asyncio.create_task(
            commits.run(lambda d, k=k: d.execute("INSERT INTO t VALUES (?, '')", (k,)))
        )
        for k in range(50)
    ]
    await asyncio.sleep(0)
    await commits.drain()
    assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 50
    await asyncio.gather(*tasks)
    db.close()


async def test_cancelled_worker_still_lands_its_write(tmp_path: Path) -> None:
    db = open_db(tmp_path / "d.sqlite")
    commits = GroupCommit(db)
    task = asyncio.create_task(commits.run(lambda d: d.execute("INSERT INTO t VALUES (7, '')")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await commits.drain()
    assert db.execute("SELECT k FROM t").fetchall() == [(7,)]
    db.close()


async def test_a_failed_commit_is_rolled_back_and_the_next_batch_commits(tmp_path: Path) -> None:
    """A COMMIT that SQLite refuses leaves the transaction open (as SQLITE_BUSY does); unless it
    is rolled back, every later batch fails with "cannot start a transaction within a
    transaction"."""
    db = open_db(tmp_path / "e.sqlite")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    commits = GroupCommit(db)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await commits.run(lambda d: d.execute("INSERT INTO child VALUES (1)"))
    assert not db.in_transaction
    await commits.run(lambda d: d.execute("INSERT INTO t VALUES (1, 'next')"))
    assert db.execute("SELECT v FROM t").fetchall() == [("next",)]
    db.close()


async def test_a_write_that_ends_the_whole_transaction_fails_the_batch_with_its_error(
    tmp_path: Path,
) -> None:
    """On a full disk SQLite may roll the whole transaction back itself: every write of the
    batch then fails with that error, not with "no such savepoint"."""
    db = open_db(tmp_path / "f.sqlite")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    commits = GroupCommit(db)
    big = "x" * 100_000

    async def insert(k: int) -> None:
        await commits.run(lambda d: d.execute("INSERT INTO t VALUES (?, ?)", (k, big)))

    results = await asyncio.gather(insert(1), insert(2), return_exceptions=True)
    assert [str(r) for r in results] == ["database or disk is full"] * 2
    assert not db.in_transaction
    db.close()
