"""runner.outputs.ledger: results and ledger written a batch at a time, read back as pandas
wrote them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.errors import JobFailedError, ServerError, StoreError
from runner.images.files import is_temp_name
from runner.jobs import Job
from runner.outputs import ledger as ledger_module
from runner.outputs.ledger import RESULTS_COLUMNS, write_ledger
from runner.store.base import Outcome, SavedImage
from runner.store.sqlite import SqliteStore
from tests.conftest import make_job


def job(job_id: str, prompt: str = "a picture", images: tuple[Path, ...] = ()) -> Job:
    return make_job(job_id, prompt, images=images)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "RESULTS_BATCH_JOBS", 2)


def test_results_follow_the_manifest_across_batches(tmp_path: Path, small_batches: None) -> None:
    refs = (tmp_path / "a.png", tmp_path / "b.png")
    jobs = [
        job("zz-done", 'a "quoted", prompt'),
        job("aa-failed"),
        job("mm-retry"),
        job("bb-edit", images=refs),
        job("never-planned"),
    ]
    with SqliteStore.open(tmp_path / "out") as store:
        store.plan_jobs(jobs[:4])
        store.commit_intent(jobs[0])
        (store.folder / "images").mkdir()
        (store.folder / "images" / "zz-done.png").write_bytes(b"png")
        store.commit_success(
            "zz-done",
            1,
            Outcome("confirmed", 30_000, 10, 20, 30),
            SavedImage("images/zz-done.png", 1280, 544, "ab" * 32),
        )
        store.commit_intent(jobs[1])
        refused = JobFailedError("no", job_id="aa-failed", status=400, code="content_policy")
        store.commit_failure("aa-failed", 1, Outcome("none"), refused, retry_later=False)
        store.commit_intent(jobs[2])
        store.commit_failure(
            "mm-retry",
            1,
            Outcome("possible", 30_000, error="timeout"),
            ServerError("down", job_id="mm-retry"),
            retry_later=True,
        )
        files = write_ledger(iter(jobs), store)

    t = files.totals
    assert (t.succeeded, t.failed, t.pending, t.failed_retry_on_rerun) == (1, 2, 2, 1)
    assert (t.confirmed_usd, t.possible_usd) == (0.03, 0.03)

    csv_text = files.results_csv.read_text()
    assert csv_text.splitlines()[0] == ",".join(RESULTS_COLUMNS)
    assert csv_text.splitlines()[1] == (
        'zz-done,succeeded,generations,gpt-image-2-vip,1280x544,"a ""quoted"", prompt",,'
        f"images/zz-done.png,1280,544,{'ab' * 32},1,0.03,0.0,,,False,1,unreviewed,False"
    )
    assert csv_text.splitlines()[5] == (
        "never-planned,pending,generations,gpt-image-2-vip,1280x544,a picture,"
        ",,,,,0,0.0,0.0,,,False,1,unreviewed,False"
    )
    for frame in (pd.read_parquet(files.results_parquet), pd.read_csv(files.results_csv)):
        assert list(frame.columns) == RESULTS_COLUMNS
        assert list(frame["job_id"]) == [j.id for j in jobs]  # manifest order, not id order
        assert list(frame["status"]) == ["succeeded", "failed", "failed", "pending", "pending"]
        assert list(frame["retry_on_rerun"]) == [False, False, True, False, False]
        assert frame.loc[3, "images"] == f"{refs[0]}|{refs[1]}"
        assert frame.loc[3, "endpoint"] == "edits"
    results = pd.read_parquet(files.results_parquet)
    assert str(results["width"].dtype) == "Int64" and results.loc[0, "width"] == 1280
    assert results["width"].isna().tolist() == [False, True, True, True, True]
    assert results.loc[1, "error_cause"] == "content_policy"

    ledger = pd.read_csv(files.ledger_csv)
    assert list(ledger["job_id"]) == ["zz-done", "mm-retry"]
    assert list(ledger["billing"]) == ["confirmed", "possible"]
    assert ledger.loc[0, "total_tokens"] == 30 and pd.isna(ledger.loc[1, "total_tokens"])


def test_an_empty_manifest_still_gets_files_with_their_columns(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "out") as store:
        files = write_ledger([], store)
    assert list(pd.read_parquet(files.results_parquet).columns) == RESULTS_COLUMNS
    assert pd.read_csv(files.results_csv).empty
    assert pd.read_csv(files.ledger_csv).empty
    assert files.totals.jobs == 0
    assert not [p for p in (tmp_path / "out").iterdir() if is_temp_name(p.name)]


def test_the_ledger_streams_typed_attempts(tmp_path: Path) -> None:
    """The ledger's attempts come as named records, read as they are consumed (a folder's
    history may hold millions), not as one list."""
    jobs = [job("a"), job("b"), job("c")]
    with SqliteStore.open(tmp_path / "out") as store:
        store.plan_jobs(jobs)
        for j in jobs:
            assert store.commit_intent(j) == 1
        store.commit_outcome("a", 1, Outcome("confirmed", 30_000, 1, 2, 3))
        store.commit_outcome("b", 1, Outcome("none"))
        store.commit_outcome("c", 1, Outcome("possible", 30_000, error="reset"))
        attempts = store.views().billed_attempts()
        assert isinstance(attempts, Iterator) and not isinstance(attempts, list)
        first = next(attempts)
        assert (first.job_id, first.attempt, first.billing, first.cost_micro_usd) == (
            "a",
            1,
            "confirmed",
            30_000,
        )
        assert first.total_tokens == 3 and first.size == "1280x544"
        assert [(a.job_id, a.billing) for a in attempts] == [("c", "possible")]
        assert store.views().spend() == (30_000, 30_000)


def test_an_unreadable_checkpoint_is_a_store_error_and_leaves_no_file(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "out") as store:
        store.plan_jobs([job("a")])
        store.db.execute("DROP TABLE attempts")
        with pytest.raises(StoreError, match="out: cannot read the checkpoint: no such table"):
            write_ledger([job("a")], store)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "checkpoint.sqlite"]
