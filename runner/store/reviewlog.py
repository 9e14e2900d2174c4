"""The review decisions of a SQLite checkpoint: :class:`SqliteReviewLog`, the
:class:`~runner.store.base.ReviewLog` of :mod:`runner.store.sqlite`.

It opens the checkpoint without the folder's lock (a run may hold it) and writes one table,
``reviews``, appending: nothing the run writes is ever changed here, so a decision can never
undo a run's bookkeeping, and the run reads the decisions when it next plans. Each call of
:meth:`SqliteReviewLog.decide` is one ``BEGIN IMMEDIATE`` transaction that checks every decision
against the jobs as they stand and records all of them or none; in WAL mode it waits its turn
behind the run's group commits (``busy_timeout``), which are short.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from runner.errors import ReviewError, StoreWriteError
from runner.store.base import REVIEW_STATES, Decision, Review
from runner.store.queries import SqliteViews
from runner.store.schema import connect_for_review, now_iso, reading, rows_by_ids


class SqliteReviewLog:
    """Review decisions of the checkpoint in ``folder``; close when done."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._db = connect_for_review(folder)

    def __enter__(self) -> SqliteReviewLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def views(self) -> SqliteViews:
        return SqliteViews(self._db, self.folder)

    def decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreWriteError(f"{self.folder}: cannot record the review: {exc}") from None
        try:
            with reading(self.folder):
                rows = rows_by_ids(
                    db,
                    "SELECT job_id, status, version FROM jobs WHERE job_id IN ({ids})",
                    [d.job_id for d in decisions],
                )
            jobs = {job_id: (status, version) for job_id, status, version in rows}
            problems = [p for d in decisions if (p := _problem(d, jobs.get(d.job_id)))]
            if problems:
                raise ReviewError(
                    f"{self.folder}: nothing was recorded:\n"
                    + "\n".join(f"  {p}" for p in problems)
                )
            stamp = now_iso()
            recorded = [
                Review(d.job_id, jobs[d.job_id][1], d.decision, reviewer, stamp) for d in decisions
            ]
            db.executemany(
                "INSERT INTO reviews (job_id, version, decision, reviewer, decided_at) "
                "VALUES (?, ?, ?, ?, ?)",
                recorded,
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(db)
            raise StoreWriteError(f"{self.folder}: cannot record the review: {exc}") from None
        except BaseException:
            _roll_back(db)
            raise
        return recorded


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


def _roll_back(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
