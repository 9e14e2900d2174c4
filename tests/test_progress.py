"""Progress reports (runner.core.progress): at most one an interval, none lost, failures at once,
the final count always last; and a real run reports far fewer times than its counters move."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runner.core.lifecycle import Run
from runner.core.progress import Progress, ProgressReporter
from runner.emulator import Emulator
from runner.manifest.load import load_manifest
from tests.conftest import options, write_manifest


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


async def test_changes_within_an_interval_are_sent_once_by_the_timer() -> None:
    counters, seen, clock = Progress(), list[Progress](), Clock()
    reporter = ProgressReporter(counters, seen.append, interval_s=0.05, clock=clock)
    counters.succeeded = 1
    reporter.changed()  # the first change goes at once
    assert [p.succeeded for p in seen] == [1]
    for n in range(2, 50):
        counters.succeeded = n
        reporter.changed()
    assert len(seen) == 1  # the rest wait for the timer ...
    await asyncio.sleep(0.1)
    assert [p.succeeded for p in seen] == [1, 49]  # ... which sends them as they are then
    assert seen[0] is not counters and seen[1] is not counters  # copies


async def test_a_change_after_a_quiet_interval_goes_at_once() -> None:
    counters, seen, clock = Progress(), list[Progress](), Clock()
    reporter = ProgressReporter(counters, seen.append, interval_s=0.2, clock=clock)
    reporter.changed()
    clock.now_s += 0.3
    counters.succeeded = 1
    reporter.changed()
    assert [p.succeeded for p in seen] == [0, 1]


async def test_failures_go_at_once_and_flush_sends_what_waits() -> None:
    counters, seen, clock = Progress(), list[Progress](), Clock()
    reporter = ProgressReporter(counters, seen.append, interval_s=60.0, clock=clock)
    reporter.changed()
    for cause in ("not_sent", "server_error"):
        counters.last_error = (cause, "...")
        reporter.failed()  # each cause is seen, however close together
    counters.succeeded = 5
    reporter.changed()
    assert [p.last_error[0] for p in seen[1:] if p.last_error] == ["not_sent", "server_error"]
    assert seen[-1].succeeded == 0
    reporter.flush()
    assert seen[-1].succeeded == 5
    reporter.flush()  # nothing left to send
    assert len(seen) == 4


async def test_a_run_reports_a_few_times_and_ends_on_the_final_count(
    tmp_path: Path, emulator: Emulator
) -> None:
    jobs = [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(60)]
    seen: list[Progress] = []
    run = Run(
        load_manifest(write_manifest(tmp_path, jobs)),
        options(tmp_path / "out", emulator.base_url, concurrency=8),
        on_progress=seen.append,
    )
    report = await run.execute()
    assert report.pool is not None and report.pool.progress.succeeded == 60
    # The counters moved 4 times an image (sent, answered, saved, recorded): 240 copies before.
    assert len(seen) < 120
    assert seen[-1] == report.pool.progress
