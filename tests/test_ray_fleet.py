"""Ray as the launcher, on a 2-node local Ray cluster (started once for the module), a real
PostgreSQL state and the emulator: worker actors on both nodes run every job once, and an actor
whose process is killed mid-run is restarted and the run still completes, each job once, the
emulator's bill within what the books say it may be; a stop at once books what the killed
actors had in flight as possible charges."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ray.cluster_utils import Cluster

from runner.cli.main import main
from runner.core.lifecycle import Run, RunReport
from runner.core.progress import Progress
from runner.emulator import Emulator
from runner.library import execute
from runner.manifest.load import load_manifest
from runner.storage.base import location_url
from runner.store.postgres.connect import run_schema
from tests.conftest import TEST_KEY, MakeEmulator, options, write_manifest
from tests.services import PG_PASSWORD, start_ray_cluster

# One process (pytest -n --dist loadgroup) runs both Ray modules, one cluster after the other.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

JOBS = 200
LEASE_S = "3"  # a killed actor's claims come back to the queue within seconds
PLACED = re.compile(r"worker actor (\d+) runs on node (\w+), pid (\d+)")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """Two nodes of 2 CPUs each. The actors' processes inherit the short lease from the nodes,
    which inherit it from this process."""

    with start_ray_cluster(LEASE_S) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_S", LEASE_S)  # the driver's own worker row


def manifest(folder: Path) -> Path:
    jobs = [{"id": f"j{n:03d}", "prompt": f"picture {n}"} for n in range(JOBS)]
    return write_manifest(folder, jobs, defaults={"model": "gpt-image-2-vip"})


async def run_on_ray(
    folder: Path,
    emulator: Emulator,
    pg_url: str,
    cluster: Cluster,
    *,
    concurrency: int,
    on_progress: Callable[[Progress], None],
) -> RunReport:
    run = dataclasses.replace(
        options(folder / "out", emulator.base_url, concurrency=concurrency),
        state_url=pg_url,
        ray_address=cluster.address,
        workers=4,
    )
    return await execute(load_manifest(manifest(folder)), run, on_progress=on_progress)


def run_rows(pg_url: str, out: Path, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as conn:
        conn.execute(f'SET search_path TO "{run_schema(location_url(out))}"')
        return conn.execute(sql).fetchall()


def attempts_by_state(pg_url: str, out: Path) -> dict[str, list[str]]:
    """The job id of every attempt of the run, by the attempt's state."""
    rows = run_rows(pg_url, out, "SELECT state, job_id FROM attempts")
    found: dict[str, list[str]] = {}
    for state, job_id in rows:
        found.setdefault(state, []).append(job_id)
    return found


def placements(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, int]]:
    """(actor, node, pid) of each actor as the driver logged it, restarts included."""
    return [
        (int(m[1]), m[2], int(m[3]))
        for record in caplog.records
        if (m := PLACED.search(record.getMessage()))
    ]


def assert_every_job_once(report: RunReport, pg_url: str, out: Path) -> None:
    assert report.ledger is not None and report.stop_reason is None
    totals = report.ledger.totals
    assert (totals.succeeded, totals.failed, totals.pending) == (JOBS, 0, 0)
    confirmed = attempts_by_state(pg_url, out).get("confirmed", [])
    assert sorted(confirmed) == [f"j{n:03d}" for n in range(JOBS)]  # each job once
    assert len(list((out / "images").iterdir())) == JOBS


async def test_four_actors_on_two_nodes_run_every_job_once(
    ray_cluster: Cluster,
    pg_url: str,
    tmp_path: Path,
    make_emulator: MakeEmulator,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="runner")
    emulator = await make_emulator(latency_s=0.05)
    seen: list[Progress] = []
    report = await run_on_ray(
        tmp_path, emulator, pg_url, ray_cluster, concurrency=4, on_progress=seen.append
    )
    out = tmp_path / "out"
    assert_every_job_once(report, pg_url, out)
    assert len(emulator.bills) == JOBS and emulator.billed_usd == pytest.approx(JOBS * 0.03)
    assert report.ledger is not None and report.ledger.totals.possible_usd == 0
    placed = placements(caplog)
    assert sorted(actor for actor, _, _ in placed) == [1, 2, 3, 4]
    assert len({node for _, node, _ in placed}) == 2  # spread over both nodes
    assert seen[-1].succeeded == JOBS and seen[-1].failed == 0  # the driver's progress
    assert report.pool is not None and report.pool.progress.requests == JOBS
    printed = capfd.readouterr()
    logs = Path(ray_cluster.head_node.get_session_dir_path()) / "logs"
    ray_logs = [path.read_bytes() for path in logs.rglob("*") if path.is_file()]
    assert ray_logs  # the actors' output and Ray's own logs
    for text in (printed.out, printed.err, caplog.text):
        assert TEST_KEY not in text and PG_PASSWORD not in text
    for data in ray_logs:
        assert TEST_KEY.encode() not in data and PG_PASSWORD.encode() not in data


