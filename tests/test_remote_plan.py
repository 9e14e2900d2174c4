"""Planning an object-storage run while workers may be running (against the emulator, a real
PostgreSQL and moto's S3 server): an image written after the plan's listing is not taken as
gone, and no HEAD or download happens while a planning batch's transaction holds its locks."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from PIL import Image

from runner.core.plan import make_plan
from runner.core.remote_plan import RemoteImages
from runner.emulator import Emulator
from runner.manifest import load_manifest
from runner.storage import Location, open_location
from runner.store.base import Decision, Store
from runner.store.postgres import open_pg_store
from runner.store.postgres.reviewlog import PostgresReviewLog
from tests.test_remote import manifest_of, run_to


async def test_an_image_absent_from_the_listing_is_looked_for_before_it_is_gone(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    out = f"s3://{s3_bucket}/late"
    await run_to(manifest_of(tmp_path, jobs=3), out, emulator, pg_url)
    location = open_location(out)
    late = tmp_path / "late.png"
    late.write_bytes(location.read_bytes("images/shot-1.png"))
    location.delete("images/shot-1.png")
    location.delete("images/shot-2.png")
    store = open_pg_store(pg_url, out, worker=False)
    try:
        remote = RemoteImages(store, location, dry_run=True)  # lists images/ now
        location.put("images/shot-1.png", late)  # a live worker's image, after the listing
        records = store.job_records(["shot-1", "shot-2"])
        checked = remote.check(records["shot-1"])
        assert checked is not None and checked[1] == "intact"
        assert remote.check(records["shot-2"]) is None  # truly gone: made again
    finally:
        store.close()


class WatchedStore:
    """A store that says whether a batch's transaction is open."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.in_batch = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @contextmanager
    def batch(self) -> Iterator[object]:
        with self.store.batch() as batch:
            self.in_batch = True
            try:
                yield batch
            finally:
                self.in_batch = False


class WatchedLocation:
    """A location that notes each call made while ``store`` has a batch open."""

    def __init__(self, location: Location, store: WatchedStore) -> None:
        self.location = location
        self.store = store
        self.inside: list[str] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.location, name)
        if not callable(found):
            return found

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.store.in_batch:
                self.inside.append(name)
            return cast(Callable[..., Any], found)(*args, **kwargs)

        return call


async def test_no_object_store_call_inside_a_planning_transaction(
    tmp_path: Path, emulator: Emulator, pg_url: str, s3_bucket: str
) -> None:
    """An edit (HEAD + download), an image to adopt (download) and a rejection (a name in
    rejected/) all planned, with every call to the store before or after the transactions."""
    manifest = manifest_of(tmp_path, jobs=6)
    out = f"s3://{s3_bucket}/locks"
    await run_to(manifest, out, emulator, pg_url)
    location = open_location(out)
    with Image.open(io.BytesIO(location.read_bytes("images/shot-1.png"))) as old:
        edited = tmp_path / "edited.png"
        Image.new("RGB", old.size, (1, 2, 3)).save(edited)
    location.put("images/shot-1.png", edited)
    with PostgresReviewLog(pg_url, out) as log:
        log.decide([Decision("shot-2", "rejected")], "tester")
    store = open_pg_store(pg_url, out, worker=False)
    try:
        with store.batch():
            store.retire_image("shot-3", "missing", None, None)  # its success forgotten
        watched = WatchedStore(store)
        watching = WatchedLocation(location, watched)
        plan = make_plan(
            load_manifest(manifest),
            cast(Store, watched),
            location=cast(Location, watching),
            batch_size=4,
        )
    finally:
        store.close()
    assert plan.edited == ["shot-1"] and plan.rejected == ["shot-2"] and plan.adopted == 1
    assert watching.inside == []
    assert location.info("rejected/shot-2.v1.png") is not None
