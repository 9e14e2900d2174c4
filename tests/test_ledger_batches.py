"""runner.outputs.ledger: batches read one ahead, in a thread, while the one before is written:
the files come out whole and in order, and an error reading a later batch reaches the caller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.jobs import Job
from runner.outputs import ledger as ledger_module
from runner.outputs.ledger import write_ledger
from runner.store.base import Outcome
from runner.store.sqlite import SqliteStore
from tests.conftest import make_job


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "RESULTS_BATCH_JOBS", 2)


def test_every_batch_is_written_once_in_order(tmp_path: Path) -> None:
    jobs = [make_job(f"job-{i}", f"picture {i}") for i in (4, 0, 3, 1, 2)]
    with SqliteStore.open(tmp_path / "out") as store:
        store.plan_jobs(jobs)
        for j in jobs:
            store.commit_intent(j)
            store.commit_outcome(j.id, 1, Outcome("confirmed", 30_000))
        files = write_ledger(jobs, store)
    results = pd.read_csv(files.results_csv)
    assert list(results.job_id) == [j.id for j in jobs]
    assert list(results.prompt) == [j.prompt for j in jobs]
    assert list(pd.read_parquet(files.results_parquet).job_id) == [j.id for j in jobs]
    ledger = pd.read_csv(files.ledger_csv)
    assert list(ledger.job_id) == [j.id for j in jobs]  # as they finished
    assert list(ledger.cost_usd) == [0.03] * 5
    assert files.totals.jobs == 5 and files.totals.confirmed_usd == pytest.approx(0.15)


def test_an_error_reading_a_later_batch_reaches_the_caller_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    jobs = [make_job(f"job-{i}") for i in range(5)]

    def manifest() -> Iterator[Job]:
        yield from jobs[:3]
        raise OSError("the manifest's spool is gone")

    with SqliteStore.open(tmp_path / "out") as store:
        store.plan_jobs(jobs)
        with pytest.raises(OSError, match="spool is gone"):
            write_ledger(manifest(), store)
        left = sorted(p.name for p in store.folder.iterdir() if not p.name.startswith("check"))
        assert left == [".lock"]
        # The connection is free again: the thread's read ended with the error.
        assert write_ledger(jobs, store).totals.pending == 5
