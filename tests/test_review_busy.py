"""The review app and its log beside a run that holds the checkpoint: a decision waits for the
run's write transaction in a worker thread, the app serving meanwhile, and past the review log's
busy timeout is refused with 503 and a message the page shows; a checkpoint of an older version
is upgraded only when no run holds the folder."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runner.emulator import Emulator
from runner.errors import StoreError
from runner.review import ReviewServer
from runner.store import open_review_log, schema
from runner.store.schema import DB_NAME, LOCK_NAME, MIGRATIONS
from tests.reviewing import client_of, item_of, made_run, post_decision, shots
from tests.test_store import lock_is_free, older_checkpoint


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    return await made_run(tmp_path, emulator.base_url, shots(4))


@contextmanager
def write_transaction(out: Path) -> Iterator[sqlite3.Connection]:
    """A write transaction on the checkpoint, held as a run planning holds one, committed at
    the end."""
    db = sqlite3.connect(out / DB_NAME, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    finally:
        db.close()


@pytest.fixture
async def server(out: Path) -> AsyncIterator[ReviewServer]:
    async with ReviewServer(out, reviewer="ada") as server:
        yield server


async def test_the_app_serves_while_a_decision_waits_for_a_run(
    server: ReviewServer, out: Path
) -> None:
    async with client_of(server) as session:
        with write_transaction(out):
            waiting = asyncio.create_task(post_decision(session, "shot-01", "rejected", 1))
            await asyncio.sleep(0.2)  # for the decision to reach the app and wait there
            async with session.get("/api/items") as response:
                assert response.status == 200
            assert not waiting.done()
        status, answer = await waiting  # the run committed: its turn
    assert status == 200 and answer["item"]["review"] == "rejected"
    assert item_of(out, "shot-01").review == "rejected"


async def test_a_decision_kept_waiting_too_long_is_refused_with_503(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "REVIEW_BUSY_TIMEOUT_MS", 50)  # not 5 s in a test
    async with ReviewServer(out, reviewer="ada") as server, client_of(server) as session:
        with write_transaction(out):
            status, answer = await post_decision(session, "shot-02", "approved", 1)
            assert status == 503
            assert "a run is writing the checkpoint; try again in a moment" in answer["error"]
            async with session.get("/api/items/shot-02") as response:  # still serving
                assert response.status == 200
        assert item_of(out, "shot-02").review == "unreviewed"
        status, _ = await post_decision(session, "shot-02", "approved", 1)  # again: done
        assert status == 200
    assert item_of(out, "shot-02").review == "approved"


def migrations_done(out: Path) -> set[int]:
    db = sqlite3.connect(out / DB_NAME)
    try:
        return {row[0] for row in db.execute("SELECT version FROM migrations")}
    finally:
        db.close()


@contextmanager
def folder_locked(out: Path) -> Iterator[None]:
    """The folder's lock, as a live run (of an older version, say) holds it."""
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_an_older_checkpoint_under_a_run_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    older_checkpoint(out, 3)
    with folder_locked(out), pytest.raises(StoreError, match="older image-runner") as raised:
        open_review_log(out)
    assert "run `image-runner run` on it once to upgrade it" in str(raised.value)
    assert migrations_done(out) == {1, 2, 3}


def test_an_older_checkpoint_no_run_holds_is_upgraded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    older_checkpoint(out, 3)
    open_review_log(out).close()
    assert migrations_done(out) == set(range(1, len(MIGRATIONS) + 1))
    assert lock_is_free(out)  # taken for the upgrade only
