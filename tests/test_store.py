"""runner.store against a real SQLite file, made to fail for real: a COMMIT that fails, a full
database, two threads writing at once, a migration that fails, checkpoints written by an older
or a newer version. Nothing is mocked; each failure is one SQLite itself produces."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.errors import StoreError, StoreWriteError
from runner.jobs import Job
from runner.store.sqlite import _MIGRATIONS, DB_NAME, LOCK_NAME, Store
from tests.conftest import make_job


def job(n: int) -> Job:
    return make_job(f"j{n:05d}", f"picture {n}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "out") as opened:
        yield opened


def lock_is_free(folder: Path) -> bool:
    fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def open_handles(path: Path) -> list[str]:
    """This process's file descriptors open on ``path``."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            if fd.readlink() == path.resolve():
                found.append(fd.name)
    return found


def older_checkpoint(folder: Path, migrations: int) -> None:
    """A checkpoint as a version that knew only the first ``migrations`` migrations wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / DB_NAME, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, script in enumerate(_MIGRATIONS[:migrations], start=1):
            db.executescript(script)
            db.execute("INSERT INTO migrations VALUES (?, '2026-01-01T00:00:00')", (version,))
    finally:
        db.close()


def newer_checkpoint(folder: Path) -> None:
    """A checkpoint a version with one more migration than this one wrote."""
    Store.open(folder).close()
    db = sqlite3.connect(folder / DB_NAME)
    with db:
        db.execute("ALTER TABLE jobs ADD COLUMN from_the_future TEXT")
        db.execute(
            "INSERT INTO migrations VALUES (?, '2027-01-01T00:00:00')", (len(_MIGRATIONS) + 1,)
        )
    db.close()


def schema(folder: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(folder / DB_NAME)
    try:
        tables = list(db.execute("SELECT name, sql FROM sqlite_master ORDER BY name"))
        return tables + list(db.execute("SELECT version FROM migrations ORDER BY version"))
    finally:
        db.close()


# --- a failed COMMIT (item 13a) ---------------------------------------------------------------


def deferred_foreign_key(db: sqlite3.Connection) -> None:
    """Tables whose foreign key is checked at COMMIT: a COMMIT that SQLite refuses, leaving the
    transaction open, as SQLITE_BUSY on COMMIT does."""
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )


def test_a_failed_commit_rolls_back_and_later_writes_work(store: Store) -> None:
    deferred_foreign_key(store.db)
    with pytest.raises(StoreWriteError, match="FOREIGN KEY"), store.transaction() as db:
        db.execute("INSERT INTO child VALUES (1)")
    assert not store.db.in_transaction
    assert store.db.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    store.upsert_jobs([job(1)])  # the next transaction starts cleanly
    assert store.job_records(["j00001"])["j00001"].status == "pending"


async def test_a_failed_commit_of_a_group_fails_its_writes_and_later_groups_work(
    store: Store,
) -> None:
    deferred_foreign_key(store.db)
    with pytest.raises(StoreWriteError, match="FOREIGN KEY"):
        await store.write(lambda s: s.db.execute("INSERT INTO child VALUES (1)"))
    assert not store.db.in_transaction
    await store.write(lambda s: s.upsert_jobs([job(2)]))
    assert store.job_records(["j00002"])["j00002"].status == "pending"


# --- a full database (item 10) ----------------------------------------------------------------


def fill_up(store: Store) -> None:
    """Cap the database at the pages it has: the next write that needs one more page gets
    SQLITE_FULL, "database or disk is full", as on a full disk."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_is_a_write_error_naming_the_checkpoint(store: Store) -> None:
    store.upsert_jobs([job(0)])
    fill_up(store)
    with pytest.raises(StoreWriteError) as raised:
        store.upsert_jobs([job(n) for n in range(1, 2000)])
    assert "database or disk is full" in str(raised.value)
    assert str(store.folder / DB_NAME) in str(raised.value)
    assert store.write_failure is raised.value  # kept, for the run to stop on it
    assert not store.db.in_transaction
    assert store.job_records([job(5).id]) == {}  # rolled back whole
    store.db.execute("PRAGMA max_page_count = 1073741823")  # space again: writes work again
    store.upsert_jobs([job(5)])
    assert store.job_records([job(5).id])[job(5).id].status == "pending"


