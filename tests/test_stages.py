"""The per-image stage counters (runner.stages) and the breakdown figure built on them: nothing
is counted unless asked, a real run counts every stage of every image, and the figure's
arithmetic splits the event loop and the process as it says."""

from __future__ import annotations

import math
import threading
from pathlib import Path

from bench.breakdown import per_image_us, table
from runner import stages
from runner.emulator import Emulator
from runner.stages import StageTimes, counting, timed
from tests.conftest import run_manifest, write_manifest


def test_nothing_is_counted_unless_asked() -> None:
    with timed("verify"):
        pass
    with counting() as times:
        with timed("verify"):
            pass
        with timed("verify"):
            pass
    with timed("verify"):
        pass
    assert times.calls == {"verify": 2}
    assert times.wall_ns["verify"] >= 0 and times.cpu_ns["verify"] >= 0
    assert stages._current is None


def test_stages_of_other_threads_are_counted_together() -> None:
    def work() -> None:
        for _ in range(100):
            with timed("write"):
                pass

    with counting() as times:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert times.calls == {"write": 400}


async def test_a_run_counts_every_stage_of_every_image(tmp_path: Path, emulator: Emulator) -> None:
    jobs = [{"id": f"j{i}", "prompt": f"p{i}", "size": "1280x544"} for i in range(6)]
    manifest = write_manifest(tmp_path, jobs)
    with counting() as times:
        report = await run_manifest(manifest, tmp_path / "out", emulator.base_url)
    assert report.pool is not None and report.pool.progress.succeeded == 6
    for stage in ("save", "verify", "write"):
        assert times.calls[stage] == 6, stage
    assert times.calls["fsync file"] >= 6  # the run's books are written durably too
    assert times.calls["event loop"] == times.calls["pool run"] == 1
    assert times.calls["b64 stream"] >= 6
    assert times.calls["checkpoint commit"] >= 1
    assert times.cpu_ns["event loop"] > times.cpu_ns["b64 stream"]


def test_the_breakdown_splits_the_loop_and_the_process() -> None:
    times = StageTimes()
    us = 1000  # ns
    for stage, wall, cpu in [
        ("event loop", 900 * us, 400 * us),
        ("b64 stream", 50 * us, 50 * us),
        ("progress", 10 * us, 10 * us),
        ("save", 800 * us, 200 * us),
        ("checkpoint commit", 300 * us, 100 * us),
        ("pool run", 1000 * us, 900 * us),
    ]:
        times.add(stage, wall, cpu)
    times.add("checkpoint commit", 0, 0)  # two group commits for 10 images' 20 writes
    got = per_image_us(times, 10)
    assert got["loop rest"][1] == 34.0  # 40 - 5 - 1
    assert got["other"][1] == 20.0  # 90 - 40 - 20 - 10
    assert got["pool run"] == (100.0, 90.0)
    assert got["writes per commit"][0] == 10.0
    assert math.isnan(got["loop rest"][0])
    lines = table(got, 25.0)
    assert any("the rest: aiohttp" in line and "34 us" in line for line in lines)
    assert "10.0 writes per group commit" in lines[-1]
