"""Planning a run whose images are in an object store: what :mod:`runner.core.plan` does with
the files of ``images/``, done with one listing, HEADs and downloads instead.

The planner asks :class:`RemoteImages` what it asks the disk on one machine, with the same
answers and the same records:

- ``images/`` is listed once (pages of 1,000 keys) when planning starts; there is no temp file
  to sweep (an object is created whole or not at all) and no folder to make;
- a finished image is checked against that listing (one missing from it, against a HEAD: another
  worker may have saved it since the listing): an object gone is made again; one whose
  size or modification time (whole seconds, as recorded when it was written) differs from the
  record is checked by the sha256 its store reports (a HEAD), and downloaded and hashed only
  when the store reports none; a different image is an edit, recorded as locally, one that does
  not decode is ``unreadable``;
- an object under ``images/`` with no success recorded (a worker died between the create and
  the commit) is downloaded, decoded, hashed and adopted, never requested again;
- earlier versions go to ``rejected/``, ``edited/``, ``replaced/`` as a copy and a delete, with
  the order of :mod:`runner.core.versions`: recorded first, moved once the batch committed,
  then recorded as moved; a move a crash cut off is finished by the next plan.

The listing is held as key -> (size, modification time): about 100 bytes a key, 100 MB for a
million images; a download holds one image at a time.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Literal

from runner.core.sinks import object_stat
from runner.images.verify import ImageInvalid, inspect_image
from runner.jobs import Job
from runner.provider import EXTENSIONS
from runner.storage import Location, ObjectInfo
from runner.store.base import JobRecord, SavedImage, Store

# What a plan finds of a finished image, besides its being gone.
Found = Literal["intact", "edited", "unreadable"]

IMAGES_PREFIX = "images/"


class RemoteImages:
    """The ``images/`` of ``location`` as one plan sees and changes them (``dry_run``: sees
    only)."""

    def __init__(self, store: Store, location: Location, *, dry_run: bool) -> None:
        self.store = store
        self.location = location
        self.dry_run = dry_run
        self.rehashed = 0  # images whose listing differed from the record, checked by sha256
        self.listed: dict[str, ObjectInfo] = {
            found.key: found for found in location.list(IMAGES_PREFIX)
        }
        self.sources: set[str] = set()  # keys moved aside, or to be, by this plan
        # (source key, target key, the (job id, version) recorded as going there, if one is)
        self._pending: list[tuple[str, str, tuple[str, int] | None]] = []
        self._targets: set[str] = set()

    def unrecorded(self, batch_size: int) -> dict[str, list[str]]:
        """Job id -> names of the image objects no recorded success accounts for."""
        found: dict[str, list[str]] = {}
        names = [
            key.removeprefix(IMAGES_PREFIX)
            for key in self.listed
            if "/" not in key.removeprefix(IMAGES_PREFIX)
        ]
        for start in range(0, len(names), batch_size):
            batch = [n for n in names[start : start + batch_size] if _job_id(n) is not None]
            recorded = self.store.finished_images([str(_job_id(n)) for n in batch])
            for name in batch:
                if IMAGES_PREFIX + name not in recorded:
                    found.setdefault(str(_job_id(name)), []).append(name)
        return found

    def check(self, record: JobRecord) -> tuple[JobRecord, Found] | None:
        """As :meth:`runner.core.plan._Planner._check`, on the object at the record's key."""
        key = record.image_path or ""
        if key in self.sources:
            return None
        listed = self.listed.get(key)
        if listed is None:
            # The listing is as old as this plan, and other workers of the run go on saving
            # meanwhile: an image created and recorded since is only missing from the
            # listing. A HEAD says whether it is gone (one per miss, not per image).
            listed = self.location.info(key)
            if listed is None:
                return None
        stat = object_stat(listed)
        if stat == record.image_stat:
            return record, "intact"
        self.rehashed += 1
        head = self.location.info(key)
        if head is None:
            return None
        data = None
        if head.checksum != f"sha256:{record.sha256}":
            data = self.location.read_bytes(key)
        if data is None or hashlib.sha256(data).hexdigest() == record.sha256:
            if not self.dry_run:
                self.store.record_image_stat(record.job_id, stat)
            return record, "intact"
        sha256, size = hashlib.sha256(data).hexdigest(), _pixel_size(data)
        if size is None:
            return record._replace(sha256=sha256), "unreadable"
        if not self.dry_run:
            self.store.record_edit(record.job_id, sha256, stat, size)
        edited = record._replace(
            version=record.version + 1,
            review="unreviewed",
            edited_at="found by this plan",
            sha256=sha256,
        )
        return edited, "edited"

    def adopt(self, job: Job, names: list[str]) -> bool | None:
        """Adopt the first object of ``names`` that is a good image of ``job``: True when
        adopted (a dry run: would be), False when none is (a bad one is deleted), None when
        none is left to look at."""
        keys = [IMAGES_PREFIX + n for n in names if IMAGES_PREFIX + n not in self.sources]
        if not keys:
            return None
        key = min(keys, key=lambda k: _EXTENSION_RANK.get(k.rpartition(".")[2], 99))
        data = self.location.read_bytes(key)
        try:
            info = inspect_image(data, job.expected_size)
        except ImageInvalid:
            if not self.dry_run:
                self.location.delete(key)  # not a finished image of this job: made again
            return False
        if not self.dry_run:
            sha256 = hashlib.sha256(data).hexdigest()
            stat = object_stat(self.listed[key])
            self.store.adopt(job.id, SavedImage(key, info.width, info.height, sha256, stat))
        return True

    def stray(self, job_id: str) -> str | None:
        """The key of an image object of ``job_id`` in ``images/``, if there is one."""
        for ext in EXTENSIONS.values():
            key = f"{IMAGES_PREFIX}{job_id}.{ext}"
            if key in self.listed and key not in self.sources:
                return key
        return None

    def target(self, source: str, aside: str, job_id: str, version: int) -> str:
        """The key ``source`` (version ``version`` of ``job_id``) goes to in ``aside``: one no
        object has, nor one promised to another of this plan."""
        stem, ext = f"{aside}/{job_id}.v{version}", PurePosixPath(source).suffix
        target, n = f"{stem}{ext}", 1
        while target in self._targets or self.location.info(target) is not None:
            target, n = f"{stem}.{n}{ext}", n + 1
        return target

    def add(self, source: str, target: str, version: tuple[str, int] | None = None) -> None:
        self._pending.append((source, target, version))
        self._targets.add(target)
        self.sources.add(source)

    def discard(self) -> None:
        self._pending.clear()
        self._targets.clear()

    def finish(self) -> None:
        """Move the objects of the batch that just committed (copy, then delete), then record
        their versions as moved; a dry run moves nothing."""
        pending, self._pending = self._pending, []
        self._targets.clear()
        if self.dry_run or not pending:
            return
        for source, target, _ in pending:
            self._move(source, target)
        versions = [v for _, _, v in pending if v is not None]
        if versions:
            self.store.mark_moved(versions)

    def finish_interrupted(self) -> None:
        """As :meth:`runner.core.versions.Moves.finish_interrupted`: each earlier version
        recorded as not moved whose object is still in ``images/`` with its sha256 goes where
        the version is recorded; every such move is then recorded as done."""
        moved: list[tuple[str, str]] = []
        done: list[tuple[str, int]] = []
        for kept in self.store.unmoved_versions():
            source = f"{IMAGES_PREFIX}{kept.job_id}{PurePosixPath(kept.image_path).suffix}"
            if source in self.listed and self.location.info(kept.image_path) is None:
                data = self.location.read_bytes(source)
                if hashlib.sha256(data).hexdigest() == kept.sha256:
                    self.sources.add(source)
                    moved.append((source, kept.image_path))
            done.append((kept.job_id, kept.version))
        if self.dry_run or not done:
            return
        for source, target in moved:
            self._move(source, target)
        self.store.mark_moved(done)

    def _move(self, source: str, target: str) -> None:
        if source not in self.listed:  # gone meanwhile: nothing left to keep
            return
        self.location.copy(source, target)
        self.location.delete(source)
        del self.listed[source]


_EXTENSION_RANK = {ext: rank for rank, ext in enumerate(EXTENSIONS.values())}


def _job_id(name: str) -> str | None:
    """The job id of an image object's name (``<job id>.<ext>``), else None."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext in _EXTENSION_RANK else None


def _pixel_size(data: bytes) -> tuple[int, int] | None:
    try:
        info = inspect_image(data)
    except ImageInvalid:
        return None
    return info.width, info.height
