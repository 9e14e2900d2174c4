"""runner.store against a real SQLite file, made to fail for real: a COMMIT that fails, a full
database, two threads writing at once, a migration that fails, checkpoints written by an older
or a newer version. Nothing is mocked; each failure is one SQLite itself produces. And the
seam: the SQLite store implements the Store protocol, and the core uses nothing else."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import fcntl
import inspect
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import runner.core
from runner.errors import StoreError, StoreWriteError
from runner.jobs import Job
from runner.manifest.spool import restore
from runner.store import Outcome, Store, open_store
from runner.store.schema import DB_NAME, LOCK_NAME, MIGRATIONS
from runner.store.sqlite import SqliteStore
from tests.conftest import make_job


def job(n: int) -> Job:
    return make_job(f"j{n:05d}", f"picture {n}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore.open(tmp_path / "out") as opened:
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
        for version, script in enumerate(MIGRATIONS[:migrations], start=1):
            db.executescript(script)
            db.execute("INSERT INTO migrations VALUES (?, '2026-01-01T00:00:00')", (version,))
    finally:
        db.close()


def newer_checkpoint(folder: Path) -> None:
    """A checkpoint a version with one more migration than this one wrote."""
    SqliteStore.open(folder).close()
    db = sqlite3.connect(folder / DB_NAME)
    with db:
        db.execute("ALTER TABLE jobs ADD COLUMN from_the_future TEXT")
        db.execute(
            "INSERT INTO migrations VALUES (?, '2027-01-01T00:00:00')", (len(MIGRATIONS) + 1,)
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


def test_a_failed_commit_rolls_back_and_later_writes_work(store: SqliteStore) -> None:
    deferred_foreign_key(store.db)
    with pytest.raises(StoreWriteError, match="FOREIGN KEY"), store.batch() as db:
        db.execute("INSERT INTO child VALUES (1)")
    assert not store.db.in_transaction
    assert store.db.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    store.plan_jobs([job(1)])  # the next transaction starts cleanly
    assert store.job_records(["j00001"])["j00001"].status == "pending"


async def test_a_failed_commit_of_a_group_fails_its_writes_and_later_groups_work(
    store: SqliteStore,
) -> None:
    deferred_foreign_key(store.db)
    store.plan_jobs([job(1), job(2)])
    store.db.execute(
        "CREATE TRIGGER orphan AFTER INSERT ON attempts BEGIN INSERT INTO child VALUES (1); END"
    )
    with pytest.raises(StoreWriteError, match="FOREIGN KEY") as raised:
        await store.begin_attempt(job(1))  # its intent's COMMIT fails
    assert store.write_failure is raised.value
    assert not store.db.in_transaction
    store.db.execute("DROP TRIGGER orphan")
    assert await store.begin_attempt(job(2)) == 1
    assert await store.begin_attempt(job(1)) == 1  # the failed intent left nothing behind


# --- a full database (item 10) ----------------------------------------------------------------


def fill_up(store: SqliteStore) -> None:
    """Cap the database at the pages it has: the next write that needs one more page gets
    SQLITE_FULL, "database or disk is full", as on a full disk."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_is_a_write_error_naming_the_checkpoint(store: SqliteStore) -> None:
    store.plan_jobs([job(0)])
    fill_up(store)
    with pytest.raises(StoreWriteError) as raised:
        store.plan_jobs([job(n) for n in range(1, 2000)])
    assert "database or disk is full" in str(raised.value)
    assert str(store.folder / DB_NAME) in str(raised.value)
    assert store.write_failure is raised.value  # kept, for the run to stop on it
    assert not store.db.in_transaction
    assert store.job_records([job(5).id]) == {}  # rolled back whole
    store.db.execute("PRAGMA max_page_count = 1073741823")  # space again: writes work again
    store.plan_jobs([job(5)])
    assert store.job_records([job(5).id])[job(5).id].status == "pending"


