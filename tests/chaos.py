"""The scale-out acceptance harness: worker processes of one run against one emulator, one of
them killed with SIGKILL every few seconds and started again, and the books checked afterwards.

- :class:`ThreadedEmulator`: the emulator on its own event loop in a thread of the test process,
  so the test reads its books (every request with its arrival time and status, every bill)
  directly, while the workers are separate processes.
- :class:`Workers`: ``python -m runner`` processes (the planning ``run`` and ``work``-ers),
  started, killed and restarted; their output kept in files, to show when a test fails.
- :func:`max_over_limit`: how far the requests the emulator accepted ever went past its token
  bucket (the rate times the window plus the burst), over every window starting at a request.
- :func:`run_with_kills`: a run planned by ``run`` and worked by ``work``-ers, one of them
  killed every few seconds; :func:`killing_actors` does the same to a Ray fleet's actors.
- :func:`check_every_job_once`: the books of a finished run against the emulator's and the
  output location's, with the figures a test prints (:class:`Figures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import psycopg
import pytest
import yaml

from runner.emulator import Emulator, EmulatorConfig
from runner.emulator.faults import DEFAULT_FAULT_MIX
from runner.storage import open_location
from runner.storage.base import location_url
from runner.store.postgres.connect import run_schema
from tests.conftest import TEST_KEY

REPO = Path(__file__).resolve().parent.parent
LIMIT_RPM, BURST = 600, 10  # the emulator's unannounced limit: its token bucket


class ThreadedEmulator:
    """An emulator served from a thread; ``url`` once started. Stop with :meth:`stop`."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.emulator = Emulator(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.emulator.start("127.0.0.1", 0), self._loop)
        future.result(timeout=30)
        self.url = self.emulator.base_url
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def accepted_times(self) -> list[float]:
        """When each request the rate limit let through arrived (``time.time()``), sorted."""
        return sorted(r.received_at for r in list(self.emulator.requests) if r.status != 429)

    @property
    def billed_usd(self) -> float:
        return self.emulator.billed_usd


def chaos_emulator(fault_kinds: tuple[str, ...] = DEFAULT_FAULT_MIX) -> ThreadedEmulator:
    """Started: the unannounced limit, and 10% of requests answered with a fault of
    ``fault_kinds``."""
    config = EmulatorConfig(
        rate_limit_rpm=LIMIT_RPM,
        rate_limit_burst=BURST,
        fault_rate=0.1,
        fault_kinds=fault_kinds,
        seed=5,
    )
    emulator = ThreadedEmulator(config)
    emulator.start()
    return emulator


def max_over_limit(times: Sequence[float], rate_per_min: float, burst: int) -> float:
    """The most requests any window ``[t_i, t_j]`` of accepted ``times`` held beyond what a token
    bucket of ``burst`` refilled at ``rate_per_min`` allows (``rate * (t_j - t_i) + burst``);
    <= 0 when the limit always held. A client that keeps under the limit scores <= 0 on the
    provider's own bucket; one request of clock jitter is allowed for by the caller."""
    rate = rate_per_min / 60
    worst = -float(burst)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            allowed = rate * (times[j] - start) + burst
            worst = max(worst, (j - i + 1) - allowed)
    return worst


@dataclass
class Workers:
    """Worker processes of one run; each slot's command is started again after a kill."""

    commands: list[list[str]]
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    kills: int = 0
    starts: int = 0
    codes: list[int | None] = field(default_factory=list)  # each slot's exit code, at the end

    def start_all(self) -> None:
        self.processes = [None] * len(self.commands)
        for slot in range(len(self.commands)):
            self.start(slot)

    def start(self, slot: int) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.logs / f"worker{slot}-{self.starts}.log", "wb")  # noqa: SIM115
        self.processes[slot] = subprocess.Popen(
            [sys.executable, "-m", "runner", *self.commands[slot]],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def alive(self) -> list[int]:
        return [s for s, p in enumerate(self.processes) if p is not None and p.poll() is None]

    def kill_one(self, rng: random.Random) -> int | None:
        """SIGKILL a random live worker and start its command again; its slot, or None."""
        live = self.alive()
        if not live:
            return None
        slot = rng.choice(live)
        process = self.processes[slot]
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self.kills += 1
        self.start(slot)
        return slot

    def wait(self, timeout_s: float) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for process in self.processes:
            if process is None:
                codes.append(None)
                continue
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def output(self) -> str:
        """Every worker's output, for a failing test's message (the last 3,000 characters of
        each)."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def write_jobs(folder: Path, count: int) -> Path:
    manifest = folder / "jobs.yaml"
    jobs = [{"id": f"j{i:05d}", "prompt": f"a lighthouse, study {i}"} for i in range(count)]
    doc = {"defaults": {"size": "1280x544"}, "jobs": jobs}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest


def run_rows(pg_url: str, out: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows ``sql`` reads from the run's own schema (the run is named by its ``out``)."""
    with psycopg.connect(pg_url) as conn:
        conn.execute(f'SET search_path TO "{run_schema(location_url(out))}"')
        return conn.execute(sql).fetchall()


PLANNED = "SELECT count(*) FROM jobs WHERE queued OR status IN ('succeeded', 'failed')"
GOING = (
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE queued) "
    "AND NOT EXISTS (SELECT 1 FROM control WHERE stop_reason IS NOT NULL)"
)


