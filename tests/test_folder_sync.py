"""The images' folder is fsynced once per group commit, never after the success it makes durable:
the group commit syncs each folder its batch names before the batch's transaction begins, a
folder that refuses fails only its own writes, and a real run fsyncs the folder far fewer times
than it saves images, each time before the successes of that batch commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runner.errors import StoreWriteError
from runner.stages import counting
from runner.store.groupcommit import GroupCommit, batch_transaction
from tests.conftest import MakeEmulator, db_rows, run_manifest, write_manifest
from tests.test_groupcommit import open_db


class Journal:
    """What the group commit did, in order: folders synced, transactions begun and committed,
    (the folder named ``refuses`` fails as a disk would)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.events: list[str] = []

    def sync(self, folder: Path) -> None:
        if folder.name == "refuses":
            raise OSError(5, "Input/output error")
        if folder.name == "gone":
            raise FileNotFoundError(2, "No such file or directory")
        self.events.append(f"sync {folder.name}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.events.append("begin")
        with batch_transaction(self.db, "BEGIN IMMEDIATE", sqlite3.Error) as db:
            yield db
        self.events.append("commit")


async def test_each_folder_is_synced_once_a_batch_before_it_commits(tmp_path: Path) -> None:
    db = open_db(tmp_path / "a.sqlite")
    journal = Journal(db)
    commits = GroupCommit(db, journal.transaction, sync_folder=journal.sync)
    images, other = tmp_path / "images", tmp_path / "other"

    async def success(k: int, folder: Path | None) -> None:
        await commits.run(
            lambda d: d.execute("INSERT INTO t VALUES (?, 'x')", (k,)), sync_first=folder
        )

    # One batch: the writes handed over together, before the writer thread runs.
    await asyncio.gather(*(success(k, images if k % 3 else other) for k in range(1, 31)))
    assert commits.batches == 1
    assert sorted(journal.events[:2]) == ["sync images", "sync other"]  # once each, first
    assert journal.events[2:] == ["begin", "commit"]
    # A batch without successes (intents, outcomes) syncs nothing.
    journal.events.clear()
    await success(100, None)
    assert journal.events == ["begin", "commit"]
    db.close()


async def test_a_folder_that_cannot_be_synced_fails_only_its_writes(tmp_path: Path) -> None:
    db = open_db(tmp_path / "b.sqlite")
    journal = Journal(db)
    commits = GroupCommit(db, journal.transaction, sync_folder=journal.sync)

    async def insert(k: int, folder: Path | None) -> None:
        await commits.run(
            lambda d: d.execute("INSERT INTO t VALUES (?, 'x')", (k,)), sync_first=folder
        )

    results = await asyncio.gather(
        insert(1, tmp_path / "images"),
        insert(2, tmp_path / "refuses"),
        insert(3, None),
        insert(4, tmp_path / "gone"),  # its image with it: the next run makes it again
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None and results[3] is None
    assert isinstance(results[1], StoreWriteError)
    assert "cannot fsync" in str(results[1]) and "refuses" in str(results[1])
    assert db.execute("SELECT k FROM t ORDER BY k").fetchall() == [(1,), (3,), (4,)]
    db.close()


async def test_a_run_syncs_the_images_folder_once_a_batch_not_once_an_image(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator()
    jobs = [{"id": f"j{i:02d}", "prompt": f"p{i}", "size": "1280x544"} for i in range(40)]
    out = tmp_path / "out"
    with counting() as times:
        report = await run_manifest(write_manifest(tmp_path, jobs), out, emulator.base_url)
    assert report.ledger.totals.succeeded == 40
    synced = times.calls["fsync folder"]
    assert 1 <= synced < 40  # group commits carry several successes each
    assert synced <= times.calls["checkpoint commit"]
    done = db_rows(out, "SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'")
    assert done == [(40,)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"j{i:02d}.png" for i in range(40)
    ]


async def test_a_run_whose_images_folder_cannot_be_synced_stops_without_recording_success(
    tmp_path: Path, make_emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync of the folder that fails (an I/O error) stops the run, and the image is not
    recorded as the job's success."""
    emulator = await make_emulator()
    out = tmp_path / "out"

    def refuse(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("runner.store.groupcommit.fsync_dir", refuse)
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "a", "size": "1280x544"}])
    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.stop_reason is not None and "cannot fsync" in report.stop_reason
    assert db_rows(out, "SELECT status FROM jobs") == [("pending",)]
