"""The views' queries, each written once for every backend: :class:`SqlViews`, and
:class:`SqliteViews`, the :class:`Views` of :mod:`runner.store.sqlite`.

Every query here only reads, and is written once, in SQLite's dialect (``?`` placeholders):
:class:`SqlViews` runs it through a :class:`Reader`, a backend's connection as these queries
need it. SQLite's (:class:`SqliteReader`) runs it as it is; PostgreSQL's
(:mod:`runner.store.postgres.views`) translates the placeholders and finds the same tables
through its ``search_path``. So a view reads the same rows on both, by the same SQL.

Status and the report read in one snapshot each (:meth:`Reader.snapshot`): in SQLite's WAL mode
one read transaction, in PostgreSQL a ``REPEATABLE READ READ ONLY`` one; the writers never wait
for it, and it never sees half of a commit, so counts, spend and cards agree while a run writes.
The results' lookups read a few hundred ids a query, and the ledger's attempts and the report's
jobs stream (:meth:`Reader.stream`: a cursor, server-side in PostgreSQL; the report's while its
snapshot stays open), as plain tuples made into named tuples: a manifest of a million jobs costs
no more memory than a thousand. Any error of the driver's is raised as :class:`StoreError`
(SQLite's: ``<folder>: cannot read the checkpoint``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from runner.jobs import JobStatus
from runner.store.base import ImageStat, ReviewState
from runner.store.schema import REVIEW_OF_JOB, SPEND_SQL, reading, rows_by_ids
from runner.store.views import (
    BilledAttempt,
    ExportJob,
    JobSpend,
    JobState,
    LastRun,
    ReportJob,
    ReportSnapshot,
    ReportSummary,
    ReviewItem,
    ReviewPage,
    RunSpan,
    Spend,
    StatusFacts,
    VersionRecord,
)

_IMAGE_STAT = "j.image_size_bytes, j.image_mtime_ns, j.image_ctime_ns"

_REPORT_JOBS = (
    "SELECT j.job_id, j.status, j.size, j.prompt, j.image_path, j.width, j.height, j.sha256, "
    "j.error, j.error_cause, j.retryable, COALESCE(a.n, 0), COALESCE(a.confirmed, 0), "
    "COALESCE(a.possible, 0), "
    # Only a pending job's card shows its last error: one lookup a pending job, not a job.
    "CASE WHEN j.status = 'pending' THEN (SELECT error FROM attempts "
    "WHERE attempts.job_id = j.job_id ORDER BY attempt DESC LIMIT 1) END, j.images, j.version, "
    f"{REVIEW_OF_JOB}, j.edited_at IS NOT NULL, {_IMAGE_STAT} "
    "FROM jobs j LEFT JOIN (SELECT job_id, COUNT(*) AS n, "
    "SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd ELSE 0 END) AS confirmed, "
    "SUM(CASE WHEN state = 'possible' THEN cost_micro_usd ELSE 0 END) AS possible "
    "FROM attempts GROUP BY job_id) a USING (job_id) ORDER BY j.job_id"
)

# The review app's rows: a job with its current version's latest decision (if any).
_REVIEW_ITEMS = (
    "SELECT j.job_id, j.status, j.prompt, j.size, j.model, j.image_path, j.width, j.height, "
    "j.sha256, j.images, j.version, r.decision, r.reviewer, r.decided_at, "
    f"j.edited_at IS NOT NULL, j.error, j.error_cause, {_IMAGE_STAT} FROM jobs j "
    "LEFT JOIN reviews r ON r.review_id = (SELECT MAX(review_id) FROM reviews "
    "WHERE reviews.job_id = j.job_id AND reviews.version = j.version)"
)


def _review_item(row: tuple[Any, ...]) -> ReviewItem:
    decision = row[11] if row[1] == "succeeded" and row[11] else "unreviewed"
    references = tuple(json.loads(row[9]))
    stat = _image_stat(*row[17:])
    return ReviewItem._make(
        (*row[:9], references, row[10], decision, *row[12:14], bool(row[14]), *row[15:17], stat)
    )


def _image_stat(
    size_bytes: int | None, mtime_ns: int | None, ctime_ns: int | None
) -> ImageStat | None:
    """The stat recorded with a job's image; None when there is none (no image, or one recorded
    before migration 3), as :attr:`runner.store.base.JobRecord.image_stat` reads it."""
    if size_bytes is None or mtime_ns is None:
        return None
    return ImageStat(size_bytes, mtime_ns, ctime_ns or 0)


class Reader(Protocol):
    """A backend's connection as the views' queries need it. The SQL it is given is SQLite's
    (``?`` placeholders); tables are named as in :mod:`runner.store.schema`."""

    # The column that orders jobs as they were first planned (SQLite's ``rowid``).
    planned_order: str

    def reading(self) -> AbstractContextManager[None]:
        """Any error of the driver's inside, a table missing included, as :class:`StoreError`."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """One read transaction around the reads inside, unless one is open already (then
        they are of its snapshot)."""
        ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def stream(self, sql: str) -> Iterator[tuple[Any, ...]]:
        """The rows of ``sql``, read as they are consumed, of one snapshot."""
        ...

    def by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (its ``{ids}`` standing for the ids), queried a few hundred ids
        at a time."""
        ...

    def has_table(self, name: str) -> bool: ...

    def first_by_name(self, sql: str) -> dict[str, Any] | None:
        """The first row of ``sql``, by column name; None when there is none."""
        ...


