"""A local output folder shared by the workers of a PostgreSQL run (tests/services.py's
cluster): an image is created only if absent (a second writer adopts the first one's image,
never overwrites it), a possible charge's image in place is adopted without a request, a
re-plan leaves the temp files live workers may be writing, and a ``work``-er started before
the folder exists makes it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from runner.core.lifecycle import Run
from runner.core.shared import plan_and_queue
from runner.core.sinks import LocationSink
from runner.emulator import Emulator, EmulatorConfig
from runner.errors import ClaimLost
from runner.images.files import temp_path_for
from runner.jobs import Job
from runner.manifest import load_manifest
from runner.storage import LocalLocation
from runner.store import Outcome
from runner.store.postgres import PostgresStore, open_pg_store
from tests.chaos import REPO, ThreadedEmulator, chaos_env
from tests.conftest import options, planned_jobs, write_manifest
from tests.test_pg_fencing import expire

PRICE = 30_000


@pytest.fixture(autouse=True)
def short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_LEASE_S", "3")


def answer(images: Path, job: Job, colour: str) -> Path:
    """An answer streamed into ``images/`` as the client leaves it, for ``job``."""
    images.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(images / f"{job.id}.part")
    Image.new("RGB", (1280, 544), colour).save(tmp, format="PNG")
    return tmp


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("first", ["late", "stalled"])
async def test_two_workers_racing_on_a_job_leave_one_image_and_the_state_agrees(
    open_worker: Callable[[], PostgresStore], tmp_path: Path, first: str
) -> None:
    """A worker stalls past its lease while its job's answer comes back; another claims the
    job and sends it again. Whichever writes the image first, the other adopts that image:
    the file is never overwritten, and the sha256 recorded is the file's."""
    stalled, late = open_worker(), open_worker()
    [job] = planned_jobs(stalled, 1)
    claims = stalled.claim([])
    assert (await anext(claims)).id == job.id
    sent = {"stalled": await stalled.begin_attempt(job)}
    expire(stalled)
    late.settle_in_flight()  # the stalled worker's attempt: a possible charge, its claim free
    assert [j.id async for j in late.claim([])] == [job.id]
    sent["late"] = await late.begin_attempt(job)
    images = tmp_path / "out" / "images"
    workers = {"stalled": stalled, "late": late}
    colours = {"stalled": "red", "late": "teal"}
    order = [first, "late" if first == "stalled" else "stalled"]
    saved = {}
    for name in order:
        sink = LocationSink(LocalLocation(tmp_path / "out"))
        saved[name] = sink.save(job, answer(images, job, colours[name]))
        if name == order[0]:
            written = sha256_of(images / f"{job.id}.png")
        with contextlib.suppress(ClaimLost):  # the stalled worker lost its claim
            await workers[name].record_success(
                job.id, sent[name], Outcome("confirmed", PRICE), saved[name]
            )
    await claims.aclose()
    assert saved[order[1]].sha256 == saved[order[0]].sha256 == written  # adopted
    assert sorted(p.name for p in images.iterdir()) == [f"{job.id}.png"]  # no temp file left
    assert sha256_of(images / f"{job.id}.png") == written
    with Image.open(images / f"{job.id}.png") as image:
        assert image.getpixel((0, 0)) == ((255, 0, 0) if first == "stalled" else (0, 128, 128))
    record = late.job_records([job.id])[job.id]
    assert (record.status, record.sha256, record.image_path) == (
        "succeeded",
        written,
        f"images/{job.id}.png",
    )
    assert record.image_stat is not None
    assert record.image_stat.mtime_ns == (images / f"{job.id}.png").stat().st_mtime_ns


async def test_a_worker_adopts_an_image_it_finds_in_place_instead_of_overwriting_it(
    tmp_path: Path, pg_url: str, emulator: Emulator
) -> None:
    """``work`` on a shared local folder: a queued job's image appeared after the plan (a
    worker wrote it, then lost its lease before recording it); the answer this worker gets is
    not written over it."""
    out = tmp_path / "out"
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as planner:
        [job] = planned_jobs(planner, 1)
    image = out / "images" / f"{job.id}.png"
    answer(out / "images", job, "red").rename(image)
    before = sha256_of(image)
    shared = dataclasses.replace(options(out, emulator.base_url), state_url=pg_url, join=True)
    report = await Run([], shared).execute()
    assert report.pool is not None and report.pool.progress.succeeded == 1
    assert len(emulator.requests) == 1  # sent (no possible charge): its answer is dropped
    assert sha256_of(image) == before
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as store:
        assert store.job_records([job.id])[job.id].sha256 == before
    assert temp_files(out / "images") == []


