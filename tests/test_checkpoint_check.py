"""The checkpoint's check on open (:func:`runner.store.schema._check`): the full
``integrity_check`` after an unclean shutdown (a ``kill -9``, an older version's run), nothing
after a clean close, and never a mark written by a read-only open.

Whether the full check ran is told by a damage only it finds: the index ``attempts_state``
rewritten (``writable_schema``) to claim a column it was not built from, which normal reads do
not trip over. Nothing is mocked: the kill is a real SIGKILL of a process holding the store."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.errors import StoreError
from runner.store import Outcome
from runner.store.schema import DB_NAME
from runner.store.sqlite import SqliteStore
from tests.conftest import make_job
from tests.test_store import lock_is_free, open_handles

REPO = Path(__file__).resolve().parent.parent


def write_a_run(store: SqliteStore) -> None:
    """A run's writes: a run, a job, an attempt of it."""
    store.start_run()
    job = make_job("j1", "a picture")
    store.plan_jobs([job])
    store.commit_outcome(job.id, store.commit_intent(job), Outcome("none", error="refused"))


def closed_cleanly(out: Path) -> None:
    with SqliteStore.open(out) as store:
        write_a_run(store)


def killed_mid_run(out: Path) -> None:
    """A process that opens the store, writes a run's rows and is killed with SIGKILL."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from runner.store.sqlite import SqliteStore
        from tests.test_checkpoint_check import write_a_run
        store = SqliteStore.open(Path({str(out)!r}))
        write_a_run(store)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def damage_an_index(out: Path) -> None:
    db = sqlite3.connect(out / DB_NAME, isolation_level=None)
    try:
        db.execute("PRAGMA writable_schema = ON")
        db.execute(
            "UPDATE sqlite_master SET sql = replace(sql, '(state)', '(started_at)') "
            "WHERE name = 'attempts_state'"
        )
    finally:
        db.close()
    db = sqlite3.connect(out / DB_NAME)
    try:  # the damage is one the full check finds
        assert db.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
    finally:
        db.close()


def assert_refused(out: Path) -> None:
    with pytest.raises(StoreError, match="failed its integrity check") as raised:
        SqliteStore.open(out)
    assert str(out / DB_NAME) in str(raised.value)
    assert lock_is_free(out)
    assert open_handles(out / DB_NAME) == []


def test_a_checkpoint_closed_cleanly_is_opened_without_the_full_check(tmp_path: Path) -> None:
    """What makes a rerun of a finished million-job folder start at once: the damage the full
    check would find is not looked for."""
    out = tmp_path / "out"
    closed_cleanly(out)
    damage_an_index(out)
    with SqliteStore.open(out) as store:
        assert store.spend_micro_usd() == (0, 0)


def test_a_checkpoint_left_by_a_killed_run_gets_the_full_check(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed_mid_run(out)
    damage_an_index(out)
    assert_refused(out)


def test_an_intact_checkpoint_of_a_killed_run_opens_and_is_trusted_once_closed(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    killed_mid_run(out)
    with SqliteStore.open(out) as store:  # checked in full, and intact
        assert store.in_flight_count() == 0
        write_a_run(store)
    damage_an_index(out)
    SqliteStore.open(out).close()  # closed cleanly by then: not checked in full


def test_a_checkpoint_open_in_a_run_is_checked_even_after_a_clean_close_before(
    tmp_path: Path,
) -> None:
    """A clean close, then a run killed: the mark written on open is what the next open
    finds, not the clean one before it."""
    out = tmp_path / "out"
    closed_cleanly(out)
    killed_mid_run(out)
    damage_an_index(out)
    assert_refused(out)


def test_a_run_of_an_older_version_after_a_clean_close_voids_the_mark(tmp_path: Path) -> None:
    """An older image-runner does not know the mark; the run it records before writing
    anything makes the mark name a run that is not the last."""
    out = tmp_path / "out"
    closed_cleanly(out)
    db = sqlite3.connect(out / DB_NAME)
    with db:
        db.execute("INSERT INTO runs (started_at, pid) VALUES ('2026-01-01T00:00:00Z', 1)")
    db.close()
    damage_an_index(out)
    assert_refused(out)


def test_read_only_opens_write_no_mark(tmp_path: Path) -> None:
    """``status``, ``report``, a dry run on the folder of a killed run: the checkpoint is left
    byte for byte as it was, so the next run still checks it in full."""
    out = tmp_path / "out"
    killed_mid_run(out)
    SqliteStore.open(out).close()  # the killed run's WAL folded in: the file alone is the state
    killed_mid_run(out)
    before = hashlib.sha256((out / DB_NAME).read_bytes()).hexdigest()
    with SqliteStore.open_read_only(out) as store:
        assert store.spend_micro_usd() == (0, 0)
    with SqliteStore.open_for_dry_run(out) as store:
        assert store.in_flight_count() == 0
    assert hashlib.sha256((out / DB_NAME).read_bytes()).hexdigest() == before
    damage_an_index(out)
    assert_refused(out)
