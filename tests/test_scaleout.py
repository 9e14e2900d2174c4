"""Issue 12's acceptance: worker processes of one run, sharing its state in PostgreSQL, against
one emulator with an unannounced rate limit and injected faults, while one worker after another
is killed with SIGKILL and started again.

Every job succeeds once, each image on disk is the one its success recorded (by sha256), the
emulator never accepted more than its token bucket allows (the workers' shared pace never made
it refuse much), confirmed spend is $0.03 an image, and what the emulator billed lies between
the confirmed spend and the confirmed plus possible spend. With ``--max-cost`` the emulator
bills no more than the cap across every worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runner.emulator import EmulatorConfig
from tests.chaos import REPO, ThreadedEmulator, Workers, max_over_limit
from tests.conftest import TEST_KEY

pytestmark = pytest.mark.slow

LIMIT_RPM, BURST = 600, 10


def write_jobs(folder: Path, count: int) -> Path:
    manifest = folder / "jobs.yaml"
    jobs = [{"id": f"j{i:05d}", "prompt": f"a lighthouse, study {i}"} for i in range(count)]
    doc = {"defaults": {"size": "1280x544"}, "jobs": jobs}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


def status(out: Path, state: str, env: dict[str, str]) -> dict[str, object]:
    shown = subprocess.run(
        [sys.executable, "-m", "runner", "status", str(out), "--state", state, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, object] = json.loads(shown.stdout)
    return found


def run_with_kills(
    tmp_path: Path,
    pg_url: str,
    emulator_url: str,
    *,
    jobs: int,
    workers: int,
    extra: list[str],
    kill_every_s: tuple[float, float],
    timeout_s: float,
) -> tuple[Workers, Path, dict[str, str]]:
    """Plan ``jobs`` with ``run`` (also a worker), add ``workers - 1`` ``work``-ers once the
    queue is there, and kill one at random every few seconds until every process ended by
    itself; returns the workers and the output folder."""
    manifest, out = write_jobs(tmp_path, jobs), tmp_path / "out"
    env = {**os.environ, "IMAGE_RUNNER_API_KEY": TEST_KEY, "RUNNER_LEASE_S": "3"}
    common = ["--state", pg_url, "--out", str(out), "--base-url", emulator_url]
    common += ["--concurrency", "8", "--timeout", "20", "--no-progress", *extra]
    planner = ["run", str(manifest), *common]
    worker = ["work", *[a for a in common if a != "--no-progress"], "--no-progress"]
    pool = Workers([planner] + [worker] * (workers - 1), env, tmp_path / "logs")
    pool.processes = [None] * workers
    pool.start(0)
    deadline = time.monotonic() + 60
    while not (out / "images").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the plan is queued before the first image
    for slot in range(1, workers):
        pool.start(slot)
    rng = random.Random(12)
    deadline = time.monotonic() + timeout_s
    try:
        while pool.alive() and time.monotonic() < deadline:
            time.sleep(rng.uniform(*kill_every_s))
            if pool.alive():
                pool.kill_one(rng)
        codes = pool.wait(max(1.0, deadline - time.monotonic()))
    finally:
        pool.kill_all()
    assert None not in codes, f"workers still running after {timeout_s} s\n{pool.output()}"
    return pool, out, env


def test_four_workers_killed_and_restarted_run_every_job_once(tmp_path: Path, pg_url: str) -> None:
    emulator = ThreadedEmulator(
        EmulatorConfig(rate_limit_rpm=LIMIT_RPM, rate_limit_burst=BURST, fault_rate=0.1, seed=5)
    )
    url = emulator.start()
    try:
        pool, out, env = run_with_kills(
            tmp_path, pg_url, url, jobs=2000, workers=4, extra=[], kill_every_s=(3, 6),
            timeout_s=480,
        )  # fmt: skip
        # The last planning run ended after every job was done and wrote the books.
        results = pd.read_parquet(out / "results.parquet")
        assert len(results) == 2000, pool.output()
        assert (results["status"] == "succeeded").all(), results["status"].value_counts()
        images = sorted((out / "images").iterdir())
        assert len(images) == 2000  # one image per job, no stray file
        recorded = dict(zip(results["image_path"], results["sha256"], strict=True))
        for image in images:
            digest = hashlib.sha256(image.read_bytes()).hexdigest()
            assert recorded[f"images/{image.name}"] == digest, image.name
        facts = status(out, pg_url, env)
        spend = facts["spend_usd"]
        assert isinstance(spend, dict)
        confirmed, possible = spend["confirmed"], spend["possible"]
        assert confirmed == pytest.approx(0.03 * 2000)
        assert confirmed - 1e-9 <= emulator.billed_usd <= confirmed + possible + 1e-9
        over = max_over_limit(emulator.accepted_times(), LIMIT_RPM, BURST)
        assert over <= 1, f"the emulator accepted {over:.1f} requests past its limit"
        print(f"kills {pool.kills}, billed ${emulator.billed_usd:.2f}, possible ${possible:.2f}")
    finally:
        emulator.stop()
