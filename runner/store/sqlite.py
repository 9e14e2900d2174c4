"""The checkpoint database: one SQLite file in the output folder that makes runs resumable.

Design, after the crash-safe recipe in RELIABILITY.md:

- WAL journal with ``synchronous=FULL`` (WAL with NORMAL may lose a commit on power loss), a
  ``busy_timeout``, ``BEGIN IMMEDIATE`` for every write, ``PRAGMA integrity_check`` on open.
- One writer: the process holding the folder's lock file (``.lock``, an ``flock``); a second
  run on the same folder is refused before it touches anything.
- Write-ahead intent: an ``attempts`` row in state ``in_flight`` is committed *before* each
  request goes out. An outcome turns it into ``confirmed`` (an image came back), ``possible``
  (the request was sent and the outcome is unknown) or ``unbilled`` (it never reached the server,
  or the server answered with an error). An attempt found ``in_flight`` on open was cut off by
  a crash, so it becomes ``possible``.
- ``jobs`` holds one row per job ever planned here: its status, and for a success the image's
  path, size and sha256, committed only after the image file is durably in place, with the
  file's size, mtime and ctime at that moment: as in git's index, a later run re-hashes the
  image only when they differ (see :mod:`runner.core.plan`).
- Several writes can share one transaction (:meth:`Store.transaction`), as planning does for
  thousands of jobs at a time: they commit together, durably, or not at all.
- Schema changes are ordered migrations recorded in ``migrations``. Those a checkpoint lacks are
  applied together, in one transaction, so nobody ever sees it half upgraded; a checkpoint from
  a newer version is refused untouched, by a run and by the read-only commands, which also
  refuse an older one (a run upgrades it).
- Failing safely: a transaction that fails, its ``COMMIT`` included, is rolled back, so the
  connection is ready for the next. A write SQLite refuses (disk full, I/O error, a read-only
  file) raises :class:`~runner.errors.StoreWriteError`: once intents cannot be recorded nothing
  more may be sent, so the run stops on it. The folder's lock and the database handle are
  released on every path out, a failed open included.
- Two threads write: the event loop's and the group commit's (see :mod:`runner.store.groupcommit`).
  One transaction at a time: the outermost block holds a lock until it ends, and nested blocks
  join only a transaction of their own thread.

Money is stored as integer micro-dollars so that sums are exact to the cent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from runner.errors import ApiError, Billing, OutputLockedError, StoreError, StoreWriteError
from runner.images.files import temp_path_for
from runner.jobs import Job, JobStatus
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.redact import redact
from runner.store.groupcommit import GroupCommit

if TYPE_CHECKING:
    from runner.store.queries import SqliteViews

T = TypeVar("T")

DB_NAME = "checkpoint.sqlite"
LOCK_NAME = ".lock"

AttemptState = Literal["in_flight", "confirmed", "possible", "unbilled"]

_MIGRATIONS = (
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        content_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        size TEXT,
        prompt TEXT NOT NULL,
        images TEXT NOT NULL,
        image_path TEXT,
        width INTEGER,
        height INTEGER,
        sha256 TEXT,
        error TEXT,
        error_cause TEXT,
        retryable INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        size TEXT,
        state TEXT NOT NULL
            CHECK (state IN ('in_flight', 'confirmed', 'possible', 'unbilled')),
        cost_micro_usd INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER,
        output_tokens INTEGER,
        total_tokens INTEGER,
        error TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE INDEX attempts_state ON attempts (state);
    CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        outcome TEXT
    );
    """,
    # 2: which process runs, so `image-runner status` can tell a live run without the lock.
    """
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    """,
    # 3: the stat of each finished image, so a rerun re-hashes only images whose stat changed.
    """
    ALTER TABLE jobs ADD COLUMN image_size_bytes INTEGER;
    ALTER TABLE jobs ADD COLUMN image_mtime_ns INTEGER;
    ALTER TABLE jobs ADD COLUMN image_ctime_ns INTEGER;
    """,
)

