"""The review log on PostgreSQL decides as the SQLite one does: the same decisions on the same
state record the same reviews, or fail with the same message and record none; a batch that
meets a run's write waits a moment and says "try again"; read back through its views."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runner.emulator import Emulator
from runner.errors import ReviewError, StoreError, StoreWriteError
from runner.store import Decision, open_review_log
from runner.store.base import ReviewLog
from runner.store.postgres import reviewlog as pg_reviewlog
from runner.store.postgres.reviewlog import PostgresReviewLog
from runner.store.postgres.schema import open_run
from runner.store.reviewlog import BUSY
from tests.conftest import db_rows
from tests.services import PG_PASSWORD
from tests.test_pg_views import build_checkpoint, copy_to_postgres

REVIEWS = "SELECT job_id, version, decision, reviewer FROM reviews ORDER BY review_id"


@pytest.fixture
async def logs(
    tmp_path: Path, emulator: Emulator, pg_url: str
) -> AsyncIterator[tuple[ReviewLog, PostgresReviewLog, str]]:
    """The review logs of one state on both backends, and the PostgreSQL run's URL."""
    out = await build_checkpoint(tmp_path, emulator.base_url)
    copy_to_postgres(out, pg_url)
    with open_review_log(out) as lite, PostgresReviewLog(pg_url, out) as pg:
        yield lite, pg, pg_url


def pg_reviews(pg_url: str, log: PostgresReviewLog) -> list[tuple[Any, ...]]:
    with open_run(pg_url, log.views().out_url, create=False) as conn:
        return conn.execute(REVIEWS).fetchall()


def without_stamps(reviews: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r)[:4] for r in reviews]


BATCHES = [
    [Decision("a", "rejected"), Decision("edit", "unreviewed")],
    [Decision("b", "approved", version=2), Decision("m-watercolor-cat-1", "approved")],
    [Decision("c", "approved")],
]

BAD_BATCHES = [
    [Decision("nope", "approved")],
    [Decision("a", "approved"), Decision("bad", "approved"), Decision("later", "rejected")],
    [Decision("b", "rejected", version=1)],  # b is at version 2
    [Decision("a", "maybe")],  # type: ignore[arg-type]  # as a script might send it
]


def test_decisions_record_the_same_reviews(
    logs: tuple[ReviewLog, PostgresReviewLog, str],
) -> None:
    lite, pg, pg_url = logs
    ids = {item.job_id for item in lite.views().review_items(limit=100).items}
    for batch in BATCHES:
        assert {d.job_id for d in batch} <= ids
        assert without_stamps(pg.decide(batch, "cy")) == without_stamps(lite.decide(batch, "cy"))
    assert pg_reviews(pg_url, pg) == db_rows(lite.folder, REVIEWS)
    for job_id in ("a", "b", "c", "edit"):
        on_pg, on_lite = pg.views().review_item(job_id), lite.views().review_item(job_id)
        assert on_pg is not None and on_lite is not None
        assert on_pg._replace(reviewed_at=None) == on_lite._replace(reviewed_at=None)
    assert pg.views().review_counts() == lite.views().review_counts()


def test_bad_decisions_fail_alike_and_record_nothing(
    logs: tuple[ReviewLog, PostgresReviewLog, str],
) -> None:
    lite, pg, pg_url = logs
    before = pg_reviews(pg_url, pg)
    for batch in BAD_BATCHES:
        with pytest.raises(ReviewError) as on_sqlite:
            lite.decide(batch, "cy")
        with pytest.raises(ReviewError) as on_postgres:
            pg.decide(batch, "cy")
        assert str(on_postgres.value) == str(on_sqlite.value)
        assert "nothing was recorded" in str(on_postgres.value)
    assert pg_reviews(pg_url, pg) == before
    assert db_rows(lite.folder, REVIEWS) == before


def test_a_decision_waits_for_a_runs_write_then_says_try_again(
    logs: tuple[ReviewLog, PostgresReviewLog, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pg, pg_url = logs
    monkeypatch.setattr(pg_reviewlog, "REVIEW_BUSY_TIMEOUT_MS", 200)
    before = pg_reviews(pg_url, pg)
    with open_run(pg_url, pg.views().out_url, create=False, autocommit=False) as run:
        run.execute("UPDATE jobs SET updated_at = updated_at WHERE job_id = 'a'")  # held
        with pytest.raises(StoreWriteError) as raised:
            pg.decide([Decision("c", "approved"), Decision("a", "approved")], "cy")
        assert str(raised.value) == f"{pg.folder}: {BUSY}"
        run.rollback()
    assert pg_reviews(pg_url, pg) == before
    # The run's write done, the same batch goes through.
    assert len(pg.decide([Decision("c", "approved"), Decision("a", "approved")], "cy")) == 2


def test_a_write_that_fails_is_a_store_error_without_the_password(
    logs: tuple[ReviewLog, PostgresReviewLog, str],
) -> None:
    _, pg, pg_url = logs
    with open_run(pg_url, pg.views().out_url, create=False) as conn:
        conn.execute("ALTER TABLE reviews RENAME TO reviews_gone")
    with pytest.raises(StoreWriteError) as raised:
        pg.decide([Decision("a", "approved")], "cy")
    assert "cannot record the review" in str(raised.value)
    assert PG_PASSWORD not in str(raised.value)


def test_a_run_the_state_does_not_hold_is_refused(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(StoreError) as raised:
        PostgresReviewLog(pg_url, tmp_path / "never-run")
    assert "no run planned at" in str(raised.value)
    assert PG_PASSWORD not in str(raised.value)
    assert not isinstance(raised.value, psycopg.Error)