async def test_a_full_database_fails_group_commit_writes_as_write_errors(store: Store) -> None:
    fill_up(store)
    many = [job(n) for n in range(2000)]
    results = await asyncio.gather(
        store.write(lambda s: s.upsert_jobs(many)),
        store.write(lambda s: s.upsert_jobs(many)),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreWriteError) for r in results), results
    assert "database or disk is full" in str(results[0])
    assert not store.db.in_transaction


# --- two threads (item 13b) -------------------------------------------------------------------


def test_two_threads_never_share_a_transaction(store: Store) -> None:
    """The group commit's writer thread and the event loop's thread both write; a transaction
    begun by one must not take in the other's writes (nor be ended by its failure)."""
    store.db.execute("CREATE TABLE t (v TEXT)")
    first_in = threading.Event()
    go_on = threading.Event()
    second_done = threading.Event()

    def first() -> None:
        with store.transaction() as db:
            db.execute("INSERT INTO t VALUES ('a')")
            first_in.set()
            go_on.wait(5)
            db.execute("INSERT INTO t VALUES ('b')")

    def second() -> None:
        try:
            with store.transaction() as db:
                db.execute("INSERT INTO t VALUES ('c')")
                raise RuntimeError("this transaction fails: 'c' must not stay")
        except RuntimeError:
            pass
        finally:
            second_done.set()

    one = threading.Thread(target=first)
    one.start()
    assert first_in.wait(5)
    two = threading.Thread(target=second)
    two.start()
    second_done.wait(0.5)  # unguarded, it joins the first's transaction at once
    go_on.set()
    one.join(5)
    two.join(5)
    assert sorted(r[0] for r in store.db.execute("SELECT v FROM t")) == ["a", "b"]
    assert not store.db.in_transaction


# --- releasing the lock and the handle (item 13c) ---------------------------------------------


def test_a_failed_migration_releases_the_lock_and_the_database(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Store.open(out).close()
    db = sqlite3.connect(out / DB_NAME)
    with db:  # migration 3 unrecorded, its columns there: running it again fails
        db.execute("DELETE FROM migrations WHERE version = 3")
    db.close()
    with pytest.raises(StoreError, match="duplicate column") as raised:
        Store.open(out)
    del raised
    assert lock_is_free(out)
    assert open_handles(out / DB_NAME) == []


def test_close_releases_the_lock_even_if_closing_the_database_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = Store.open(out)
    own = store.db
    # A real sqlite3 error from close(): a connection bound to another thread.
    made: list[sqlite3.Connection] = []
    maker = threading.Thread(target=lambda: made.append(sqlite3.connect(out / "other.sqlite")))
    maker.start()
    maker.join()
    store.db = made[0]
    try:
        with pytest.raises(sqlite3.ProgrammingError):
            store.close()
        assert lock_is_free(out)
        Store.open(out).close()
    finally:
        own.close()


# --- versions (item 13d) ----------------------------------------------------------------------


def test_reading_an_older_checkpoint_says_to_upgrade_it_with_a_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    older_checkpoint(out, 2)
    with pytest.raises(StoreError, match="older image-runner") as raised:
        Store.open_read_only(out)
    assert "run `image-runner run`" in str(raised.value)
    assert open_handles(out / DB_NAME) == []
    Store.open(out).close()  # a run upgrades it ...
    with Store.open_read_only(out) as store:  # ... and then it reads
        assert store.query("SELECT COUNT(*) FROM jobs")[0][0] == 0


def test_reading_a_newer_checkpoint_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    newer_checkpoint(out)
    with pytest.raises(StoreError, match="newer image-runner"):
        Store.open_read_only(out)
    assert open_handles(out / DB_NAME) == []


def test_a_run_refuses_a_newer_checkpoint_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    newer_checkpoint(out)
    before = schema(out)
    with pytest.raises(StoreError, match="newer image-runner"):
        Store.open(out)
    assert schema(out) == before
    assert lock_is_free(out)
    assert open_handles(out / DB_NAME) == []


def test_upgrading_an_older_checkpoint_is_all_or_nothing(tmp_path: Path) -> None:
    """The missing migrations commit together: one that fails leaves the file as it was, never
    half upgraded."""
    out = tmp_path / "out"
    older_checkpoint(out, 1)
    db = sqlite3.connect(out / DB_NAME)
    with db:  # makes migration 3 fail, after migration 2 went through
        db.execute("ALTER TABLE jobs ADD COLUMN image_size_bytes INTEGER")
    db.close()
    before = schema(out)
    with pytest.raises(StoreError, match="duplicate column"):
        Store.open(out)
    assert schema(out) == before
