"""A worker that claims a job whose last attempt is a possible charge (the worker that had it
died after writing its image, before recording it) adopts the image in place instead of
sending the job again (against a real PostgreSQL and moto's S3 server)."""

from __future__ import annotations

from pathlib import Path

from runner.core.sinks import LocationSink
from runner.emulator import Emulator
from runner.manifest import load_manifest
from runner.storage import open_location
from runner.store.postgres import open_pg_store
from tests.test_remote import manifest_of, run_to


async def test_a_possible_charge_with_its_image_in_place_is_adopted_without_a_request(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    manifest = manifest_of(tmp_path, jobs=3)
    out = f"s3://{s3_bucket}/dead-worker"
    await run_to(manifest, out, emulator, pg_url)
    jobs = {job.id: job for job in load_manifest(manifest)}
    location = open_location(out)
    location.delete("images/shot-2.png")  # shot-2: its worker died before writing the image
    store = open_pg_store(pg_url, out)
    try:
        store.budget(None)
        for job_id in ("shot-1", "shot-2"):
            with store.batch():
                store.retire_image(job_id, "missing", None, None)  # its success forgotten
            await store.begin_attempt(jobs[job_id])  # the dead worker's attempt, in flight
        store.settle_in_flight()  # ... now a possible charge
        sink = LocationSink(location)
        assert sink.adopt_existing(store, jobs["shot-1"])
        assert not sink.adopt_existing(store, jobs["shot-2"])  # no image: it is to be sent
        assert not sink.adopt_existing(store, jobs["shot-0"])  # no possible charge: no look
        records = store.job_records(["shot-1", "shot-2"])
        assert records["shot-1"].status == "succeeded"
        assert records["shot-1"].image_path == "images/shot-1.png"
        assert records["shot-2"].status != "succeeded"
        assert store.adoption_charge("shot-1") is None  # the possible charge confirmed
    finally:
        store.close()