async def test_a_full_database_fails_group_commit_writes_as_write_errors(
    store: SqliteStore,
) -> None:
    # Ids long enough that each intent needs pages of its own: longer than a manifest allows,
    # so rebuilt as the spool does, unchecked (the store does not care).
    big = [
        restore(**{**dataclasses.asdict(job(n)), "id": f"j{n}-" + "x" * 20_000}) for n in range(2)
    ]
    store.plan_jobs(big)
    fill_up(store)
    results = await asyncio.gather(*(store.begin_attempt(j) for j in big), return_exceptions=True)
    assert all(isinstance(r, StoreWriteError) for r in results), results
    assert "database or disk is full" in str(results[0])
    assert store.write_failure is not None
    assert not store.db.in_transaction
    assert store.in_flight_count() == 0


# --- two threads (item 13b) -------------------------------------------------------------------


def test_two_threads_never_share_a_transaction(store: SqliteStore) -> None:
    """The group commit's writer thread and the event loop's thread both write; a transaction
    begun by one must not take in the other's writes (nor be ended by its failure)."""
    store.db.execute("CREATE TABLE t (v TEXT)")
    first_in = threading.Event()
    go_on = threading.Event()
    second_done = threading.Event()

    def first() -> None:
        with store.batch() as db:
            db.execute("INSERT INTO t VALUES ('a')")
            first_in.set()
            go_on.wait(5)
            db.execute("INSERT INTO t VALUES ('b')")

    def second() -> None:
        try:
            with store.batch() as db:
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
    SqliteStore.open(out).close()
    db = sqlite3.connect(out / DB_NAME)
    with db:  # migration 3 unrecorded, its columns there: running it again fails
        db.execute("DELETE FROM migrations WHERE version = 3")
    db.close()
    with pytest.raises(StoreError, match="duplicate column") as raised:
        SqliteStore.open(out)
    del raised
    assert lock_is_free(out)
    assert open_handles(out / DB_NAME) == []


def test_close_releases_the_lock_even_if_closing_the_database_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = SqliteStore.open(out)
    own = store.db
    # A real sqlite3 error from close(): a connection bound to another thread.
    made: list[sqlite3.Connection] = []
    maker = threading.Thread(target=lambda: made.append(sqlite3.connect(out / "other.sqlite")))
    maker.start()
    maker.join()
    store.db = made[0]
    try:
        with pytest.raises(StoreError, match="thread") as raised:
            store.close()
        assert isinstance(raised.value.__cause__, sqlite3.ProgrammingError)
        assert lock_is_free(out)
        SqliteStore.open(out).close()
    finally:
        own.close()


# --- versions (item 13d) ----------------------------------------------------------------------


def test_reading_an_older_checkpoint_says_to_upgrade_it_with_a_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    older_checkpoint(out, 2)
    with pytest.raises(StoreError, match="older image-runner") as raised:
        SqliteStore.open_read_only(out)
    assert "run `image-runner run`" in str(raised.value)
    assert open_handles(out / DB_NAME) == []
    SqliteStore.open(out).close()  # a run upgrades it ...
    with SqliteStore.open_read_only(out) as store:  # ... and then it reads
        assert store.spend_micro_usd() == (0, 0)


def test_reading_a_newer_checkpoint_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    newer_checkpoint(out)
    with pytest.raises(StoreError, match="newer image-runner"):
        SqliteStore.open_read_only(out)
    assert open_handles(out / DB_NAME) == []


def test_a_run_refuses_a_newer_checkpoint_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    newer_checkpoint(out)
    before = schema(out)
    with pytest.raises(StoreError, match="newer image-runner"):
        SqliteStore.open(out)
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
        SqliteStore.open(out)
    assert schema(out) == before


# --- the seam: the Store protocol ------------------------------------------------------------


def protocol_operations() -> set[str]:
    return {name for name in dir(Store) if not name.startswith("_")}


def test_the_sqlite_store_implements_every_operation_of_the_protocol() -> None:
    for name in protocol_operations():
        declared = inspect.getattr_static(Store, name)
        implemented = inspect.getattr_static(SqliteStore, name, None)
        if isinstance(declared, property):  # an attribute of each instance will do
            continue
        assert implemented is not None, name
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(declared), (
            name
        )


