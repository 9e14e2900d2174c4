"""The review decisions of a run in the PostgreSQL state: :class:`PostgresReviewLog`, the
:class:`~runner.store.base.ReviewLog` of the PostgreSQL store.

It does what :class:`~runner.store.reviewlog.SqliteReviewLog` does, by the same statements,
checks and messages (:mod:`runner.store.reviewlog` holds them): it appends to ``reviews`` and
writes nothing else, so it needs no worker's claim and may write while workers run, and each
:meth:`~PostgresReviewLog.decide` records all its decisions or none.

Where SQLite serialises writers with ``BEGIN IMMEDIATE``, here the jobs a batch names are read
``FOR SHARE`` in its transaction: a planning run or a worker that is changing one of them (a new
version, a success) finishes first, and none can change it until the decisions are committed,
so a decision always applies to the version it was checked against. A batch waits for such a
write at most :data:`~runner.store.schema.REVIEW_BUSY_TIMEOUT_MS` (``lock_timeout``), then is
refused with the same "try again in a moment" as on SQLite, nothing recorded.

Decisions are written on a connection of their own, one call at a time (a lock), and
:meth:`~PostgresReviewLog.views` read another, so the review app serves pages while a decision
waits in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import psycopg

from runner.errors import StoreWriteError
from runner.storage.base import location_url
from runner.store.base import Decision, Review
from runner.store.postgres.connect import pg_sql, store_error
from runner.store.postgres.schema import open_run
from runner.store.postgres.store import local_folder
from runner.store.postgres.views import PostgresReader, PostgresViews
from runner.store.reviewlog import BUSY, JOBS_UNDER_REVIEW, RECORD_REVIEWS, checked
from runner.store.schema import REVIEW_BUSY_TIMEOUT_MS


class PostgresReviewLog:
    """Review decisions of the run at ``out`` (its output location: a local folder or an
    object storage URL) in the state at ``state_url``; close when done. :meth:`decide` may be
    called from any thread. The run must exist (planned by a run of a manifest)."""

    def __init__(self, state_url: str, out: str | Path) -> None:
        self._state_url = state_url
        self._out_url = location_url(out)
        self.folder = local_folder(self._out_url) or Path(self._out_url)  # as PostgresStore's
        self._db = open_run(state_url, self._out_url, create=False)
        try:
            self._reader = open_run(state_url, self._out_url, create=False)
        except BaseException:
            self._db.close()
            raise
        self._writing = threading.Lock()

    def __enter__(self) -> PostgresReviewLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        with self._writing:  # after a decision still being written in another thread
            self._db.close()

    def views(self) -> PostgresViews:
        return PostgresViews(self._reader, self._state_url, self._out_url)

    def decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        with self._writing:
            try:
                return self._decide(decisions, reviewer)
            except psycopg.errors.LockNotAvailable:  # waited for a run's write in vain
                raise StoreWriteError(f"{self.folder}: {BUSY}") from None
            except psycopg.Error as exc:
                raise store_error(
                    exc, self._state_url, f"{self.folder}: cannot record the review", write=True
                ) from None

    def _decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        db = self._db
        with db.transaction():
            db.execute(f"SET LOCAL lock_timeout = {int(REVIEW_BUSY_TIMEOUT_MS)}")
            rows = PostgresReader(db, self._state_url, self._out_url).by_ids(
                f"{JOBS_UNDER_REVIEW} FOR SHARE", [d.job_id for d in decisions]
            )
            recorded = checked(self.folder, decisions, rows, reviewer)
            with db.cursor() as cursor:
                cursor.executemany(pg_sql(RECORD_REVIEWS), recorded)
        return recorded
