"""The SQLite backend of :class:`~runner.store.base.Store`: one checkpoint file in the output
folder that makes runs resumable (its schema and opening: :mod:`runner.store.schema`).

Design, after the crash-safe recipe in RELIABILITY.md:

- One writer: the process holding the folder's lock (:func:`.schema.lock_and_connect`). The
  lock gives this process every job of the folder, so :meth:`SqliteStore.claim` hands the pool
  all it is given.
- Write-ahead intent: an ``attempts`` row in state ``in_flight`` is committed *before* each
  request goes out. An outcome turns it into ``confirmed`` (an image came back), ``possible``
  (the request was sent and the outcome is unknown) or ``unbilled`` (it never reached the server,
  or the server answered with an error). An attempt found ``in_flight`` on open was cut off by
  a crash, so it becomes ``possible``.
- ``jobs`` holds one row per job ever planned here: its status, and for a success the image's
  path, size and sha256, committed only after the image file is durably in place (its folder
  fsynced by the group commit first, once a batch), with the file's size, mtime and ctime at
  that moment: as in git's index, a later run re-hashes the image only when they differ.
- A job's earlier images (rejected, edited by hand, changed, gone) are ``versions`` rows, the
  job moving on to its next version: the SQL is :mod:`runner.store.versioning`'s.
- Several writes can share one transaction (:meth:`SqliteStore.batch`), as planning does for
  thousands of jobs at a time: they commit together, durably, or not at all.
- The pool's writes (:meth:`~SqliteStore.begin_attempt`, :meth:`~SqliteStore.record_outcome`,
  :meth:`~SqliteStore.record_success`, :meth:`~SqliteStore.record_failure`) are handed to the
  group commit (:mod:`runner.store.groupcommit`) and return once durable. Each has a
  synchronous twin, ``commit_*``, that does the same write on the calling thread: what the
  group commit runs, and how a checkpoint is built by hand.
- Failing safely: a transaction that fails, its ``COMMIT`` included, is rolled back, so the
  connection is ready for the next. A write SQLite refuses (disk full, I/O error, a read-only
  file) raises :class:`~runner.errors.StoreWriteError`, and the first is kept as
  ``write_failure``: once intents cannot be recorded nothing more may be sent, so the run stops
  on it. The folder's lock and the database handle are released on every path out, a failed
  open included.
- Two threads write: the event loop's and the group commit's. One transaction at a time: the
  outermost block holds a lock until it ends, and nested blocks join only a transaction of
  their own thread.

Money is stored as integer micro-dollars so that sums are exact to the cent.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from runner.errors import ApiError, StoreError, StoreWriteError
from runner.jobs import Job
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.redact import redact
from runner.store import versioning
from runner.store.base import (
    AttemptState,
    Budget,
    ImageStat,
    JobRecord,
    KeptVersion,
    Outcome,
    RetireReason,
    SavedImage,
)
from runner.store.groupcommit import GroupCommit
from runner.store.schema import (
    DB_NAME,
    REVIEW_OF_JOB,
    SPEND_SQL,
    connect_for_dry_run,
    connect_read_only,
    lock_and_connect,
    mark_closed_cleanly,
    now_iso,
    reading,
    rows_by_ids,
)
from runner.store.single import SingleProcess

if TYPE_CHECKING:
    from runner.store.queries import SqliteViews

T = TypeVar("T")


class SqliteStore(SingleProcess):
    """The checkpoint of one output folder. Open with :meth:`open` (a run),
    :meth:`open_read_only` (the views) or :meth:`open_for_dry_run`; close when done.

    While the pool's writes may be pending in the group commit, use only those from the event
    loop, and :meth:`drain` before any other call."""

    def __init__(self, db: sqlite3.Connection, lock_fd: int | None, folder: Path) -> None:
        self.db = db
        self.folder = folder
        self._lock_fd = lock_fd
        self._transacting = threading.Lock()  # held by the outermost batch() block
        self._thread = threading.local()  # .depth: this thread's nested batch() blocks
        self._commits = GroupCommit(db, self.batch)
        # The first write SQLite refused, if any: whoever caught it, the run must stop.
        self.write_failure: StoreWriteError | None = None

    @classmethod
    def open(cls, folder: Path) -> SqliteStore:
        """Lock ``folder`` for this process and open (or create) its checkpoint, for a run; a
        folder or checkpoint it may not write is refused here, before anything is sent."""
        db, lock_fd = lock_and_connect(folder)
        return cls(db, lock_fd, folder)

    @classmethod
    def open_read_only(cls, folder: Path) -> SqliteStore:
        """To read, without the lock, while a run may write: :func:`.schema.connect_read_only`."""
        return cls(connect_read_only(folder), None, folder)

    @classmethod
    def open_for_dry_run(cls, folder: Path) -> SqliteStore:
        """To plan from, changing nothing on disk: :func:`.schema.connect_for_dry_run`."""
        return cls(connect_for_dry_run(folder), None, folder)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (marked closed cleanly: :func:`.schema.mark_closed_cleanly`), and
        release the folder's lock whatever that raises; SQLite's refusal is a StoreError."""
        try:
            try:
                self._commits.close()
                if self._lock_fd is not None and self.write_failure is None:
                    mark_closed_cleanly(self.db, self._transacting)
            finally:
                self.db.close()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextmanager
    def batch(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) around several writes:
        they commit together, durably, or not at all. The writes of this class made inside
        join it, and so do nested blocks of the same thread; another thread's block waits for
        it to end. An exception leaving the outermost block, or a failed ``COMMIT``, rolls
        everything back; an error of SQLite's is raised as :class:`StoreWriteError`. Count
        nothing as done before the outermost block has ended."""
        depth: int = getattr(self._thread, "depth", 0)
        if depth:
            self._thread.depth = depth + 1
            try:
                yield self.db
            finally:
                self._thread.depth = depth
            return
        with self._transacting:
            self._thread.depth = 1
            try:
                self.db.execute("BEGIN IMMEDIATE")
                yield self.db
                self.db.execute("COMMIT")
            except BaseException as exc:
                if self.db.in_transaction:  # SQLite ends it itself on some errors (disk full)
                    with contextlib.suppress(sqlite3.Error):  # the first error is the one to tell
                        self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._write_error(exc) from exc
                raise
            finally:
                self._thread.depth = 0

    def _write_error(self, error: sqlite3.Error) -> StoreWriteError:
        failure = StoreWriteError(f"cannot write the checkpoint {self.folder / DB_NAME}: {error}")
        self.write_failure = self.write_failure or failure
        return failure

    # --- the pool: grouped writes, each returning once durable ----------------------------

    async def claim(self, todo: Iterable[Job]) -> AsyncIterator[Job]:
        """Every job of ``todo``, as the pool takes them: the folder's lock, held since
        :meth:`open`, gives this process all of them; no other worker claims any."""
        for job in todo:
            yield job

    async def begin_attempt(self, job: Job) -> int:
        """Record the intent to send the next attempt of ``job``; return its number."""
        return await self._grouped(lambda: self.commit_intent(job))

    async def record_outcome(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """How an attempt that brought no image ended; the job stays pending."""
        await self._grouped(lambda: self.commit_outcome(job_id, attempt, outcome))

    async def record_success(
        self, job_id: str, attempt: int, outcome: Outcome, image: SavedImage
    ) -> None:
        """A finished job, its image durably in place once the group commit fsyncs its folder."""
        folder = (self.folder / image.path).parent
        await self._grouped(partial(self.commit_success, job_id, attempt, outcome, image), folder)

    async def record_failure(
        self, job_id: str, attempt: int, outcome: Outcome, error: ApiError, *, retry_later: bool
    ) -> None:
        """The attempt that ends a job, and the job failed, in one transaction."""
        await self._grouped(
            lambda: self.commit_failure(job_id, attempt, outcome, error, retry_later=retry_later)
        )

    async def drain(self) -> None:
        """Wait until every write handed to the group commit so far is committed."""
        await self._commits.drain()

    async def _grouped(self, change: Callable[[], T], sync_first: Path | None = None) -> T:
        """Run ``change`` (this class's writes) in a group commit, after fsyncing ``sync_first``;
        its result once durably committed, or :class:`StoreWriteError` (SQLite refused it)."""
        try:
            return await self._commits.run(lambda _: change(), sync_first=sync_first)
        except sqlite3.Error as exc:  # this write's own failure, under its savepoint
            raise self._write_error(exc) from exc

    # --- attempts, synchronously: one transaction each, or a part of an enclosing batch() ---

    def commit_intent(self, job: Job) -> int:
        """Commit the intent to send the next attempt of ``job``; return its number."""
        with self.batch() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE job_id = ?", (job.id,)
            ).fetchone()
            attempt = int(row[0]) + 1
            db.execute(
                "INSERT INTO attempts (job_id, attempt, endpoint, model, size, state, started_at) "
                "VALUES (?, ?, ?, ?, ?, 'in_flight', ?)",
                (job.id, attempt, job.endpoint, job.model, job.size, now_iso()),
            )
            return attempt

    def commit_outcome(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """Commit how an attempt that brought no image ended."""
        with self.batch() as db:
            self._finish_attempt(db, job_id, attempt, outcome)

    def commit_success(
        self, job_id: str, attempt: int, outcome: Outcome, image: SavedImage
    ) -> None:
        """Commit a finished job; its image must already be durably on disk."""
        stat = image.stat or self._image_stat(image.path)
        with self.batch() as db:
            self._finish_attempt(db, job_id, attempt, outcome)
            self._succeeded(db, job_id, image, stat)

    def commit_failure(
        self, job_id: str, attempt: int, outcome: Outcome, error: ApiError, *, retry_later: bool
    ) -> None:
        """Commit how the attempt that ends a job ended, and the job as failed, together: a
        crash between the two would leave a billed job pending, to be paid for again.
        ``retry_later`` lets the next run of the manifest try the job again."""
        with self.batch() as db:
            self._finish_attempt(db, job_id, attempt, outcome)
            db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, error_cause = ?, retryable = ?, "
                "updated_at = ? WHERE job_id = ?",
                (redact(error.describe()), error.cause, int(retry_later), now_iso(), job_id),
            )

    def _finish_attempt(
        self, db: sqlite3.Connection, job_id: str, attempt: int, o: Outcome
    ) -> None:
        state = "unbilled" if o.billing == "none" else o.billing
        db.execute(
            "UPDATE attempts SET state = ?, cost_micro_usd = ?, input_tokens = ?, "
            "output_tokens = ?, total_tokens = ?, error = ?, finished_at = ? "
            "WHERE job_id = ? AND attempt = ?",
            (
                state,
                o.cost_micro_usd if o.billing != "none" else 0,
                o.input_tokens,
                o.output_tokens,
                o.total_tokens,
                redact(o.error) if o.error else None,
                now_iso(),
                job_id,
                attempt,
            ),
        )

    def _succeeded(
        self,
        db: sqlite3.Connection,
        job_id: str,
        image: SavedImage,
        stat: ImageStat | tuple[None, None, None],
    ) -> None:
        db.execute(
            "UPDATE jobs SET status = 'succeeded', image_path = ?, width = ?, height = ?, "
            "sha256 = ?, image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ?, "
            "error = NULL, error_cause = NULL, retryable = 0, updated_at = ? "
            "WHERE job_id = ?",
            (image.path, image.width, image.height, image.sha256, *stat, now_iso(), job_id),
        )

    def _image_stat(self, image_path: str) -> ImageStat | tuple[None, None, None]:
        try:
            return ImageStat.of((self.folder / image_path).stat())
        except OSError:  # then the next run hashes it, or finds it gone and makes it again
            return None, None, None

    # --- planning -------------------------------------------------------------------------

    def job_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of ``job_ids`` the checkpoint has."""
        rows = self._by_ids(
            "SELECT job_id, content_hash, status, image_path, sha256, retryable, error_cause, "
            f"image_size_bytes, image_mtime_ns, image_ctime_ns, version, {REVIEW_OF_JOB}, "
            "edited_at, vars IS NOT NULL FROM jobs j WHERE job_id IN ({ids})",
            job_ids,
        )
        make = JobRecord._make
        return {row[0]: make(row) for row in rows}

    def finished_images(self, job_ids: Sequence[str]) -> set[str]:
        """The image paths recorded for those of ``job_ids`` that succeeded."""
        rows = self._by_ids(
            "SELECT image_path FROM jobs WHERE status = 'succeeded' AND image_path IS NOT NULL "
            "AND job_id IN ({ids})",
            job_ids,
        )
        return {row[0] for row in rows}

    def _by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        with reading(self.folder):
            return rows_by_ids(self.db, sql, job_ids)

    def plan_jobs(self, jobs: Iterable[Job]) -> None:
        """Record the manifest's jobs; a job whose content changed starts over as pending."""
        stamp = now_iso()
        with self.batch() as db:
            db.executemany(
                """
                INSERT INTO jobs (job_id, content_hash, status, endpoint, model, size, prompt,
                                  images, updated_at, vars, repeat_index, template)
                VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (job_id) DO UPDATE SET
                    content_hash = excluded.content_hash, status = 'pending',
                    endpoint = excluded.endpoint, model = excluded.model, size = excluded.size,
                    prompt = excluded.prompt, images = excluded.images, vars = excluded.vars,
                    repeat_index = excluded.repeat_index, template = excluded.template,
                    image_path = NULL, width = NULL, height = NULL, sha256 = NULL,
                    image_size_bytes = NULL, image_mtime_ns = NULL, image_ctime_ns = NULL,
                    error = NULL, error_cause = NULL, retryable = 0,
                    updated_at = excluded.updated_at
                WHERE jobs.content_hash != excluded.content_hash
                """,
                (
                    (
                        job.id,
                        job.content_hash,
                        job.endpoint,
                        job.model,
                        job.size,
                        job.prompt,
                        json.dumps([str(p) for p in job.images]) if job.images else "[]",
                        stamp,
                        *metadata_columns(job),
                    )
                    for job in jobs
                ),
            )

    def record_metadata(self, jobs: Iterable[Job]) -> None:
        with self.batch() as db:
            db.executemany(
                "UPDATE jobs SET vars = ?, repeat_index = ?, template = ? WHERE job_id = ?",
                ((*metadata_columns(job), job.id) for job in jobs),
            )

    def retire_image(
        self,
        job_id: str,
        reason: RetireReason,
        moved_to: str | None,
        found_sha256: str | None = None,
    ) -> None:
        """Make the succeeded job's image an earlier version kept at ``moved_to``; the job is
        pending at the next version (see :meth:`Store.retire_image`)."""
        with self.batch() as db:
            versioning.retire(db, job_id, reason, moved_to, now_iso(), found_sha256)

    def record_edit(self, job_id: str, sha256: str, stat: ImageStat, size: tuple[int, int]) -> None:
        """Keep the succeeded job's image, edited by hand, as its next version; the generated
        one's sha256 and size stay as an earlier version (see :meth:`Store.record_edit`)."""
        with self.batch() as db:
            versioning.record_edit(db, job_id, sha256, stat, size, now_iso())

    def unmoved_versions(self) -> list[KeptVersion]:
        """The earlier images whose move to their file is not recorded as done."""
        with reading(self.folder):
            return versioning.unmoved_versions(self.db)

    def mark_moved(self, versions: Sequence[tuple[str, int]]) -> None:
        """Record the moves of ``versions`` as done (see :meth:`Store.mark_moved`)."""
        with self.batch() as db:
            versioning.mark_moved(db, versions)

    def record_image_stat(self, job_id: str, stat: ImageStat) -> None:
        """Note the stat of a finished image found intact by its sha256 after its stat had
        changed (a copy of the folder, a ``touch``), so the next run need not hash it."""
        with self.batch() as db:
            db.execute(
                "UPDATE jobs SET image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ? "
                "WHERE job_id = ?",
                (*stat, job_id),
            )

    def adopt(self, job_id: str, image: SavedImage) -> None:
        """Take an image found on disk without its outcome row (a crash between the rename
        and the commit): the job is done, and the attempt that made it was billed. The
        image's ``stat`` is the file's, taken before it was read and hashed."""
        stat = image.stat or self._image_stat(image.path)
        with self.batch() as db:
            db.execute(
                "UPDATE attempts SET state = 'confirmed', cost_micro_usd = ?, "
                "finished_at = COALESCE(finished_at, ?) "
                "WHERE job_id = ? AND attempt = (SELECT MAX(attempt) FROM attempts "
                "WHERE job_id = ? AND state IN ('in_flight', 'possible'))",
                (PRICE_PER_IMAGE_MICRO_USD, now_iso(), job_id, job_id),
            )
            self._succeeded(db, job_id, image, stat)

    def adoption_charge(self, job_id: str) -> tuple[AttemptState, int] | None:
        """``(state, cost_micro_usd)`` of the attempt :meth:`adopt` would confirm, if any: what a
        dry run moves from possible to confirmed spend."""
        with reading(self.folder):
            row = self.db.execute(
                "SELECT state, cost_micro_usd FROM attempts WHERE job_id = ? "
                "AND state IN ('in_flight', 'possible') ORDER BY attempt DESC LIMIT 1",
                (job_id,),
            ).fetchone()
        return None if row is None else (row[0], int(row[1]))

    def in_flight_count(self) -> int:
        """Attempts in flight: :meth:`settle_in_flight` would make them possible charges."""
        with reading(self.folder):
            sql = "SELECT COUNT(*) FROM attempts WHERE state = 'in_flight'"
            row = self.db.execute(sql).fetchone()
        return int(row[0])

    def settle_in_flight(self) -> int:
        """Turn attempts left in flight (by a crash or an abrupt stop) into possible charges."""
        with self.batch() as db:
            cursor = db.execute(
                "UPDATE attempts SET state = 'possible', cost_micro_usd = ?, "
                "error = 'interrupted while in flight', finished_at = ? "
                "WHERE state = 'in_flight'",
                (PRICE_PER_IMAGE_MICRO_USD, now_iso()),
            )
            return cursor.rowcount

    # --- runs and reading -------------------------------------------------------------------

    def start_run(self) -> int:
        with self.batch() as db:
            cursor = db.execute(
                "INSERT INTO runs (started_at, pid) VALUES (?, ?)", (now_iso(), os.getpid())
            )
            return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, outcome: str) -> None:
        with self.batch() as db:
            db.execute(
                "UPDATE runs SET finished_at = ?, outcome = ? WHERE run_id = ?",
                (now_iso(), outcome, run_id),
            )

    def budget(self, cap_micro_usd: int | None) -> Budget:
        """A budget in memory, starting from the spend recorded: this process holds the
        folder's lock, so nobody else spends from it while it runs."""
        return Budget(cap_micro_usd, sum(self.spend_micro_usd()))

    def spend_micro_usd(self) -> tuple[int, int]:
        """(confirmed, possible) spend recorded in this folder, in micro-dollars."""
        with reading(self.folder):
            row = self.db.execute(SPEND_SQL).fetchone()
        return int(row[0]), int(row[1])

    def views(self) -> SqliteViews:
        """What the results, ledger, report, status and export read."""
        from runner.store.queries import SqliteViews

        return SqliteViews(self.db, self.folder)


def metadata_columns(job: Job) -> tuple[str, int | None, str | None]:
    """The ``vars``, ``repeat_index`` and ``template`` columns of ``job``."""
    variables = json.dumps(dict(job.vars), ensure_ascii=False) if job.vars else "{}"
    return variables, job.repeat_index, job.template or None