async def test_claim_hands_over_every_job_as_they_are_taken(store: SqliteStore) -> None:
    """The folder's lock gives this process every job: nothing is held back, and the jobs are
    read one at a time (a million-job manifest is never copied)."""
    taken: list[str] = []

    def manifest() -> Iterator[Job]:
        for n in range(3):
            taken.append(f"j{n:05d}")
            yield job(n)

    claimed = store.claim(manifest())
    assert taken == []
    assert (await anext(claimed)).id == "j00000" and taken == ["j00000"]
    assert [j.id async for j in claimed] == ["j00001", "j00002"]


async def test_the_pools_writes_are_durable_once_they_return(tmp_path: Path) -> None:
    """Through the protocol alone: the intent, then the outcome, each committed by the time
    the call returns, as another connection sees."""
    out = tmp_path / "out"
    store = open_store(out)
    try:
        store.plan_jobs([job(1)])
        attempt = await store.begin_attempt(job(1))
        reader = sqlite3.connect(out / DB_NAME)
        try:
            states = "SELECT attempt, state FROM attempts"
            assert reader.execute(states).fetchall() == [(1, "in_flight")]
            await store.record_outcome(job(1).id, attempt, Outcome("possible", 30_000))
            assert reader.execute(states).fetchall() == [(1, "possible")]
        finally:
            reader.close()
    finally:
        store.close()
    assert lock_is_free(out)


CORE_MODULES = ("plan", "pool", "lifecycle")
BACKEND_MODULES = (
    "sqlite3",
    "runner.store.sqlite",
    "runner.store.schema",
    "runner.store.groupcommit",
)


def core_tree(name: str) -> ast.Module:
    path = Path(runner.core.__file__).parent / f"{name}.py"
    return ast.parse(path.read_text(), filename=str(path))


def store_operations_used(tree: ast.Module) -> set[str]:
    """The attributes read off ``store`` or ``self.store``."""
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        named = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
        if named == "store":
            used.add(node.attr)
    return used


@pytest.mark.parametrize("name", CORE_MODULES)
def test_the_core_knows_no_backend(name: str) -> None:
    """The plan, the pool and the run's lifecycle import nothing of SQLite's, and call on a
    store only the operations of the Store protocol (no ``.db``, ``.query``, ``.write``)."""
    tree = core_tree(name)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported.isdisjoint(BACKEND_MODULES), imported & set(BACKEND_MODULES)
    used = store_operations_used(tree)
    assert used, "no store operation found: the test would prove nothing"
    assert used <= protocol_operations(), used - protocol_operations()
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "db"]


def test_reads_raise_store_errors_never_the_drivers(store: SqliteStore) -> None:
    """The protocol promises StoreError: the core catches nothing of sqlite3's (a damaged or
    half-made checkpoint must end in a message, not a traceback)."""
    store.plan_jobs([job(1)])
    store.db.execute("DROP TABLE attempts")
    for read in (
        store.spend_micro_usd,
        store.in_flight_count,
        lambda: store.adoption_charge(job(1).id),
        lambda: store.budget(None),
    ):
        with pytest.raises(StoreError, match="out: cannot read the checkpoint: no such table"):
            read()
    store.db.execute("DROP TABLE jobs")
    for lookup in (store.job_records, store.finished_images):
        with pytest.raises(StoreError, match="cannot read the checkpoint: no such table: jobs"):
            lookup([job(1).id])


def test_the_budget_starts_from_the_spend_recorded(store: SqliteStore) -> None:
    """The budget counts the folder's whole history, confirmed and possible: a resumed run goes
    on under the same cap."""
    store.plan_jobs([job(1), job(2)])
    store.commit_outcome(job(1).id, store.commit_intent(job(1)), Outcome("confirmed", 30_000))
    store.commit_outcome(job(2).id, store.commit_intent(job(2)), Outcome("possible", 30_000))
    budget = store.budget(90_000)
    assert (budget.cap_micro_usd, budget.spent_micro_usd) == (90_000, 60_000)
    assert budget.left_micro_usd == 30_000
    assert store.budget(None).left_micro_usd is None
