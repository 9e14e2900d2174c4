"""``image-runner status`` on a run in PostgreSQL: whether it is live is decided by its workers'
leases (the workers run on other machines: a pid says nothing here), and how many are live is
shown, in the human view and in ``--json``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.cli.main import main
from runner.store.postgres import PostgresStore
from tests.conftest import planned_jobs


def status(pg_url: str, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", str(out), "--state", pg_url, "--json"]) == 0
    found: dict[str, Any] = json.loads(capsys.readouterr().out)
    return found


def human_status(pg_url: str, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["status", str(out), "--state", pg_url]) == 0
    return capsys.readouterr().out


def test_a_run_is_live_while_a_worker_holds_its_lease(
    open_worker: Callable[[], PostgresStore],
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    planner = open_worker()
    planned_jobs(planner, 3)
    run_id = planner.start_run()
    found = status(pg_url, out, capsys)
    assert (found["state"], found["live"], found["workers_live"]) == ("live", True, 1)
    text = human_status(pg_url, out, capsys)
    assert "state:     live: 1 worker holding a lease" in text
    assert "workers:   1 live" in text and "in flight: 0 requests" in text

    open_worker()
    assert status(pg_url, out, capsys)["workers_live"] == 2

    planner.finish_run(run_id, "finished")
    planner.close()  # its row says it finished: the run is still live, by the other worker
    assert status(pg_url, out, capsys)["workers_live"] == 1


def test_a_run_whose_workers_closed_is_not_live(
    open_worker: Callable[[], PostgresStore],
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    worker = open_worker()
    planned_jobs(worker, 3)
    worker.finish_run(worker.start_run(), "finished")
    worker.close()
    found = status(pg_url, out, capsys)
    assert (found["state"], found["live"], found["workers_live"]) == ("finished", False, 0)
    text = human_status(pg_url, out, capsys)
    assert "workers:   0 live" in text and "3 jobs left: rerun" in text


def test_a_worker_whose_lease_expired_is_not_counted(
    open_worker: Callable[[], PostgresStore],
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker killed (here: its heartbeat stopped, so nobody renews its lease) leaves its run
    unfinished: once its lease expires the run is interrupted, not live, whatever its pid."""
    monkeypatch.setenv("RUNNER_LEASE_S", "1")
    out = tmp_path / "out"
    worker = open_worker()
    planned_jobs(worker, 3)
    worker.start_run()
    assert status(pg_url, out, capsys)["state"] == "live"
    heartbeat = worker._heartbeat
    assert heartbeat is not None
    heartbeat.close()
    while worker.live_workers():  # until the database's clock passes the lease
        time.sleep(0.1)
    found = status(pg_url, out, capsys)
    assert (found["state"], found["live"], found["workers_live"]) == ("interrupted", False, 0)
    text = human_status(pg_url, out, capsys)
    assert "interrupted: run 1 ended without finishing and no worker holds a lease" in text
