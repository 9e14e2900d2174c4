"""The checkpoint file: its schema and migrations, and opening it.

- ``checkpoint.sqlite`` in the output folder, opened for writing with the crash-safe settings of
  RELIABILITY.md: WAL journal with ``synchronous=FULL`` (WAL with NORMAL may lose a commit on
  power loss), a ``busy_timeout``, and ``PRAGMA integrity_check`` on an open after an unclean
  shutdown (see :func:`_check`: after a clean one, nothing, so a rerun of a finished million-job
  folder does not read every page of it first).
- One writer: the process holding the folder's lock file (``.lock``, an ``flock``); a second
  run on the same folder is refused before it touches anything. Readers (the views, a dry run)
  take no lock.
- Schema changes are ordered migrations recorded in ``migrations``. Those a checkpoint lacks are
  applied together, in one transaction, so nobody ever sees it half upgraded; a checkpoint from
  a newer version is refused untouched, by a run and by the read-only commands, which also
  refuse an older one (a run upgrades it): their queries name the columns of every migration.
  The review log upgrades an older one only if it can take the folder's lock at once, so never
  under a live run of the older version.
- A folder this process may not write is refused when a run opens it (:func:`check_writable`),
  before anything is sent, not met after.
- Every failure to open is a :class:`~runner.errors.StoreError` saying what to do, and leaves no
  handle open and no lock held.

What is done with a connection, once open, is :mod:`runner.store.sqlite`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.errors import OutputLockedError, StoreError, StoreWriteError
from runner.images.files import temp_path_for

DB_NAME = "checkpoint.sqlite"
LOCK_NAME = ".lock"

MIGRATIONS = (
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
    # 4: review and versions (issue 11). A job's image is its version; a new image of the job
    # (a rejected one regenerated, one edited by hand and redone, a changed prompt) is the next
    # version, the earlier ones kept in `versions` (`unreadable`: a file that took the image's
    # place and does not decode; `moved` 0 from the commit that records a version until its file
    # is durably where `image_path` says, so that a run finishes the moves a crash cut off, and
    # only those; 1 at once when no file is kept). Decisions are an append-only log, the only
    # table the review app writes (without the folder's lock, while a run may be going on): the
    # review of (job, version) is its latest row, 'unreviewed' an undo. And what a matrix row
    # made a job of, for the dataset's columns: NULL for jobs planned before this migration.
    """
    ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN edited_at TEXT;
    ALTER TABLE jobs ADD COLUMN vars TEXT;
    ALTER TABLE jobs ADD COLUMN repeat_index INTEGER;
    ALTER TABLE jobs ADD COLUMN template TEXT;
    CREATE TABLE versions (
        job_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        image_path TEXT,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        reason TEXT NOT NULL
            CHECK (reason IN ('rejected', 'edited', 'changed', 'missing', 'unreadable')),
        retired_at TEXT NOT NULL,
        moved INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, version)
    );
    CREATE INDEX versions_unmoved ON versions (job_id) WHERE moved = 0;
    CREATE TABLE reviews (
        review_id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('approved', 'rejected', 'unreviewed')),
        reviewer TEXT NOT NULL,
        decided_at TEXT NOT NULL
    );
    CREATE INDEX reviews_of_version ON reviews (job_id, version, review_id);
    """,
)

# The review of a job's current version (``j`` is the jobs row): its latest decision.
REVIEW_OF_JOB = (
    "COALESCE((SELECT decision FROM reviews r WHERE r.job_id = j.job_id AND r.version = j.version "
    "ORDER BY r.review_id DESC LIMIT 1), 'unreviewed')"
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
        f"cannot write to {folder}: {error.strerror or error}; make it writable, or use another "
        "folder (--out; out= in Python); nothing was sent"
    )


def lock_and_connect(folder: Path) -> tuple[sqlite3.Connection, int]:
    """Lock ``folder`` for this process (an ``flock`` on its ``.lock``: one writer, so a second
    run on the same folder is refused before it touches anything), check that it can be
    written, and open (or create) its checkpoint for writing. Returns the connection and the
    lock's descriptor, the caller's to close; on any failure both are closed here."""
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
            "or use another folder (--out; out= in Python)"
        ) from None
    try:
        check_writable(folder)
        return _connect(folder / DB_NAME), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


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
        _check(db, path)
        _migrate(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    except BaseException:
        db.close()
        raise
    return db


# ``PRAGMA user_version``: the clean-shutdown mark of the checkpoint (see :func:`_check`).
_IN_USE = 0


def _check(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a damaged checkpoint, reading all of it only when its last writer did not close it
    cleanly.

    ``PRAGMA integrity_check`` reads every page, and ``quick_check`` too (it skips only the
    indexes' cross-checks): for a finished run of 1,000,000 jobs (a 511 MB checkpoint, in the
    page cache) 2.3-2.8 s and 1.4 s on every start, more from a cold disk. So the writer that
    holds the folder's lock marks the checkpoint: ``user_version`` is set to :data:`_IN_USE`
    on open, durably (``synchronous=FULL``, in :func:`_migrate`'s transaction) before this
    process writes anything else, and to the last run's id + 1 by :func:`mark_closed_cleanly`,
    the last write of a clean close. A crash, a ``kill -9`` or a power cut leaves the mark in
    use (the WAL keeps commits in order, so a commit that survived the crash implies the mark
    before it), and the next open checks in full; a checkpoint never marked (created by an
    older version) too. An older version, which does not know the mark, starts a run of its
    own before writing: the mark then names a run that is no longer the last, and is not
    trusted.

    After a clean close nothing is checked, not even ``quick_check``: the file is as SQLite's
    own commits left it, and reading the mark and the last run's id costs the same whatever the
    size (the header page and one B-tree descent; a clean close leaves no WAL to replay): the
    open took 0.001-0.002 s at 100,000 jobs as at 1,000,000. A file that is not a database at
    all still fails here, and damage that appears after a clean close (a disk going bad) is met
    when its pages are read, as a :class:`StoreError` of the reader.
    """
    mark = db.execute("PRAGMA user_version").fetchone()[0]
    if mark != _IN_USE and mark == _last_run_id(db) + 1:
        return
    check = db.execute("PRAGMA integrity_check").fetchone()[0]
    if check != "ok":
        raise StoreError(f"{path} failed its integrity check: {check}")


