"""Which stops a worker tells the other workers of its run: only those final for the run (the
key refused, the budget, the provider down, a Retry-After too long), never its own trouble
(its disk refusing images, its connection): one bad worker must not stop a fleet."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from runner.core.lifecycle import Run
from runner.core.pool import Pool
from runner.core.retry import RetryConfig
from runner.emulator import Emulator
from runner.errors import ImageWriteError
from runner.http.client import ClientConfig, ImagesClient
from runner.jobs import Job
from runner.manifest import load_manifest
from runner.store import SavedImage
from runner.store.postgres import open_pg_store
from runner.store.sqlite import SqliteStore
from tests.conftest import TEST_KEY, MakeEmulator, make_job, options, write_manifest


class FullDisk:
    """A sink on a disk that is full: every image that comes back is refused."""

    def __init__(self, images: Path) -> None:
        self.where = str(images)

    def save(self, job: Job, tmp: Path) -> SavedImage:
        tmp.unlink(missing_ok=True)
        raise ImageWriteError("No space left on device")


async def test_a_refused_key_is_final_for_the_run_a_full_disk_is_not(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    refusing = await make_emulator(api_key="sk-another-key-000000")
    serving = await make_emulator()
    jobs = [make_job(f"d{n}", f"a dune {n}") for n in range(3)]
    results = []
    for name, emulator in (("refused", refusing), ("disk", serving)):
        out = tmp_path / name
        with SqliteStore.open(out) as store:
            store.plan_jobs(jobs)
            config = ClientConfig(base_url=emulator.base_url, api_key=TEST_KEY)
            async with ImagesClient(config) as client:
                pool = Pool(
                    client,
                    store,
                    out / "images",
                    retry=RetryConfig(backoff_initial_s=0.001),
                    sink=FullDisk(out / "images") if name == "disk" else None,
                )
                results.append(await pool.run(jobs))
    refused, disk = results
    assert refused.stop_reason and refused.for_run
    assert disk.stop_reason and "cannot write images" in disk.stop_reason and not disk.for_run


async def test_a_refused_key_stops_every_worker_of_the_run(
    tmp_path: Path, pg_url: str, make_emulator: MakeEmulator
) -> None:
    emulator: Emulator = await make_emulator(api_key="sk-another-key-000000")
    manifest = write_manifest(tmp_path, [{"id": "k1", "prompt": "a kite", "size": "1280x544"}])
    out = tmp_path / "out"
    shared = dataclasses.replace(options(out, emulator.base_url), state_url=pg_url)
    run = Run(load_manifest(manifest), shared)
    report = await run.execute()
    assert report.stop_reason and "401" in report.stop_reason
    with open_pg_store(pg_url, out, worker=False) as other:
        assert other.stop_requested() == report.stop_reason
