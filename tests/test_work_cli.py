"""``image-runner work`` and ``stop`` from the command line, on a run planned with ``--state``:
a worker joins, claims what is queued, and ends when nothing is left; a stop reaches it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.cli.main import main
from runner.core.plan import make_plan
from runner.emulator import EmulatorConfig
from runner.manifest import load_manifest
from runner.store.postgres import open_pg_store
from tests.chaos import REPO, ThreadedEmulator
from tests.conftest import TEST_KEY, write_manifest


@pytest.fixture
def emulator() -> Iterator[ThreadedEmulator]:
    """An emulator on a thread of its own: these tests wait on subprocesses."""
    served = ThreadedEmulator(EmulatorConfig())
    served.start()
    yield served
    served.stop()


def test_a_worker_joins_a_planned_run_and_ends_when_nothing_is_left(
    tmp_path: Path, pg_url: str, emulator: ThreadedEmulator
) -> None:
    manifest = write_manifest(
        tmp_path, [{"id": f"w{i}", "prompt": f"a kite {i}", "size": "1280x544"} for i in range(12)]
    )
    out = tmp_path / "out"
    common = ["--state", pg_url, "--out", str(out), "--base-url", emulator.url]
    env = {"IMAGE_RUNNER_API_KEY": TEST_KEY, "PATH": "/usr/bin:/bin"}
    # Planned and queued by the store, as a planning run does before its pool starts.
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as store:
        store.queue([job.id for job in make_plan(load_manifest(manifest), store).todo])
    assert len(emulator.emulator.requests) == 0
    worked = subprocess.run(
        [sys.executable, "-m", "runner", "work", *common, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert worked.returncode == 0, worked.stdout + worked.stderr
    assert "worker:    12 succeeded, 0 failed" in worked.stdout
    assert len(emulator.emulator.requests) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"w{i}.png" for i in range(12)
    )


def test_stop_reaches_the_run_and_a_new_plan_lifts_it(
    tmp_path: Path, pg_url: str, emulator: ThreadedEmulator
) -> None:
    manifest = write_manifest(tmp_path, [{"id": "s1", "prompt": "a kite", "size": "1280x544"}])
    out = tmp_path / "out"
    common = ["--state", pg_url, "--out", str(out), "--base-url", emulator.url]
    env = {"IMAGE_RUNNER_API_KEY": TEST_KEY, "PATH": "/usr/bin:/bin"}
    first = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(manifest), *common, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert main(["stop", str(out), "--state", pg_url, "--reason", "maintenance"]) == 0
    worked = subprocess.run(
        [sys.executable, "-m", "runner", "work", *common, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert worked.returncode == 3 and "maintenance" in worked.stdout, worked.stdout


def test_a_worker_started_before_the_plan_waits_for_it(
    tmp_path: Path, pg_url: str, emulator: ThreadedEmulator
) -> None:
    """A worker started with its planning run (docker compose, a Kubernetes Job) finds the run
    not yet planned: it waits for the plan instead of ending as if the run were done."""
    manifest = write_manifest(
        tmp_path, [{"id": f"e{i}", "prompt": f"an egg {i}", "size": "1280x544"} for i in range(4)]
    )
    out = tmp_path / "out"
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)):
        pass  # the run exists (its planning run opened it) but nothing is queued yet
    common = ["--state", pg_url, "--out", str(out), "--base-url", emulator.url]
    env = {"IMAGE_RUNNER_API_KEY": TEST_KEY, "PATH": "/usr/bin:/bin"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "runner", "work", *common, "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=3)  # still waiting: the run is not planned
        with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as store:
            store.queue([job.id for job in make_plan(load_manifest(manifest), store).todo])
        output, _ = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    assert "worker:    4 succeeded" in output