def run_going(pg_url: str, out: str) -> bool:
    """Whether the run still has work queued and was not stopped."""
    going: bool = run_rows(pg_url, out, GOING)[0][0]
    return going


def wait_for_plan(pg_url: str, out: str, jobs: int, timeout_s: float = 60) -> None:
    """Until the planning run queued all ``jobs`` (a ``work``-er started before finds no plan)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):  # the run's schema may not be there yet
            if run_rows(pg_url, out, PLANNED)[0][0] >= jobs:
                return
        time.sleep(0.2)
    raise AssertionError(f"the planning run did not queue {jobs} jobs in {timeout_s} s")


def status(out: str, state: str, env: dict[str, str]) -> dict[str, Any]:
    shown = subprocess.run(
        [sys.executable, "-m", "runner", "status", out, "--state", state, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, Any] = json.loads(shown.stdout)
    return found


# The workers' lease: short, so that a killed worker's claims come back within seconds, but
# long enough for a worker starved of CPU to renew it (at 3 s, on 2 cores under a load of 24,
# the Ray driver's lease once expired and it stopped, as a worker that lost its lease must).
CHAOS_LEASE_S = "6"


def chaos_env() -> dict[str, str]:
    """The workers' environment: the test's (with moto's ``AWS_*`` when its server runs), the
    key, and the short :data:`CHAOS_LEASE_S`."""
    return {**os.environ, "IMAGE_RUNNER_API_KEY": TEST_KEY, "RUNNER_LEASE_S": CHAOS_LEASE_S}


def run_with_kills(
    folder: Path,
    pg_url: str,
    emulator_url: str,
    out: str,
    *,
    jobs: int,
    workers: int,
    extra: Sequence[str] = (),
    kill_every_s: tuple[float, float] = (3, 6),
    timeout_s: float,
) -> Workers:
    """Plan ``jobs`` into ``out`` with ``run`` (also a worker; ``extra`` are its options), add
    ``workers - 1`` ``work``-ers once the queue is there, and kill one at random every few
    seconds (starting it again) while the run has work queued and no stop, then wait until
    every process ended by itself.

    The kills end with the queue: once it is empty the ``work``-ers end, and the planning
    ``run`` alone writes the books (reading every image back for the report's thumbnails),
    which takes longer than the pause between two kills: killing it again and again would
    never let the run end."""
    manifest = write_jobs(folder, jobs)
    common = ["--state", pg_url, "--out", out, "--base-url", emulator_url]
    common += ["--concurrency", "8", "--timeout", "20", "--no-progress"]
    pool = Workers(
        [["run", str(manifest), *common, *extra]] + [["work", *common]] * (workers - 1),
        chaos_env(),
        folder / "logs",
    )
    pool.processes = [None] * workers
    pool.start(0)
    wait_for_plan(pg_url, out, jobs)
    for slot in range(1, workers):
        pool.start(slot)
    rng = random.Random(12)
    deadline = time.monotonic() + timeout_s
    try:
        while pool.alive() and time.monotonic() < deadline:
            time.sleep(rng.uniform(*kill_every_s))
            if not run_going(pg_url, out):
                break
            pool.kill_one(rng)
        pool.codes = pool.wait(max(1.0, deadline - time.monotonic()))
    finally:
        pool.kill_all()
    assert None not in pool.codes, f"workers still running after {timeout_s} s\n{pool.output()}"
    return pool


@contextlib.contextmanager
def killing_actors(
    pg_url: str, out: str, driver_pid: int, kill_every_s: tuple[float, float] = (3, 6)
) -> Iterator[list[int]]:
    """While the block runs, a thread SIGKILLs one live worker of the run every few seconds
    that is not the driver (a Ray actor's process: the ``workers`` rows hold their pids); the
    list of pids killed is yielded, filled as it goes."""
    killed: list[int] = []
    done = threading.Event()
    rng = random.Random(12)

    def kill() -> None:
        while not done.wait(rng.uniform(*kill_every_s)):
            with contextlib.suppress(psycopg.Error):  # not planned yet
                rows = run_rows(pg_url, out, LIVE_WORKERS)
                pids = sorted({pid for (pid,) in rows if pid != driver_pid})
                if pids:
                    pid = rng.choice(pids)
                    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


LIVE_WORKERS = "SELECT pid FROM workers WHERE finished_at IS NULL AND lease_expires_at > now()"


@dataclass(frozen=True)
class Figures:
    """What a chaos run's books came to, printed by each test. ``unusable`` counts the answers
    billed (confirmed) that gave no image: a malformed or undecodable 200 (the emulator's
    billed faults); the confirmed spend is $0.03 for each of those and each image not adopted."""

    kills: int
    billed_usd: float
    confirmed_usd: float
    possible_usd: float
    share_429: float
    max_over_limit: float
    images: int
    adopted: int  # of ``images``: found in place after their worker died, paid as possible
    unusable: int

    def __str__(self) -> str:
        return (
            f"kills {self.kills}, billed ${self.billed_usd:.2f}, confirmed "
            f"${self.confirmed_usd:.2f} ({self.images} images, {self.adopted} of them "
            f"adopted, + {self.unusable} unusable answers), possible "
            f"${self.possible_usd:.2f}, 429s {self.share_429:.1%} of requests, max over "
            f"limit {self.max_over_limit:.1f}"
        )


SAVED = "SELECT job_id FROM attempts WHERE state = 'confirmed' AND error IS NULL"
ADOPTED_UNCONFIRMED = (
    "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND job_id NOT IN "
    "(SELECT job_id FROM attempts WHERE state = 'confirmed' AND error IS NULL)"
)
UNUSABLE = "SELECT count(*) FROM attempts WHERE state = 'confirmed' AND error IS NOT NULL"


def books(emulator: ThreadedEmulator, out: str, pg_url: str, kills: int) -> Figures:
    """The run's spend (its ``status``) beside the emulator's bills and rate, checked against
    each other: every image (an attempt confirmed without error) is one object under images/
    whose bytes hash to the sha256 its success recorded, and no other object is there; the
    confirmed spend is $0.03 an image or unusable answer; billed within [confirmed,
    confirmed + possible]; the rate limit kept."""
    location = open_location(out)
    stored = {
        info.key: hashlib.sha256(location.read_bytes(info.key)).hexdigest()
        for info in location.list("images/")
    }
    recorded = dict(
        run_rows(pg_url, out, "SELECT image_path, sha256 FROM jobs WHERE status = 'succeeded'")
    )
    assert stored == recorded
    saved = sorted(job_id for (job_id,) in run_rows(pg_url, out, SAVED))
    assert saved == sorted(set(saved)), "a job succeeded twice"
    # The other images were adopted: a worker died between the create and the commit, its
    # attempt a possible charge, and a plan found the object and kept it, with no request.
    adopted = sorted(stored.keys() - {f"images/{job_id}.png" for job_id in saved})
    assert set(saved) <= {PurePosixPath(key).stem for key in stored}
    assert run_rows(pg_url, out, ADOPTED_UNCONFIRMED)[0][0] == len(adopted)
    spend = status(out, pg_url, chaos_env())["spend_usd"]
    requests = list(emulator.emulator.requests)
    refused = sum(1 for r in requests if r.status == 429)
    figures = Figures(
        kills,
        emulator.billed_usd,
        spend["confirmed"],
        spend["possible"],
        refused / max(1, len(requests)),
        max_over_limit(emulator.accepted_times(), LIMIT_RPM, BURST),
        len(stored),
        len(adopted),
        run_rows(pg_url, out, UNUSABLE)[0][0],
    )
    confirmed_images = figures.images - figures.adopted
    assert figures.confirmed_usd == pytest.approx(0.03 * (confirmed_images + figures.unusable))
    assert figures.confirmed_usd - 1e-9 <= figures.billed_usd, figures
    assert figures.billed_usd <= figures.confirmed_usd + figures.possible_usd + 1e-9, figures
    assert figures.max_over_limit <= 1, f"the emulator accepted requests past its limit: {figures}"
    return figures


def check_every_job_once(
    emulator: ThreadedEmulator, out: str, pg_url: str, jobs: int, kills: int
) -> Figures:
    """Every job succeeded once, as the results (read from ``out``) say, with the sha256 of the
    object under images/ that is its image, and the :func:`books` hold."""
    location = open_location(out)
    results = pd.read_parquet(io.BytesIO(location.read_bytes("results.parquet")))
    assert len(results) == jobs
    assert (results["status"] == "succeeded").all(), results["status"].value_counts()
    figures = books(emulator, out, pg_url, kills)
    assert figures.images == jobs
    written = dict(zip(results["image_path"], results["sha256"], strict=True))
    recorded = dict(run_rows(pg_url, out, "SELECT image_path, sha256 FROM jobs"))
    assert written == recorded
    return figures
