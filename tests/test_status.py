"""``image-runner status``: where a run stands, finished, live (without disturbing it) or killed."""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runner.core.lifecycle import Run
from runner.emulator import Emulator, EmulatorConfig, EmulatorThread
from runner.manifest.load import load_manifest
from runner.outputs.status import RunStatus, format_status, read_status
from runner.store.sqlite import SqliteStore
from runner.store.views import LastRun, StatusFacts
from tests.conftest import db_rows, options, run_manifest, write_manifest
from tests.test_cli import cli, env, run_cli


def status_json(out: Path) -> dict[str, Any]:
    done = run_cli("status", out, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def snapshot(out: Path) -> RunStatus | None:
    """The status read in-process, or None before the run created its checkpoint."""
    if not (out / "checkpoint.sqlite").exists():
        return None
    store = SqliteStore.open_read_only(out)
    try:
        return read_status(store)
    finally:
        store.close()


def many_jobs(tmp_path: Path, count: int) -> Path:
    jobs = [{"id": f"img-{i}", "prompt": f"picture {i}", "size": "1280x544"} for i in range(count)]
    return write_manifest(tmp_path, jobs)


async def test_a_finished_run(tmp_path: Path, emulator: Emulator) -> None:
    jobs = [
        {"id": "ok", "prompt": "a fine picture", "size": "1280x544"},
        {"id": "refused", "prompt": "no [[faults:policy]]", "size": "1280x544"},
        {"id": "busy", "prompt": "later [[faults:503]]", "size": "1280x544"},
    ]
    out = tmp_path / "out"
    await run_manifest(write_manifest(tmp_path, jobs), out, emulator.base_url, max_attempts=1)
    # A dry run of a longer manifest records nothing: neither the new job nor a run.
    longer = write_manifest(tmp_path, [*jobs, {"id": "new", "prompt": "one more"}])
    dry = dataclasses.replace(options(out, emulator.base_url), dry_run=True)
    await Run(load_manifest(longer), dry).execute()

    store = SqliteStore.open_read_only(out)
    try:
        later = datetime.now(UTC) + timedelta(minutes=5)
        status = read_status(store, now=later)
    finally:
        store.close()

    assert (status.state, status.live) == ("finished", False)
    assert (status.jobs, status.succeeded, status.failed, status.pending) == (3, 1, 2, 0)
    assert status.failed_retryable == 1  # the 503: a rerun tries it again
    assert status.failures == {"content_policy_violation": 1, "server_error": 1}
    assert (status.confirmed_usd, status.possible_usd) == (0.03, 0.0)
    assert (status.in_flight, status.cut_off) == (0, 0)
    assert status.last_run is not None and status.last_run.run_id == 1
    assert status.last_run.outcome == "finished"
    assert status.idle_s is not None and 5 * 60 - 5 < status.idle_s < 5 * 60 + 1

    as_dict = status.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["jobs"] == {
        "total": 3,
        "succeeded": 1,
        "failed": 2,
        "failed_retryable": 1,
        "pending": 0,
    }
    assert as_dict["spend_usd"] == {"confirmed": 0.03, "possible": 0.0}
    assert as_dict["live"] is False

    text = format_status(status)
    assert "jobs:      3: 1 succeeded, 2 failed (1 retried by a rerun), 0 pending" in text
    assert "spent:     $0.03 confirmed + $0.00 possible" in text
    assert "failures:  1 content_policy_violation, 1 server_error" in text
    assert "state:     finished (run 1, " in text
    assert "1 job left: rerun the same command to do them" in text
    assert "5 min ago" in text


def test_status_while_a_run_is_live_does_not_disturb_it(tmp_path: Path) -> None:
    count = 20
    with EmulatorThread(EmulatorConfig(latency_s=0.5)) as server:
        out = tmp_path / "out"
        args = ("run", many_jobs(tmp_path, count), "--out", out, "--base-url", server.base_url)
        proc = subprocess.Popen(
            cli(*args, "--no-progress", "--concurrency", "2"),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not (out / "checkpoint.sqlite").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = []
            while proc.poll() is None and time.monotonic() < deadline:
                seen.append(status_json(out))
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        assert f"{count} succeeded, 0 failed, 0 pending" in stdout
        assert sorted(bill.prompt for bill in server.emulator.bills) == sorted(
            f"picture {i}" for i in range(count)
        )  # every image paid once: status took nothing from the run

    live = [s for s in seen if s["live"]]
    assert len(seen) >= 3 and len(live) >= 2, seen
    assert all(s["state"] == "live" and s["last_run"]["finished_at"] is None for s in live)
    busy = [s for s in live if 0 < s["jobs"]["succeeded"] < count and s["jobs"]["pending"] > 0]
    assert busy, live
    assert any(s["in_flight"] > 0 for s in busy), busy
    # Attempts not yet settled: at most 2 requests, plus as many answers being saved.
    assert all(0 <= s["in_flight"] <= 2 * 2 for s in live)
    assert all(s["jobs"]["total"] in (0, count) for s in live)
    assert len(list((out / "images").iterdir())) == count

    final = status_json(out)
    assert (final["state"], final["live"], final["in_flight"]) == ("finished", False, 0)
    assert final["jobs"]["succeeded"] == count
    assert final["spend_usd"]["confirmed"] == round(count * 0.03, 2)


def test_a_killed_run_is_interrupted(tmp_path: Path) -> None:
    with EmulatorThread(EmulatorConfig(latency_s=0.5)) as server:
        out = tmp_path / "out"
        args = ("run", many_jobs(tmp_path, 12), "--out", out, "--base-url", server.base_url)
        proc = subprocess.Popen(
            cli(*args, "--no-progress", "--concurrency", "2"),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = snapshot(out)
                if now is not None and now.succeeded >= 2 and now.in_flight >= 1:
                    break  # killed with requests out, waiting on the emulator's latency
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    status = status_json(out)
    assert (status["state"], status["live"], status["in_flight"]) == ("interrupted", False, 0)
    assert status["last_run"]["finished_at"] is None and status["last_run"]["outcome"] is None
    assert status["jobs"]["succeeded"] >= 2 and status["jobs"]["pending"] > 0
    assert status["cut_off"] >= 1
    assert status["spend_usd"]["possible"] == round(status["cut_off"] * 0.03, 2)

    human = run_cli("status", out)
    assert human.returncode == 0, human.stderr
    assert "interrupted" in human.stdout and "rerun the same command to resume" in human.stdout
    assert f"cut off:   {status['cut_off']} requests were in flight" in human.stdout


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, extra in ((tmp_path / "empty", ()), (tmp_path / "missing", ("--json",))):
        done = run_cli("status", folder, *extra)
        assert done.returncode == 2
        assert f"error: {folder} holds no image-runner checkpoint" in done.stderr
        assert done.stdout == ""
    assert not (tmp_path / "missing").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_checkpoint_being_created_reads_as_no_run_yet(tmp_path: Path) -> None:
    """The moment between a first run creating the file and creating its tables."""
    (tmp_path / "out").mkdir()
    sqlite3.connect(tmp_path / "out" / "checkpoint.sqlite").close()
    status = snapshot(tmp_path / "out")
    assert status is not None
    assert (status.state, status.jobs, status.last_run, status.idle_s) == (
        "never_run",
        0,
        None,
        None,
    )
    assert "state:     no run recorded yet" in format_status(status)
    assert json.loads(json.dumps(status.to_dict()))["jobs"]["total"] == 0


async def test_a_dry_run_leaves_the_run_history_alone(tmp_path: Path, emulator: Emulator) -> None:
    """After a night the provider stopped, a dry run records no run of its own: status still
    says how the last real run ended, not "finished"."""
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "a [[faults:401]]"}])
    stopped = await run_manifest(manifest, out, emulator.base_url)
    assert stopped.stop_reason is not None
    dry = dataclasses.replace(options(out, emulator.base_url), dry_run=True)
    await Run(load_manifest(manifest), dry).execute()

    assert db_rows(out, "SELECT run_id, outcome FROM runs") == [(1, stopped.stop_reason)]
    status = snapshot(out)
    assert status is not None and status.last_run is not None
    assert (status.last_run.run_id, status.last_run.outcome) == (1, stopped.stop_reason)
    assert f"stopped: run 1: {stopped.stop_reason}" in format_status(status)


