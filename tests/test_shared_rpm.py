"""One ``--rpm`` for all the workers of a run: the planning run's, recorded in the run's
control row, is the ceiling every worker paces under; a worker's own may only lower it. Judged
by the emulator's own books (when each request arrived)."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
from pathlib import Path

import pytest

from runner.core.lifecycle import Run
from runner.core.pacer import PacerConfig
from runner.manifest import load_manifest
from runner.store.postgres import claimer, open_pg_store
from tests.conftest import MakeEmulator, options, write_manifest


def test_the_planning_runs_rpm_is_every_workers_ceiling(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open_pg_store(pg_url, out, worker=False, rpm=240) as planner:
        assert planner.ceiling_rpm(None) == 240
        with open_pg_store(pg_url, out, worker=False, create=False) as joiner:
            assert joiner.ceiling_rpm(None) == 240  # a worker without --rpm: the run's
            assert joiner.ceiling_rpm(600) == 240  # never raised by a worker's own
            assert joiner.ceiling_rpm(60) == 60  # only lowered, for that worker
    with open_pg_store(pg_url, out, worker=False) as replanned:  # a plan without --rpm keeps it
        assert replanned.ceiling_rpm(None) == 240
    with open_pg_store(pg_url, out, worker=False, rpm=120) as lowered:  # until one gives it
        assert lowered.ceiling_rpm(None) == 120


async def test_two_workers_of_one_run_keep_to_its_rpm(
    pg_url: str, tmp_path: Path, make_emulator: MakeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claimer, "CLAIM_BATCH", 4)  # both workers get jobs of a short run
    emulator = await make_emulator()
    rows = [{"id": f"r{i}", "prompt": f"a kite {i}", "size": "1280x544"} for i in range(24)]
    manifest = write_manifest(tmp_path, rows)
    shared = dataclasses.replace(options(tmp_path / "out", emulator.base_url), state_url=pg_url)
    planning = Run(
        load_manifest(manifest), dataclasses.replace(shared, pacer=PacerConfig(ceiling_rpm=480))
    )
    joining = Run([], dataclasses.replace(shared, join=True))  # no --rpm of its own
    reports = await asyncio.gather(planning.execute(), joining.execute())
    assert [r.stop_reason for r in reports] == [None, None]
    assert reports[1].pool is not None and reports[1].pool.progress.requests > 0
    arrived = sorted(r.received_at for r in emulator.requests)
    assert len(arrived) == 24
    # 480/min = 8/s for both workers together: no 2 s hold more than 17 (a grid's both ends),
    # one more for jitter; the worker without --rpm of its own would send at once.
    most = max(bisect.bisect_right(arrived, t + 2.0) - i for i, t in enumerate(arrived))
    per_s = (len(arrived) - 1) / (arrived[-1] - arrived[0])
    assert most <= 18 and per_s <= 8 * 1.05, (most, per_s)