# Lookups by id are split into queries of this many ids: SQLite before 3.32 allows 999
# parameters a statement.
_IDS_PER_QUERY = 500


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ImageStat(NamedTuple):
    """What ``stat`` says of a finished image. Any change of content changes the ctime, even
    when a tool puts the old mtime back; a change within the same clock tick as the image's
    own write, keeping its size, would go unseen (git's "racy" case), a risk taken for files
    nobody but the runner writes."""

    size_bytes: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> ImageStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class JobRecord(NamedTuple):
    """A job's row, as planning needs it (a named tuple: planning reads a million of them)."""

    job_id: str
    content_hash: str
    status: JobStatus
    image_path: str | None
    sha256: str | None
    retryable: int  # 0 or 1
    error_cause: str | None
    image_size_bytes: int | None = None
    image_mtime_ns: int | None = None
    image_ctime_ns: int | None = None

    @property
    def image_stat(self) -> ImageStat | None:
        """The finished image's stat recorded with its success; None if not recorded (by a
        version before migration 3): then only its sha256 tells."""
        if self.image_size_bytes is None or self.image_mtime_ns is None:
            return None
        return ImageStat(self.image_size_bytes, self.image_mtime_ns, self.image_ctime_ns or 0)


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended with, as the pool tells the store."""

    billing: Billing
    cost_micro_usd: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    error: str | None = None


class Store:
    """The checkpoint of one output folder. Open with :meth:`open`; close when done."""

    def __init__(self, db: sqlite3.Connection, lock_fd: int | None, folder: Path) -> None:
        self.db = db
        self.folder = folder
        self._lock_fd = lock_fd
        self._transacting = threading.Lock()  # held by the outermost transaction() block
        self._thread = threading.local()  # .depth: this thread's nested transaction() blocks
        self._commits = GroupCommit(db, self.transaction)
        # The first write SQLite refused, if any: whoever caught it, the run must stop.
        self.write_failure: StoreWriteError | None = None

    @classmethod
    def open(cls, folder: Path) -> Store:
        """Lock ``folder`` for this process and open (or create) its checkpoint. A folder or a
        checkpoint this process may not write is refused here, before anything is sent."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(folder, exc) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OutputLockedError(
                f"{folder} is in use by another image-runner run; wait for it to finish, "
                "or pass --out to use another folder"
            ) from None
        try:
            check_writable(folder)
            db = _connect(folder / DB_NAME)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(db, lock_fd, folder)

    @classmethod
    def open_read_only(cls, folder: Path) -> Store:
        """Open the checkpoint for reading, without the lock, while a run may be writing it.
        One written by another version is refused with a message saying which way to go."""
        path = folder / DB_NAME
        if not path.is_file():
            raise StoreError(f"{folder} holds no image-runner checkpoint")
        return cls(_connect_for_reading(path, "mode=ro"), None, folder)

    @classmethod
    def open_for_dry_run(cls, folder: Path) -> Store:
        """Open the checkpoint to plan from it while changing nothing on disk: no lock taken,
        no file created, a live run undisturbed. With no checkpoint yet (nor folder), an empty
        one in memory.

        :meth:`open_read_only` would leave a ``-wal`` and a ``-shm`` behind in a folder no run
        has open. So: when a ``-wal`` exists (a run is live, or one died leaving commits the
        main file lacks), it is read through that WAL as usual (SQLite may rebuild its
        ``-shm`` index, nothing else); otherwise the main file is whole, and is read as
        immutable, which creates no file. A run starting while the dry run reads may then
        make the dry run's figures stale; it never disturbs the run.
        """
        path = folder / DB_NAME
        if not path.is_file():
            # Planning reads it from a worker thread (one at a time), as it does a run's.
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            _migrate(db)
            return cls(db, None, folder)
        live = path.with_name(f"{DB_NAME}-wal").exists()
        mode = "mode=ro" if live else "mode=ro&immutable=1"
        return cls(_connect_for_reading(path, mode), None, folder)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database, and release the folder's lock whatever that raises: an ended
        run must never leave its folder locked."""
        try:
            try:
                self._commits.close()
            finally:
                self.db.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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

    _write = transaction

    def _write_error(self, error: sqlite3.Error) -> StoreWriteError:
        failure = StoreWriteError(f"cannot write the checkpoint {self.folder / DB_NAME}: {error}")
        self.write_failure = self.write_failure or failure
        return failure

    async def write(self, change: Callable[[Store], T]) -> T:
        """Run ``change(self)``, which calls this class's write methods, in a group commit
        with the writes of other workers (see :mod:`runner.store.groupcommit`); return its result
        once it is durably committed. While such writes may be pending, use only this from
        the event loop, and :meth:`drain` before any other call. Raises
        :class:`StoreWriteError` when SQLite refuses the write."""
        try:
            return await self._commits.run(lambda _: change(self))
        except sqlite3.Error as exc:  # this write's own failure, under its savepoint
            raise self._write_error(exc) from exc

    async def drain(self) -> None:
        """Wait until every :meth:`write` handed over so far is committed."""
        await self._commits.drain()

    def begin_next_attempt(self, job: Job) -> int:
        """Commit the intent to send the next attempt of ``job``; return its number."""
        with self._write():
            attempt = self.next_attempt(job.id)
            self.begin_attempt(job, attempt)
            return attempt

    # --- jobs -------------------------------------------------------------------------------

    def job_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of ``job_ids`` the checkpoint has."""
        rows = self._by_ids(
            "SELECT job_id, content_hash, status, image_path, sha256, retryable, error_cause, "
            "image_size_bytes, image_mtime_ns, image_ctime_ns FROM jobs WHERE job_id IN ({ids})",
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

    def job_states(self, job_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """For the results: job id -> ``(status, image_path, width, height, sha256, error,
        error_cause, retryable)`` of those of ``job_ids`` the checkpoint has."""
        rows = self._by_ids(
            "SELECT job_id, status, image_path, width, height, sha256, error, error_cause, "
            "retryable FROM jobs WHERE job_id IN ({ids})",
            job_ids,
        )
        return {row[0]: row[1:] for row in rows}

    def job_spend(self, job_ids: Sequence[str]) -> dict[str, tuple[int, int, int]]:
        """Job id -> ``(attempts, confirmed, possible)``, in micro-dollars, of those of
        ``job_ids`` with attempts."""
        rows = self._by_ids(
            "SELECT job_id, COUNT(*), "
            "SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd ELSE 0 END), "
            "SUM(CASE WHEN state = 'possible' THEN cost_micro_usd ELSE 0 END) "
            "FROM attempts WHERE job_id IN ({ids}) GROUP BY job_id",
            job_ids,
        )
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def _by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (its ``{ids}`` standing for the ids), queried a few hundred ids
        at a time, as plain tuples: these read up to millions of rows."""
        cursor = self.db.cursor()
        cursor.row_factory = None
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(job_ids), _IDS_PER_QUERY):
            chunk = job_ids[start : start + _IDS_PER_QUERY]
            rows += cursor.execute(sql.format(ids=",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def upsert_jobs(self, jobs: Iterable[Job]) -> None:
        """Record the manifest's jobs; a job whose content changed starts over as pending."""
        stamp = now_iso()
        with self._write() as db:
            db.executemany(
                """
                INSERT INTO jobs (job_id, content_hash, status, endpoint, model, size, prompt,
                                  images, updated_at)
                VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)
                ON CONFLICT (job_id) DO UPDATE SET
                    content_hash = excluded.content_hash, status = 'pending',
                    endpoint = excluded.endpoint, model = excluded.model, size = excluded.size,
                    prompt = excluded.prompt, images = excluded.images,
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
                    )
                    for job in jobs
                ),
            )

    def mark_pending(self, job_id: str) -> None:
        """Forget a success whose image is gone or altered, so the job is done again."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET status = 'pending', image_path = NULL, sha256 = NULL, "
                "width = NULL, height = NULL, image_size_bytes = NULL, image_mtime_ns = NULL, "
                "image_ctime_ns = NULL, updated_at = ? WHERE job_id = ?",
                (now_iso(), job_id),
            )

    def record_image_stat(self, job_id: str, stat: ImageStat) -> None:
        """Note the stat of a finished image found intact by its sha256 after its stat had
        changed (a copy of the folder, a ``touch``), so the next run need not hash it."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ? "
                "WHERE job_id = ?",
                (*stat, job_id),
            )

    # --- attempts ---------------------------------------------------------------------------

    def next_attempt(self, job_id: str) -> int:
        row = self.db.execute(
            "SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE job_id = ?", (job_id,)
        ).fetchone()
        return int(row[0]) + 1

    def begin_attempt(self, job: Job, attempt: int) -> None:
        """Commit the intent to send ``attempt`` of ``job``; call before the request goes out."""
        with self._write() as db:
            db.execute(
                "INSERT INTO attempts (job_id, attempt, endpoint, model, size, state, started_at) "
                "VALUES (?, ?, ?, ?, ?, 'in_flight', ?)",
                (job.id, attempt, job.endpoint, job.model, job.size, now_iso()),
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

    def record_success(
        self,
        job_id: str,
        attempt: int,
        outcome: Outcome,
        *,
        image_path: str,
        width: int,
        height: int,
        sha256: str,
    ) -> None:
        """Commit a finished job; its image must already be durably on disk."""
        stat = self._image_stat(image_path)
        with self._write() as db:
            self._finish_attempt(db, job_id, attempt, outcome)
            db.execute(
                "UPDATE jobs SET status = 'succeeded', image_path = ?, width = ?, height = ?, "
                "sha256 = ?, image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ?, "
                "error = NULL, error_cause = NULL, retryable = 0, updated_at = ? "
                "WHERE job_id = ?",
                (image_path, width, height, sha256, *stat, now_iso(), job_id),
            )

    def _image_stat(self, image_path: str) -> ImageStat | tuple[None, None, None]:
        try:
            return ImageStat.of((self.folder / image_path).stat())
        except OSError:  # then the next run hashes it, or finds it gone and makes it again
            return None, None, None

    def record_attempt(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """Commit how an attempt that brought no image ended."""
        with self._write() as db:
            self._finish_attempt(db, job_id, attempt, outcome)

    def record_failure(
        self, job_id: str, attempt: int, outcome: Outcome, error: ApiError, *, retry_later: bool
    ) -> None:
        """Commit how the attempt that ends a job ended, and the job as failed, together: a
        crash between the two would leave a billed job pending, to be paid for again."""
        with self._write() as db:
            self._finish_attempt(db, job_id, attempt, outcome)
            self.mark_failed(job_id, error, retry_later=retry_later)

    def mark_failed(self, job_id: str, error: ApiError, *, retry_later: bool) -> None:
        """Commit a job as failed; ``retry_later`` lets the next run of the manifest try again."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, error_cause = ?, retryable = ?, "
                "updated_at = ? WHERE job_id = ?",
                (redact(error.describe()), error.cause, int(retry_later), now_iso(), job_id),
            )

    def adopt(
        self,
        job_id: str,
        *,
        image_path: str,
        width: int,
        height: int,
        sha256: str,
        stat: ImageStat | None = None,
    ) -> None:
        """Take an image found on disk without its outcome row (a crash between the rename
        and the commit): the job is done, and the attempt that made it was billed. ``stat``
        is the file's, taken before it was read and hashed."""
        image_stat = stat or self._image_stat(image_path)
        with self._write() as db:
            db.execute(
                "UPDATE attempts SET state = 'confirmed', cost_micro_usd = ?, "
                "finished_at = COALESCE(finished_at, ?) "
                "WHERE job_id = ? AND attempt = (SELECT MAX(attempt) FROM attempts "
                "WHERE job_id = ? AND state IN ('in_flight', 'possible'))",
                (PRICE_PER_IMAGE_MICRO_USD, now_iso(), job_id, job_id),
            )
            db.execute(
                "UPDATE jobs SET status = 'succeeded', image_path = ?, width = ?, height = ?, "
                "sha256 = ?, image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ?, "
                "error = NULL, error_cause = NULL, retryable = 0, updated_at = ? "
                "WHERE job_id = ?",
                (image_path, width, height, sha256, *image_stat, now_iso(), job_id),
            )

    def adoption_charge(self, job_id: str) -> tuple[AttemptState, int] | None:
        """``(state, cost_micro_usd)`` of the attempt :meth:`adopt` would confirm, if any: what a
        dry run moves from possible to confirmed spend."""
        row = self.db.execute(
            "SELECT state, cost_micro_usd FROM attempts WHERE job_id = ? "
            "AND state IN ('in_flight', 'possible') ORDER BY attempt DESC LIMIT 1",
            (job_id,),
        ).fetchone()
        return None if row is None else (row[0], int(row[1]))

    def in_flight_count(self) -> int:
        """Attempts in flight: :meth:`settle_in_flight` would make them possible charges."""
        row = self.db.execute("SELECT COUNT(*) FROM attempts WHERE state = 'in_flight'").fetchone()
        return int(row[0])

    def settle_in_flight(self) -> int:
        """Turn attempts left in flight (by a crash or an abrupt stop) into possible charges."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE attempts SET state = 'possible', cost_micro_usd = ?, "
                "error = 'interrupted while in flight', finished_at = ? "
                "WHERE state = 'in_flight'",
                (PRICE_PER_IMAGE_MICRO_USD, now_iso()),
            )
            return cursor.rowcount

    # --- runs and reading -------------------------------------------------------------------

    def start_run(self) -> int:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO runs (started_at, pid) VALUES (?, ?)", (now_iso(), os.getpid())
            )
            return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, outcome: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE runs SET finished_at = ?, outcome = ? WHERE run_id = ?",
                (now_iso(), outcome, run_id),
            )

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self.db.execute(sql, params))

    def billed_attempts(self) -> Iterator[tuple[Any, ...]]:
        """For the ledger: every confirmed or possible attempt as ``(job_id, attempt, endpoint,
        model, size, cost_micro_usd, billing, input_tokens, output_tokens, total_tokens,
        finished_at)``, in the order they finished."""
        cursor = self.db.cursor()
        cursor.row_factory = None
        yield from cursor.execute(
            "SELECT job_id, attempt, endpoint, model, size, cost_micro_usd, state, "
            "input_tokens, output_tokens, total_tokens, finished_at FROM attempts "
            "WHERE state IN ('confirmed', 'possible') ORDER BY finished_at, job_id, attempt"
        )

    def spend_micro_usd(self) -> tuple[int, int]:
        """(confirmed, possible) spend recorded in this folder, in micro-dollars."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd END), 0), "
            "COALESCE(SUM(CASE WHEN state = 'possible' THEN cost_micro_usd END), 0) "
            "FROM attempts"
        ).fetchone()
        return int(row[0]), int(row[1])

    def views(self) -> SqliteViews:
        """What the results, ledger, report, status and export read."""
        from runner.store.queries import SqliteViews

        return SqliteViews(self.db, self.folder)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if need be and check that a file can be made in it (a temp file, which
    the next start sweeps away if a crash leaves it): a read-only output folder is then refused
    before the first request, not met after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(folder / "write-check")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise _unwritable(folder, exc) from None