class FactsOnly:
    """A store that is no SQLite: status needs nothing but its folder and its status facts."""

    def __init__(self, folder: Path, facts: StatusFacts | None) -> None:
        self.folder = folder
        self.facts = facts

    def views(self) -> Any:
        return self

    def status_facts(self) -> StatusFacts | None:
        return self.facts


def test_status_reads_through_the_views_alone(tmp_path: Path) -> None:
    """A run cut off by a crash, as any backend tells it: its attempts in flight count as
    possible charges at the image price."""
    run = LastRun(7, "2026-01-01T10:00:00.000+00:00", None, None, pid=None)
    facts = StatusFacts(
        succeeded=3,
        failed=1,
        failed_retryable=1,
        pending=4,
        in_flight=2,
        confirmed_micro_usd=90_000,
        possible_micro_usd=30_000,
        last_activity_at="2026-01-01T10:02:00.000+00:00",
        last_run=run,
        failures={"server_error": 1},
    )
    now = datetime(2026, 1, 1, 10, 3, tzinfo=UTC)
    status = read_status(FactsOnly(tmp_path, facts), now=now)
    assert (status.state, status.jobs, status.in_flight, status.cut_off) == ("interrupted", 8, 0, 2)
    assert (status.confirmed_usd, status.possible_usd, status.idle_s) == (0.09, 0.09, 60.0)
    assert status.last_run == run and status.failures == {"server_error": 1}

    empty = read_status(FactsOnly(tmp_path, None))
    assert (empty.state, empty.jobs, empty.last_run) == ("never_run", 0, None)


@pytest.mark.parametrize(
    ("count", "words"),
    [
        (1, ["in flight: 1 request\n", "1 request was in flight", "1 job left"]),
        (2, ["in flight: 2 requests\n", "2 requests were in flight", "2 jobs left"]),
    ],
)
def test_status_counts_read_right_in_the_singular(count: int, words: list[str]) -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

    def status(state: str, last_run: LastRun) -> str:
        return (
            format_status(
                RunStatus(
                    folder=Path("out"),
                    state=state,  # type: ignore[arg-type]
                    succeeded=1,
                    failed=0,
                    failed_retryable=0,
                    pending=count,
                    in_flight=count if state == "live" else 0,
                    cut_off=count if state == "interrupted" else 0,
                    confirmed_usd=0.03,
                    possible_usd=0.03 * count,
                    last_activity_at=now,
                    idle_s=1.0,
                    last_run=last_run,
                )
            )
            + "\n"
        )

    stamp = now.isoformat()
    text = status("live", LastRun(1, stamp, None, None, 1))
    text += status("interrupted", LastRun(1, stamp, None, None, None))
    text += status("finished", LastRun(1, stamp, stamp, "finished", None))
    for phrase in words:
        assert phrase in text, text