def _last_run_id(db: sqlite3.Connection) -> int:
    """The id of the last run recorded, 0 when none is."""
    return int(db.execute("SELECT COALESCE(MAX(run_id), 0) FROM runs").fetchone()[0])


def mark_closed_cleanly(db: sqlite3.Connection, transacting: threading.Lock) -> None:
    """Record that ``db``, opened by :func:`lock_and_connect`, is being closed cleanly, with no
    write pending: the next open need not read all of it (:func:`_check`). ``transacting`` is
    the lock of the store's transactions: the mark goes in after one of another thread, never
    inside it. A failure to write the mark only costs the next open its full check."""
    with transacting, contextlib.suppress(sqlite3.Error):
        db.execute(f"PRAGMA user_version = {_last_run_id(db) + 1}")


def _migrate(db: sqlite3.Connection, path: Path | None = None) -> None:
    """Apply the migrations ``db`` lacks, all in one transaction: a failure leaves it as it
    was. The ``BEGIN IMMEDIATE`` also proves that the checkpoint can be written, and the same
    transaction marks it in use (:func:`_check`), before any other write of this process."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreWriteError(f"cannot write the checkpoint {path}: {exc}") from None
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        done = {r[0] for r in db.execute("SELECT version FROM migrations")}
        if done and max(done) > len(MIGRATIONS):
            folder = path.parent if path else Path()
            raise StoreError(f"{_newer(folder, max(done))}; it was left as it is")
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (version, now_iso()))
        db.execute(f"PRAGMA user_version = {_IN_USE}")
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{path} could not be brought up to date: {exc}") from None
        raise


def connect_read_only(folder: Path) -> sqlite3.Connection:
    """The checkpoint of ``folder``, for reading without the lock while a run may be writing
    it."""
    path = folder / DB_NAME
    if not path.is_file():
        raise StoreError(f"{folder} holds no image-runner checkpoint")
    return _connect_for_reading(path, "mode=ro")


# How long a review decision waits for a run's write transaction (planning holds one for a
# while) before the app answers "try again": well within a browser's patience.
REVIEW_BUSY_TIMEOUT_MS = 5000


def connect_for_review(folder: Path) -> sqlite3.Connection:
    """The checkpoint of ``folder``, to append review decisions to, without the folder's lock:
    a run may be writing it meanwhile (WAL: one writer at a time, a decision waiting its turn
    up to :data:`REVIEW_BUSY_TIMEOUT_MS`). Never created here. A checkpoint of an older version
    is brought up to date only when no run holds the folder (a live run of that older version
    would meet tables it does not know); otherwise it is refused, as status and report refuse
    it."""
    path = folder / DB_NAME
    if not path.is_file():
        raise StoreError(f"{folder} holds no image-runner checkpoint: run a manifest into it first")
    db = _open_uri(path, "mode=rw", REVIEW_BUSY_TIMEOUT_MS)
    try:
        db.execute("PRAGMA synchronous = FULL")
        problem = _version_problem(db, folder)
        if problem is not None:
            _upgrade_unless_in_use(db, folder, problem)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    except BaseException:
        db.close()
        raise
    return db


def _upgrade_unless_in_use(db: sqlite3.Connection, folder: Path, problem: str) -> None:
    """Migrate ``db`` (``problem`` says how its version differs) holding the folder's lock,
    taken without waiting: a run holding it is the one an upgrade must not disturb, so then
    ``problem`` is the answer. A newer checkpoint is refused by the migration itself."""
    try:
        lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(problem) from None
        _migrate(db, folder / DB_NAME)
    finally:
        os.close(lock_fd)  # which releases the lock


def connect_for_dry_run(folder: Path) -> sqlite3.Connection:
    """The checkpoint of ``folder``, to plan from while changing nothing on disk: no file
    created, a live run undisturbed. With no checkpoint yet (nor folder), an empty one in
    memory.

    :func:`connect_read_only` would leave a ``-wal`` and a ``-shm`` behind in a folder no run
    has open. So: when a ``-wal`` exists (a run is live, or one died leaving commits the main
    file lacks), it is read through that WAL as usual (SQLite may rebuild its ``-shm`` index,
    nothing else); otherwise the main file is whole, and is read as immutable, which creates
    no file. A run starting while the dry run reads may then make the dry run's figures stale;
    it never disturbs the run.
    """
    path = folder / DB_NAME
    if not path.is_file():
        # Planning reads it from a worker thread (one at a time), as it does a run's.
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        _migrate(db)
        return db
    live = path.with_name(f"{DB_NAME}-wal").exists()
    return _connect_for_reading(path, "mode=ro" if live else "mode=ro&immutable=1")


def _connect_for_reading(path: Path, mode: str) -> sqlite3.Connection:
    """Open the checkpoint at ``path`` with the URI parameters ``mode``, for reading; one
    written by another version is refused with a message saying which way to go."""
    db = _open_uri(path, mode, 10_000)
    try:
        problem = _version_problem(db, path.parent)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    if problem:
        db.close()
        raise StoreError(problem)
    return db


def _open_uri(path: Path, mode: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The checkpoint at ``path``, opened with the URI parameters ``mode`` (never created:
    every mode used here names ``ro`` or ``rw``), rows by name, waiting up to
    ``busy_timeout_ms`` for a writer. Not same-thread: a dry run plans, and the review app
    writes, from a worker thread, one thread at a time."""
    try:
        uri = f"{path.absolute().as_uri()}?{mode}"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path} is not a usable checkpoint database: {exc}") from None
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
    if done and max(done) > len(MIGRATIONS):
        return _newer(folder, max(done))
    if not done.issuperset(range(1, len(MIGRATIONS) + 1)):
        return (
            f"{folder} was written by an older image-runner: run `image-runner run` on it once "
            "to upgrade it"
        )
    return None


