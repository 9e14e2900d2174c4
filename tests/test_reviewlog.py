"""The review log: decisions recorded all or none, checked against the jobs, written without the
folder's lock while a run holds it, and read back through the views."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runner.emulator import Emulator
from runner.errors import ReviewError, StoreError
from runner.store import Decision, open_read_only, open_review_log
from runner.store.schema import MIGRATIONS
from runner.store.sqlite import SqliteStore
from tests.conftest import db_exec, db_rows, make_ref, run_manifest, write_manifest

JOBS = [
    {"id": "a", "prompt": "an apple", "size": "1280x720"},
    {"id": "b", "prompt": "a banana", "size": "1280x720"},
    {"id": "c", "prompt": "a cherry", "size": "1280x720"},
    {"id": "bad", "prompt": "refused [[faults:policy]]", "size": "1280x720"},
]


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    ref = make_ref(tmp_path / "refs", "product.png")
    jobs = [*JOBS, {"id": "edit", "prompt": "on a table", "images": [str(ref)], "size": "auto"}]
    folder = tmp_path / "out"
    await run_manifest(write_manifest(tmp_path, jobs), folder, emulator.base_url, max_attempts=1)
    return folder


def test_decisions_are_recorded_and_read_back(out: Path) -> None:
    with open_review_log(out) as log:
        recorded = log.decide([Decision("a", "approved"), Decision("b", "rejected")], "ana")
        assert [(r.job_id, r.version, r.decision, r.reviewer) for r in recorded] == [
            ("a", 1, "approved", "ana"),
            ("b", 1, "rejected", "ana"),
        ]
        log.decide([Decision("b", "unreviewed", version=1)], "bo")  # an undo
        views = log.views()
        assert views.review_counts() == {
            "succeeded": 4, "failed": 1, "pending": 0,
            "approved": 1, "rejected": 0, "unreviewed": 3,
        }  # fmt: skip
        item = views.review_item("b")
        assert item is not None
        assert (item.review, item.reviewed_by, item.version) == ("unreviewed", "bo", 1)
        page = views.review_items(review="approved")
        assert ([i.job_id for i in page.items], page.total) == (["a"], 1)
        edit = views.review_item("edit")
        assert edit is not None and len(edit.references) == 1
        assert edit.references[0].endswith("product.png")
    # Read back by a reader of its own, and by the results' states.
    store = open_read_only(out)
    try:
        states = store.views().job_states(["a", "b", "bad"])
    finally:
        store.close()
    assert (states["a"].review, states["b"].review, states["bad"].review) == (
        "approved",
        "unreviewed",
        "unreviewed",
    )
    assert db_rows(out, "SELECT job_id, decision, reviewer FROM reviews ORDER BY review_id") == [
        ("a", "approved", "ana"),
        ("b", "rejected", "ana"),
        ("b", "unreviewed", "bo"),
    ]


def test_a_bad_decision_records_none_and_names_every_problem(out: Path) -> None:
    with open_review_log(out) as log, pytest.raises(ReviewError) as raised:
        log.decide(
            [
                Decision("a", "approved"),
                Decision("nope", "rejected"),
                Decision("bad", "approved"),
                Decision("c", "rejected", version=2),
            ],
            "ana",
        )
    message = str(raised.value)
    assert "nothing was recorded" in message
    assert "nope: no such job" in message
    assert "bad: is failed; only a finished image can be reviewed" in message
    assert "c: version 2 is no longer its image (now version 1)" in message
    assert "a:" not in message
    assert db_rows(out, "SELECT COUNT(*) FROM reviews") == [(0,)]


def test_a_decision_is_written_while_a_run_holds_the_folder(out: Path) -> None:
    run = SqliteStore.open(out)  # holds the lock, as a live run does
    try:
        with open_review_log(out) as log:
            log.decide([Decision("c", "rejected")], "ana")
        # The run's own connection sees it, and its rows were left alone.
        records = run.job_records(["c"])
        assert (records["c"].review, records["c"].status) == ("rejected", "succeeded")
    finally:
        run.close()


def test_closed_it_leaves_no_wal_behind(out: Path) -> None:
    """It reads on a read-only connection and writes on another: the writer closes last, so
    the WAL is folded back and removed, as after a run (a dry run then reads the main file)."""
    before = sorted(p.name for p in out.iterdir())
    with open_review_log(out) as log:
        log.decide([Decision("a", "approved")], "ana")
        assert log.views().review_item("a") is not None
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_review_of_a_version_does_not_follow_the_job_to_its_next(out: Path) -> None:
    with open_review_log(out) as log:
        log.decide([Decision("a", "rejected")], "ana")
    # What the next run does when it regenerates a rejected image: the job moves to version 2.
    db_exec(out, "UPDATE jobs SET version = 2 WHERE job_id = 'a'")
    db_exec(
        out,
        "INSERT INTO versions VALUES ('a', 1, 'rejected/a.v1.png', 'x', 8, 8, 'rejected', 't', 1)",
    )
    with open_review_log(out) as log:
        item = log.views().review_item("a")
        assert item is not None and (item.version, item.review) == (2, "unreviewed")
        (old,) = log.views().job_versions("a")
        assert (old.version, old.image_path, old.reason, old.review, old.reviewed_by) == (
            1,
            "rejected/a.v1.png",
            "rejected",
            "rejected",
            "ana",
        )


def test_an_older_checkpoint_is_brought_up_to_date_and_a_missing_one_refused(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "checkpoint.sqlite")
    with db:  # a checkpoint of the previous version: migrations 1-3, one finished job
        db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, script in enumerate(MIGRATIONS[:3], start=1):
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute("INSERT INTO migrations VALUES (?, 't')", (version,))
        db.execute(
            "INSERT INTO jobs (job_id, content_hash, status, endpoint, model, prompt, images, "
            "image_path, sha256, updated_at) VALUES ('a', 'h', 'succeeded', 'generations', 'm', "
            "'p', '[]', 'images/a.png', 's', 't')"
        )
    db.close()
    with open_review_log(old) as log:
        (review,) = log.decide([Decision("a", "approved")], "ana")
    assert (review.version, review.decision) == (1, "approved")
    assert db_rows(old, "SELECT MAX(version) FROM migrations") == [(len(MIGRATIONS),)]
    with pytest.raises(StoreError, match="holds no image-runner checkpoint"):
        open_review_log(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
