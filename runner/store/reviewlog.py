"""The review decisions of a SQLite checkpoint: :class:`SqliteReviewLog`, the
:class:`~runner.store.base.ReviewLog` of :mod:`runner.store.sqlite`.

It opens the checkpoint without the folder's lock (a run may hold it) and writes one table,
``reviews``, appending: nothing the run writes is ever changed here, so a decision can never
undo a run's bookkeeping, and the run reads the decisions when it next plans. (A checkpoint of
an older version is upgraded on opening only if no run holds the folder, and refused if one
does: :func:`~runner.store.schema.connect_for_review`.)

Each call of :meth:`SqliteReviewLog.decide` is one ``BEGIN IMMEDIATE`` transaction that checks
every decision against the jobs as they stand and records all of them or none. In WAL mode it
waits its turn behind a run's write transactions, up to
:data:`~runner.store.schema.REVIEW_BUSY_TIMEOUT_MS` (a run planning a large manifest may hold
one longer: then :class:`~runner.errors.StoreWriteError`, and nothing is recorded). So that the
review app can wait in a worker thread while it goes on serving, decisions are written on a
connection of their own, one call at a time (a lock), and :meth:`SqliteReviewLog.views` read
another, read-only, which a run's writes never block.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.errors import ReviewError, StoreWriteError
from runner.store.base import REVIEW_STATES, Decision, Review
from runner.store.queries import SqliteViews
from runner.store.schema import (
    connect_for_review,
    connect_read_only,
    now_iso,
    reading,
    rows_by_ids,
)


class SqliteReviewLog:
    """Review decisions of the checkpoint in ``folder``; close when done. :meth:`decide` may be
    called from any thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._db = connect_for_review(folder)
        try:
            self._reader = connect_read_only(folder)
        except BaseException:
            self._db.close()
            raise
        self._writing = threading.Lock()

    def __enter__(self) -> SqliteReviewLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        # The writer last: the last connection to close folds the WAL back into the checkpoint
        # and removes it, which a read-only one cannot do.
        self._reader.close()
        with self._writing:  # after a decision still being written in another thread
            self._db.close()

    def views(self) -> SqliteViews:
        return SqliteViews(self._reader, self.folder)

    def decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        with self._writing:
            return self._decide(decisions, reviewer)

    def _decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _not_recorded(self.folder, exc) from None
        try:
            with reading(self.folder):
                rows = rows_by_ids(db, JOBS_UNDER_REVIEW, [d.job_id for d in decisions])
            recorded = checked(self.folder, decisions, rows, reviewer)
            db.executemany(RECORD_REVIEWS, recorded)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(db)
            raise _not_recorded(self.folder, exc) from None
        except BaseException:
            _roll_back(db)
            raise
        return recorded


# Shared with the PostgreSQL review log (runner.store.postgres.reviewlog): the jobs a batch of
# decisions names, as they stand, and the decisions' record.
JOBS_UNDER_REVIEW = "SELECT job_id, status, version FROM jobs WHERE job_id IN ({ids})"
RECORD_REVIEWS = (
    "INSERT INTO reviews (job_id, version, decision, reviewer, decided_at) VALUES (?, ?, ?, ?, ?)"
)
BUSY = "not recorded: a run is writing the checkpoint; try again in a moment"


def checked(
    where: object, decisions: Sequence[Decision], rows: Sequence[Sequence[Any]], reviewer: str
) -> list[Review]:
    """``decisions`` as the reviews to record, stamped now, given ``rows`` (those of
    :data:`JOBS_UNDER_REVIEW`); or :class:`ReviewError` naming every one that cannot be
    recorded, ``where`` first (the output location), when any cannot."""
    jobs = {job_id: (status, version) for job_id, status, version in rows}
    problems = [p for d in decisions if (p := _problem(d, jobs.get(d.job_id)))]
    if problems:
        raise ReviewError(
            f"{where}: nothing was recorded:\n" + "\n".join(f"  {p}" for p in problems)
        )
    stamp = now_iso()
    return [Review(d.job_id, jobs[d.job_id][1], d.decision, reviewer, stamp) for d in decisions]


def _problem(decision: Decision, job: tuple[str, int] | None) -> str | None:
    """Why ``decision`` cannot be recorded on ``job`` (its status and version), if it cannot."""
    job_id = decision.job_id
    if decision.decision not in REVIEW_STATES:
        return f"{job_id}: {decision.decision!r} is no decision (approved, rejected, unreviewed)"
    if job is None:
        return f"{job_id}: no such job in this output folder"
    status, version = job
    if status != "succeeded":
        return f"{job_id}: is {status}; only a finished image can be reviewed"
    if decision.version is not None and decision.version != version:
        return (
            f"{job_id}: version {decision.version} is no longer its image (now version "
            f"{version}); look at the new one first"
        )
    return None


def _not_recorded(folder: Path, error: sqlite3.Error) -> StoreWriteError:
    if error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:  # waited its turn in vain
        return StoreWriteError(f"{folder}: {BUSY}")
    return StoreWriteError(f"{folder}: cannot record the review: {error}")


def _roll_back(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
