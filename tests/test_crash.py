"""Crash safety: SIGKILL the runner at random moments over a 300-job run with injected faults,
rerun until it finishes, then check the books against the emulator's own billing record.

``kill -9`` does not lose the page cache, so this tests process crashes, not power loss (see
RELIABILITY.md); the fsync discipline for power loss is in :func:`runner.images.files.write_atomic`
and the SQLite settings of :mod:`runner.store.schema`.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from runner.emulator import EmulatorConfig, EmulatorThread, RequestRecord
from runner.images.files import is_temp_name
from runner.images.verify import inspect_image
from runner.provider import SIZES
from tests.conftest import db_rows, make_ref, write_manifest
from tests.test_cli import cli, env

JOBS = 300
MIN_KILLS = 30


def crash_manifest(tmp_path: Path) -> Path:
    make_ref(tmp_path / "refs", "a.png", (80, 60))
    make_ref(tmp_path / "refs", "b.jpg", (60, 80))
    jobs = []
    for i in range(JOBS):
        job = {
            "id": f"c{i:03d}",
            "prompt": f"crash test image {i}",
            "size": SIZES[i % 10],  # the 1K sizes: the test is about state, not pixels
            "response_format": "url" if i % 4 == 1 else "b64_json",
        }
        if i % 5 == 0:
            job["images"] = ["refs/a.png", "refs/b.jpg"][: 1 + i % 2]
        jobs.append(job)
    return write_manifest(tmp_path, jobs)


def test_sigkill_at_random_moments_loses_nothing_and_never_pays_twice(tmp_path: Path) -> None:
    rng = random.Random(20261121)
    config = EmulatorConfig(
        latency_s=0.25, latency_jitter_s=0.25, fault_rate=0.2, seed=7, slow_s=1.5
    )
    out = tmp_path / "out"
    manifest = crash_manifest(tmp_path)
    with EmulatorThread(config) as server:
        args = cli(
            "run",
            manifest,
            "--out",
            out,
            "--base-url",
            server.base_url,
            "--no-progress",
            "--concurrency",
            "8",
            "--max-attempts",
            "20",
            "--timeout",
            "1",
        )
        kills, finished = 0, None
        deadline = time.monotonic() + 240
        while finished is None and time.monotonic() < deadline:
            proc = subprocess.Popen(
                args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            if kills < MIN_KILLS:
                try:
                    proc.wait(timeout=rng.uniform(0.3, 1.8))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    continue
            else:
                proc.wait(timeout=120)
            _, stderr = proc.communicate()
            assert proc.returncode == 0, stderr.decode()
            finished = proc.returncode
        requests = list(server.emulator.requests)
        bills = list(server.emulator.bills)

    assert finished == 0, "the run did not finish in time"
    assert kills >= MIN_KILLS
    assert sum(1 for r in requests if r.fault) >= 30, "faults should have been injected"

    # No job lost; every image valid and matching its sha256 in the results.
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == JOBS and set(results["status"]) == {"succeeded"}
    for row in results.itertuples():
        data = (out / str(row.image_path)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        expected = tuple(int(n) for n in str(row.size).split("x"))
        inspect_image(data, expected)
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]

    # Per job: exactly one confirmed charge, and it is the job's last attempt: nothing was
    # sent after its success was recorded (every request is preceded by its intent row).
    attempts = db_rows(out, "SELECT job_id, attempt, state FROM attempts")
    assert not [a for a in attempts if a[2] == "in_flight"]
    by_job: dict[str, list[tuple[int, str]]] = {}
    for job_id, attempt, state in attempts:
        by_job.setdefault(job_id, []).append((attempt, state))
    prompt_of = dict(zip(results["job_id"], results["prompt"], strict=True))
    sent = Counter(r.prompt for r in requests)
    billed = Counter(b.prompt for b in bills)
    # A url answer whose CDN served no image was billed: a confirmed charge (or a possible
    # one, when the runner was killed while it downloaded), never a free one.
    unfetched = Counter(r.prompt for r in requests if _unfetched(r))
    for job_id, rows in by_job.items():
        rows.sort()
        states = [state for _, state in rows]
        prompt = prompt_of[job_id]
        assert 1 <= states.count("confirmed") <= 1 + unfetched[prompt], (job_id, rows)
        assert states[-1] == "confirmed", (job_id, rows)
        assert sent[prompt] <= len(rows), job_id
        # Every charge beyond the confirmed ones is flagged possible.
        assert billed[prompt] <= states.count("confirmed") + states.count("possible"), job_id

    ledger = pd.read_csv(out / "ledger.csv")
    confirmed = round(ledger.loc[ledger["billing"] == "confirmed", "cost_usd"].sum(), 2)
    possible = round(ledger.loc[ledger["billing"] == "possible", "cost_usd"].sum(), 2)
    billed_usd = round(sum(b.cost_usd for b in bills), 2)
    assert round(0.03 * JOBS, 2) <= confirmed <= round(0.03 * (JOBS + unfetched.total()), 2)
    assert confirmed <= billed_usd <= round(confirmed + possible, 2)


def _unfetched(request: RequestRecord) -> bool:
    return request.fault == "badb64" and request.response_format == "url"