async def test_a_possible_charge_with_its_image_in_place_is_adopted_without_a_request(
    tmp_path: Path, pg_url: str, emulator: Emulator, open_worker: Callable[[], PostgresStore]
) -> None:
    out = tmp_path / "out"
    dead = open_worker()
    [job] = planned_jobs(dead, 1)
    claims = dead.claim([])
    await anext(claims)
    await dead.begin_attempt(job)
    answer(out / "images", job, "red").rename(out / "images" / f"{job.id}.png")
    await claims.aclose()
    dead.close()  # it died before recording the image: its attempt is still in flight
    shared = dataclasses.replace(options(out, emulator.base_url), state_url=pg_url, join=True)
    report = await Run([], shared).execute()
    assert report.pool is not None and report.pool.progress.succeeded == 1
    assert len(emulator.requests) == 0
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as store:
        record = store.job_records([job.id])[job.id]
        assert record.sha256 == sha256_of(out / "images" / f"{job.id}.png")
        assert store.adoption_charge(job.id) is None  # the possible charge confirmed


def test_a_re_plan_leaves_temp_files_younger_than_the_lease_margin(
    tmp_path: Path, pg_url: str
) -> None:
    """Planning a shared local folder again while workers run: an answer being streamed
    (modified seconds ago) is a live worker's and stays; one untouched for minutes is a dead
    worker's and goes. The lease is 3 s here: the margin is its floor, a minute."""
    manifest = write_manifest(tmp_path, [{"id": "t1", "prompt": "a tent", "size": "1280x544"}])
    out = tmp_path / "out"
    images = out / "images"
    images.mkdir(parents=True)
    live = temp_path_for(images / "t1.part")
    dead = temp_path_for(images / "t2.part")
    old_books = temp_path_for(out / "results.parquet")
    for path in (live, dead, old_books):
        path.write_bytes(b"part of an answer")
    ten_s_ago, two_min_ago = time.time() - 10, time.time() - 120
    os.utime(live, (ten_s_ago, ten_s_ago))
    for path in (dead, old_books):
        os.utime(path, (two_min_ago, two_min_ago))
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)) as store:
        plan = plan_and_queue(
            load_manifest(manifest),
            store,
            retry_failed=False,
            only=frozenset(),
            redo_edited=False,
            dry_run=False,
            location=None,
            shared=True,
        )
    assert plan.temp_files_removed == 2
    assert temp_files(images) == [live.name]
    assert temp_files(out) == []


def test_a_worker_started_before_its_planner_and_the_folder_works(
    tmp_path: Path, pg_url: str
) -> None:
    """``work`` and ``run`` started together (docker compose, a Kubernetes Job): the worker
    finds no folder yet, makes it, waits for the plan, and both end well."""
    manifest = write_manifest(
        tmp_path, [{"id": f"b{i}", "prompt": f"a boat {i}", "size": "1280x544"} for i in range(6)]
    )
    out = tmp_path / "out"
    with contextlib.closing(open_pg_store(pg_url, out, worker=False)):
        pass  # the run exists (a planning run opened it), its folder not yet
    assert not out.exists()
    served = ThreadedEmulator(EmulatorConfig())
    served.start()
    common = ["--state", pg_url, "--out", str(out), "--base-url", served.url, "--no-progress"]
    command = [sys.executable, "-m", "runner"]
    try:
        worker = subprocess.Popen(
            [*command, "work", *common], cwd=REPO, env=chaos_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not (out / "images").is_dir() and worker.poll() is None:
                assert time.monotonic() < deadline, "the worker made no images/ folder"
                time.sleep(0.1)  # the worker makes it: the planning run has not started
            planned = subprocess.run(
                [*command, "run", str(manifest), *common],
                cwd=REPO, env=chaos_env(), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            worked, _ = worker.communicate(timeout=120)
        finally:
            worker.kill()
    finally:
        served.stop()
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert worker.returncode == 0, worked
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"b{i}.png" for i in range(6)]