async def test_an_actor_killed_mid_run_is_restarted_and_the_run_completes(
    ray_cluster: Cluster,
    pg_url: str,
    tmp_path: Path,
    make_emulator: MakeEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runner")
    emulator = await make_emulator(latency_s=0.3)
    killed: list[int] = []

    def kill_one_actor(progress: Progress) -> None:
        placed = placements(caplog)
        if not killed and progress.succeeded >= 30 and placed:
            _, _, pid = placed[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    report = await run_on_ray(
        tmp_path, emulator, pg_url, ray_cluster, concurrency=2, on_progress=kill_one_actor
    )
    assert killed, "the run ended before an actor could be killed"
    assert any("died (its process ended); Ray restarted it" in r.message for r in caplog.records)
    # The driver called the restarted actor again: it told where it runs, and registered
    # as a worker of the run from its new process.
    first, _, pid = placements(caplog)[0]
    restarted = [p for actor, _, p in placements(caplog) if actor == first and p != pid]
    assert len(restarted) == 1
    worker_pids = {row[0] for row in run_rows(pg_url, tmp_path / "out", "SELECT pid FROM workers")}
    assert restarted[0] in worker_pids and pid in worker_pids
    assert_every_job_once(report, pg_url, tmp_path / "out")
    assert report.ledger is not None
    totals = report.ledger.totals
    assert totals.confirmed_usd == pytest.approx(JOBS * 0.03)
    # What the killed actor had in flight may have been billed: never more than that.
    assert totals.confirmed_usd - 1e-9 <= emulator.billed_usd
    assert emulator.billed_usd <= totals.confirmed_usd + totals.possible_usd + 1e-9


def test_the_cli_runs_a_manifest_on_ray_and_exits_0(
    ray_cluster: Cluster, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [{"id": f"c{n}", "prompt": f"picture {n}"} for n in range(10)]
    path = write_manifest(tmp_path, jobs, defaults={"model": "gpt-image-2-vip"})
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--state", pg_url, "--emulate", "--no-progress"]
    code = main([*argv, "--ray", ray_cluster.address, "--workers", "2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["counts"]["succeeded"] == 10 and summary["counts"]["requests"] == 10
    assert len(list((out / "images").iterdir())) == 10


async def test_a_stop_at_once_settles_the_killed_actors_requests_before_the_books(
    ray_cluster: Cluster, pg_url: str, tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    """A second stop kills the actors with their requests in flight, their leases still
    valid: the driver marks their workers finished and their requests possible charges before
    it writes the books, so the books hold what the emulator may bill."""
    latency_s = 4.0  # every request is still out when the run is stopped
    emulator = await make_emulator(latency_s=latency_s)
    runs: list[Run] = []
    in_flight_at_stop: list[int] = []

    def stop_twice() -> None:
        runs[0].stop()
        runs[0].stop()  # at once

    def stop_when_sending(progress: Progress) -> None:
        if not in_flight_at_stop and progress.in_flight >= 4:
            in_flight_at_stop.append(progress.in_flight)
            asyncio.get_running_loop().call_soon(stop_twice)

    run = dataclasses.replace(
        options(tmp_path / "out", emulator.base_url, concurrency=2),
        state_url=pg_url,
        ray_address=ray_cluster.address,
        workers=4,
    )
    jobs = load_manifest(manifest(tmp_path))
    report = await execute(jobs, run, on_run=runs.append, on_progress=stop_when_sending)
    assert in_flight_at_stop and report.cancelled and report.ledger is not None
    out = tmp_path / "out"
    assert "in_flight" not in attempts_by_state(pg_url, out)
    assert run_rows(pg_url, out, "SELECT COUNT(*) FROM workers WHERE finished_at IS NULL") == [(0,)]
    totals = report.ledger.totals
    assert totals.possible_usd >= 0.03
    await asyncio.sleep(latency_s + 1)  # the emulator answers, and bills, what reached it
    assert emulator.billed_usd > 0
    assert totals.confirmed_usd - 1e-9 <= emulator.billed_usd
    assert emulator.billed_usd <= totals.confirmed_usd + totals.possible_usd + 1e-9