def _newer(folder: Path, version: int) -> str:
    return (
        f"{folder} was written by a newer image-runner (its checkpoint is at version {version}, "
        f"this one knows up to {len(MIGRATIONS)}): use that version, or upgrade this one"
    )


# --- reading, shared by the store and its views -----------------------------------------------

# Lookups by id are split into queries of this many ids: SQLite before 3.32 allows 999
# parameters a statement.
IDS_PER_QUERY = 500

SPEND_SQL = (
    "SELECT COALESCE(SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd END), 0), "
    "COALESCE(SUM(CASE WHEN state = 'possible' THEN cost_micro_usd END), 0) FROM attempts"
)


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Any error of SQLite's inside, a table missing included, as :class:`StoreError`: the
    store's callers never see the driver's own errors."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{folder}: cannot read the checkpoint: {exc}") from None


def rows_by_ids(db: sqlite3.Connection, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (its ``{ids}`` standing for the ids), queried a few hundred ids at a
    time, as plain tuples: these read up to millions of rows."""
    cursor = db.cursor()
    cursor.row_factory = None
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(job_ids), IDS_PER_QUERY):
        chunk = job_ids[start : start + IDS_PER_QUERY]
        rows += cursor.execute(sql.format(ids=",".join("?" * len(chunk))), chunk).fetchall()
    return rows