class SqlViews:
    """The views (:class:`~runner.store.views.Views`), each a query run through ``reader``."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    # --- results and ledger -----------------------------------------------------------------

    def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        rows = self._by_ids(
            "SELECT job_id, status, image_path, width, height, sha256, error, error_cause, "
            f"retryable, version, {REVIEW_OF_JOB}, edited_at IS NOT NULL "
            "FROM jobs j WHERE job_id IN ({ids})",
            job_ids,
        )
        make = JobState._make
        return {
            row[0]: make((*row[1:8], bool(row[8]), row[9], row[10], bool(row[11]))) for row in rows
        }

    def job_spend(self, job_ids: Sequence[str]) -> dict[str, JobSpend]:
        rows = self._by_ids(
            "SELECT job_id, COUNT(*), "
            "SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd ELSE 0 END), "
            "SUM(CASE WHEN state = 'possible' THEN cost_micro_usd ELSE 0 END) "
            "FROM attempts WHERE job_id IN ({ids}) GROUP BY job_id",
            job_ids,
        )
        make = JobSpend._make
        return {row[0]: make(row[1:]) for row in rows}

    def billed_attempts(self) -> Iterator[BilledAttempt]:
        make = BilledAttempt._make
        with self._reader.reading():
            yield from map(
                make,
                self._reader.stream(
                    "SELECT job_id, attempt, endpoint, model, size, cost_micro_usd, state, "
                    "input_tokens, output_tokens, total_tokens, finished_at FROM attempts "
                    "WHERE state IN ('confirmed', 'possible') "
                    "ORDER BY finished_at, job_id, attempt"
                ),
            )

    def spend(self) -> Spend:
        with self._reader.reading():
            return self._spend()

    # --- status -------------------------------------------------------------------------------

    def status_facts(self) -> StatusFacts | None:
        with self._reader.reading(), self._reader.snapshot():
            if not self._reader.has_table("runs"):  # a first run is creating the store right now
                return None
            by_status = {
                r[0]: int(r[1]) for r in self._all("SELECT status, COUNT(*) FROM jobs GROUP BY 1")
            }
            retryable = self._one(
                "SELECT COUNT(*) FROM jobs WHERE status = 'failed' AND retryable <> 0"
            )
            failures = {
                str(r[0]): int(r[1])
                for r in self._all(
                    "SELECT COALESCE(error_cause, 'unknown'), COUNT(*) FROM jobs "
                    "WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1"
                )
            }
            attempts = {
                r[0]: (int(r[1]), int(r[2]))
                for r in self._all(
                    "SELECT state, COUNT(*), COALESCE(SUM(cost_micro_usd), 0) FROM attempts "
                    "GROUP BY 1"
                )
            }
            last_activity = self._one(
                "SELECT MAX(t) FROM (SELECT MAX(started_at) AS t FROM attempts "
                "UNION ALL SELECT MAX(finished_at) FROM attempts "
                "UNION ALL SELECT MAX(updated_at) FROM jobs "
                "UNION ALL SELECT MAX(started_at) FROM runs "
                "UNION ALL SELECT MAX(finished_at) FROM runs) AS moments"
            )
            last_run = self._last_run()
        return StatusFacts(
            succeeded=by_status.get("succeeded", 0),
            failed=by_status.get("failed", 0),
            failed_retryable=int(retryable),
            pending=by_status.get("pending", 0),
            in_flight=attempts.get("in_flight", (0, 0))[0],
            confirmed_micro_usd=attempts.get("confirmed", (0, 0))[1],
            possible_micro_usd=attempts.get("possible", (0, 0))[1],
            last_activity_at=last_activity,
            last_run=last_run,
            failures=failures,
        )

    def _last_run(self) -> LastRun | None:
        # By name: ``pid`` came with migration 2.
        row = self._reader.first_by_name("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")
        if row is None:
            return None
        return LastRun(
            run_id=int(row["run_id"]),
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            outcome=row["outcome"],
            pid=row.get("pid"),
        )

    # --- report -------------------------------------------------------------------------------

    @contextmanager
    def report_snapshot(self) -> Iterator[ReportSnapshot]:
        with self._reader.reading(), self._reader.snapshot():
            by_status = dict(self._all("SELECT status, COUNT(*) FROM jobs GROUP BY 1"))
            failures = [
                (str(cause), int(n))
                for cause, n in self._all(
                    "SELECT COALESCE(error_cause, 'unknown'), COUNT(*) FROM jobs "
                    "WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1"
                )
            ]
            reviews: dict[ReviewState, int] = {"approved": 0, "rejected": 0, "unreviewed": 0}
            for review, n in self._all(
                f"SELECT {REVIEW_OF_JOB}, COUNT(*) FROM jobs j "
                "WHERE j.status = 'succeeded' GROUP BY 1"
            ):
                reviews[review] = int(n)
            summary = ReportSummary(
                succeeded=int(by_status.get("succeeded", 0)),
                failed=int(by_status.get("failed", 0)),
                pending=int(by_status.get("pending", 0)),
                failures=failures,
                reviews=reviews,
                spend=self._spend(),
                runs=self._run_spans(),
            )
            yield ReportSnapshot(summary, self._report_jobs())

    def _report_jobs(self) -> Iterator[ReportJob]:
        make = ReportJob._make
        for r in self._reader.stream(_REPORT_JOBS):
            # Most jobs are no edits: their "[]" is not worth a JSON parse each.
            references = () if r[15] == "[]" else tuple(json.loads(r[15]))
            stat = _image_stat(*r[19:])
            yield make((*r[:10], bool(r[10]), *r[11:15], references, *r[16:18], bool(r[18]), stat))

    def _run_spans(self) -> list[RunSpan]:
        starts = self._all("SELECT started_at, finished_at FROM runs ORDER BY started_at")
        runs = []
        for i, (started_at, finished_at) in enumerate(starts):
            end = finished_at
            if end is None:  # still running, or cut off: count it until its last attempt
                # ISO-8601 UTC stamps compare as text; "9" sorts after any of them.
                until = starts[i + 1][0] if i + 1 < len(starts) else "9"
                last = self._one(
                    "SELECT MAX(COALESCE(finished_at, started_at)) FROM attempts "
                    "WHERE started_at >= ? AND started_at < ?",
                    (started_at, until),
                )
                end = last or started_at
            runs.append(RunSpan(started_at, end))
        return runs

    # --- export -------------------------------------------------------------------------------

    def exportable_jobs(self) -> list[ExportJob]:
        with self._reader.reading():
            rows = self._all(
                "SELECT job_id, prompt, size, model, images, image_path, width, height, sha256, "
                f"vars, repeat_index, template, version, {REVIEW_OF_JOB}, edited_at IS NOT NULL, "
                "content_hash FROM jobs j WHERE status = 'succeeded' AND image_path IS NOT NULL "
                f"ORDER BY {self._reader.planned_order}"
            )
        return [
            ExportJob(
                job_id=r[0],
                prompt=r[1],
                size=r[2],
                model=r[3],
                references=tuple(json.loads(r[4])),
                image_path=r[5],
                width=int(r[6]),
                height=int(r[7]),
                sha256=r[8],
                vars=json.loads(r[9]) if r[9] else {},
                repeat_index=r[10],
                template=r[11],
                version=r[12],
                review=r[13],
                edited=bool(r[14]),
                content_hash=r[15],
            )
            for r in rows
        ]

    # --- review -------------------------------------------------------------------------------

    def review_items(
        self,
        *,
        status: JobStatus | None = None,
        review: ReviewState | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> ReviewPage:
        where: list[str] = []
        params: list[str] = []
        if status is not None:
            where.append("j.status = ?")
            params.append(status)
        if review is not None:
            # Only a finished image is reviewed: the review filters select succeeded jobs.
            where.append(f"j.status = 'succeeded' AND {REVIEW_OF_JOB} = ?")
            params.append(review)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        with self._reader.reading(), self._reader.snapshot():
            total = self._one(f"SELECT COUNT(*) FROM jobs j {condition}", tuple(params))
            rows = self._all(
                f"{_REVIEW_ITEMS} {condition} ORDER BY j.job_id LIMIT ? OFFSET ?",
                (*params, max(0, limit), max(0, offset)),
            )
        return ReviewPage([_review_item(r) for r in rows], int(total))

    def review_item(self, job_id: str) -> ReviewItem | None:
        with self._reader.reading():
            rows = self._all(f"{_REVIEW_ITEMS} WHERE j.job_id = ?", (job_id,))
        return _review_item(rows[0]) if rows else None

    def review_counts(self) -> dict[str, int]:
        with self._reader.reading(), self._reader.snapshot():
            counts = dict.fromkeys(
                ("succeeded", "failed", "pending", "approved", "rejected", "unreviewed"), 0
            )
            for status, n in self._all("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
                counts[status] = n
            for review, n in self._all(
                f"SELECT {REVIEW_OF_JOB} AS review, COUNT(*) FROM jobs j "
                "WHERE j.status = 'succeeded' GROUP BY review"
            ):
                counts[review] = n
        return counts

    def job_versions(self, job_id: str) -> list[VersionRecord]:
        with self._reader.reading():
            rows = self._all(
                "SELECT v.job_id, v.version, v.image_path, v.sha256, v.width, v.height, v.reason, "
                "v.retired_at, r.decision, r.reviewer, r.decided_at FROM versions v "
                "LEFT JOIN reviews r ON r.review_id = (SELECT MAX(review_id) FROM reviews "
                "WHERE reviews.job_id = v.job_id AND reviews.version = v.version) "
                "WHERE v.job_id = ? ORDER BY v.version",
                (job_id,),
            )
        make = VersionRecord._make
        return [make((*r[:8], r[8] or "unreviewed", *r[9:])) for r in rows]

    # --- reading ------------------------------------------------------------------------------

    def _spend(self) -> Spend:
        confirmed, possible = self._all(SPEND_SQL)[0]
        return Spend(int(confirmed), int(possible))

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._reader.all(sql, params)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The one value of a query that returns one row of one column."""
        return self._all(sql, params)[0][0]

    def _by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        with self._reader.reading():
            return self._reader.by_ids(sql, job_ids)


