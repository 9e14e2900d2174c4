"""Planning a run in S3 while other workers of the run go on saving (moto's S3 server): the
planner's listing of images/ is as old as the plan, so an image created and recorded after it
must not be taken for gone (and made, and billed, again): the chaos test in
test_scaleout.py saw a job succeed twice that way."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runner.core.remote_plan import RemoteImages
from runner.core.sinks import object_stat
from runner.storage import open_location
from runner.store import open_store
from runner.store.base import JobRecord
from tests.conftest import make_ref


def test_an_image_saved_after_the_listing_is_intact_not_gone(
    tmp_path: Path, s3_bucket: str
) -> None:
    location = open_location(f"s3://{s3_bucket}/run")
    store = open_store(tmp_path / "state")
    try:
        images = RemoteImages(store, location, dry_run=True)  # lists images/: empty
        image = make_ref(tmp_path, "j1.png")
        saved = location.put("images/j1.png", image)  # another worker saves, then records
        stat = object_stat(saved)
        record = JobRecord(
            "j1", "h", "succeeded", "images/j1.png",
            hashlib.sha256(image.read_bytes()).hexdigest(), 0, None,
            image_size_bytes=stat.size_bytes, image_mtime_ns=stat.mtime_ns,
        )  # fmt: skip
        assert images.check(record) == (record, "intact")
        assert images.check(record._replace(image_path="images/j2.png")) is None  # gone
    finally:
        store.close()