def _unwritable(folder: Path, error: OSError) -> StoreError:
    return StoreError(
        f"cannot write to {folder}: {error.strerror or error}; make it writable, or pass --out "
        "to use another folder (nothing was sent)"
    )


def _connect(path: Path) -> sqlite3.Connection:
    """Open the checkpoint for writing, check it and bring it up to date; the handle is closed
    again on every failure."""
    try:
        # Not same-thread: the pool's group commit writes from a worker thread, one at a time.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{path} failed its integrity check: {check}")
        _migrate(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path | None = None) -> None:
    """Apply the migrations ``db`` lacks, all in one transaction: a failure leaves it as it
    was. The ``BEGIN IMMEDIATE`` also proves that the checkpoint can be written."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreWriteError(f"cannot write the checkpoint {path}: {exc}") from None
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        done = {r[0] for r in db.execute("SELECT version FROM migrations")}
        if done and max(done) > len(_MIGRATIONS):
            folder = path.parent if path else Path()
            raise StoreError(f"{_newer(folder, max(done))}; it was left as it is")
        for version, script in enumerate(_MIGRATIONS, start=1):
            if version in done:
                continue
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (version, now_iso()))
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{path} could not be brought up to date: {exc}") from None
        raise


def _connect_for_reading(path: Path, mode: str) -> sqlite3.Connection:
    """Open the checkpoint at ``path`` with the URI parameters ``mode``, for reading; one
    written by another version is refused with a message saying which way to go."""
    try:
        # Not same-thread: a dry run plans from a worker thread, one thread at a time.
        uri = f"{path.absolute().as_uri()}?{mode}"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 10000")
        problem = _version_problem(db, path.parent)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    if problem:
        db.close()
        raise StoreError(problem)
    return db


def _version_problem(db: sqlite3.Connection, folder: Path) -> str | None:
    """Why a reader of this version cannot read the checkpoint in ``folder`` as it is, if it
    cannot: its queries name the columns of every migration, and of no later one."""
    known = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
    ).fetchone()
    if known is None:  # a first run is creating it this moment: there is nothing to read yet
        return None
    done = {r[0] for r in db.execute("SELECT version FROM migrations")}
    if done and max(done) > len(_MIGRATIONS):
        return _newer(folder, max(done))
    if not done.issuperset(range(1, len(_MIGRATIONS) + 1)):
        return (
            f"{folder} was written by an older image-runner: run `image-runner run` on it once "
            "to upgrade it"
        )
    return None


def _newer(folder: Path, version: int) -> str:
    return (
        f"{folder} was written by a newer image-runner (its checkpoint is at version {version}, "
        f"this one knows up to {len(_MIGRATIONS)}): use that version, or upgrade this one"
    )