class SqliteReader:
    """The :class:`Reader` of a SQLite checkpoint open as ``db``, the checkpoint of ``folder``."""

    planned_order = "rowid"

    def __init__(self, db: sqlite3.Connection, folder: Path) -> None:
        self._db = db
        self.folder = folder

    def reading(self) -> AbstractContextManager[None]:
        return reading(self.folder)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        began = not self._db.in_transaction
        if began:
            self._db.execute("BEGIN")
        try:
            yield
        finally:
            if began and self._db.in_transaction:
                self._db.execute("ROLLBACK")  # it only read: nothing to keep

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cursor().execute(sql, params).fetchall()

    def stream(self, sql: str) -> Iterator[tuple[Any, ...]]:
        # One statement reads one snapshot in SQLite, inside a transaction or not.
        return self._cursor().execute(sql)

    def by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        return rows_by_ids(self._db, sql, job_ids)

    def has_table(self, name: str) -> bool:
        found = self.all("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return bool(found)

    def first_by_name(self, sql: str) -> dict[str, Any] | None:
        cursor = self._db.cursor()
        cursor.row_factory = sqlite3.Row
        row = cursor.execute(sql).fetchone()
        return None if row is None else dict(row)

    def _cursor(self) -> sqlite3.Cursor:
        cursor = self._db.cursor()
        cursor.row_factory = None  # plain tuples: these read up to millions of rows
        return cursor


class SqliteViews(SqlViews):
    """The views' reads of the checkpoint open as ``db``, the checkpoint of ``folder``."""

    def __init__(self, db: sqlite3.Connection, folder: Path) -> None:
        super().__init__(SqliteReader(db, folder))
        self.folder = folder
