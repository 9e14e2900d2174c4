"""Planning a run whose images are in an object store: what :mod:`runner.core.plan` does with
the files of ``images/``, done with listings, HEADs and downloads instead.

The planner asks :class:`RemoteImages` what it asks the disk on one machine, and both judge
what they find alike (:mod:`runner.core.finding`):

- ``images/`` is listed once (pages of 1,000 keys) when planning starts, and ``rejected/``,
  ``edited/``, ``replaced/`` too (the names earlier versions may not take); there is no temp
  file to sweep (an object is created whole or not at all) and no folder to make;
- a finished image is checked against that listing. One whose size or modification time
  (whole seconds, as recorded when it was written) differs from the record is checked by the
  sha256 its store reports (a HEAD), and downloaded and hashed only when the store reports
  none. One absent from the listing is looked for by a HEAD before it is called gone: workers
  may be running while a plan runs, and an image a worker wrote after the listing was read
  must not be made (and paid for) again;
- an object under ``images/`` with no success recorded (a worker died between the create and
  the commit) is downloaded, decoded, hashed and adopted, never requested again;
- earlier versions go to ``rejected/``, ``edited/``, ``replaced/`` as a copy and a delete, with
  the order of :mod:`runner.core.versions`: recorded first, moved once the batch committed,
  then recorded as moved; a move a crash cut off is finished by the next plan.

**No network inside a transaction.** A planning batch's transaction holds row locks that live
workers wait on, so every HEAD and download of a batch is done by :meth:`RemoteImages.prepare`
before it opens, and what was found is kept for the batch; objects that are not images of
their job are deleted after it committed. Only a record that changed between the two (a
worker's success landing meanwhile) is looked at inside.

The listing of ``images/`` is held as name -> (size, modification time in seconds), for the
names of images only: about 230 bytes a key (227 measured with tracemalloc for 15-character
names), 2.3 GB for ten million images; a download holds one image at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import PurePosixPath

from runner.core.finding import EXTENSION_RANK, Found, adoptable, image_job_id, judge, pixel_size
from runner.core.sinks import NS_PER_S, object_stat
from runner.core.versions import EDITED_DIR, REJECTED_DIR, REPLACED_DIR, aside_names
from runner.jobs import Job
from runner.storage import Location
from runner.store.base import ImageStat, JobRecord, SavedImage, Store

IMAGES_PREFIX = "images/"

# What looking at a finished image found: its stat, sha256 and pixel size (None when not
# needed or it does not decode); None when it is gone.
Looked = tuple[ImageStat, str, tuple[int, int] | None] | None


class RemoteImages:
    """The ``images/`` of ``location`` as one plan sees and changes them (``dry_run``: sees
    only)."""

    def __init__(self, store: Store, location: Location, *, dry_run: bool) -> None:
        self.store = store
        self.location = location
        self.dry_run = dry_run
        self.rehashed = 0  # images whose listing differed from the record, checked by sha256
        # image name in images/ (<job id>.<ext>) -> (size in bytes, modification time in s)
        self.listed: dict[str, tuple[int, int]] = {}
        for found in location.list(IMAGES_PREFIX):
            name = found.key.removeprefix(IMAGES_PREFIX)
            if "/" not in name and image_job_id(name) is not None:
                self.listed[name] = (found.size_bytes, int(found.mtime_s or 0))
        self.aside = {  # keys of earlier versions' objects
            found.key
            for folder in (REJECTED_DIR, EDITED_DIR, REPLACED_DIR)
            for found in location.list(f"{folder}/")
        }
        self.sources: set[str] = set()  # keys moved aside, or to be, by this plan
        # (source key, target key, the (job id, version) recorded as going there, if one is)
        self._pending: list[tuple[str, str, tuple[str, int] | None]] = []
        self._targets: set[str] = set()
        self._deletes: list[str] = []  # objects no image of their job, once the batch commits
        # What prepare() found for this batch: (key, recorded sha256) -> looked; key -> image
        self._looked: dict[tuple[str, str], Looked] = {}
        self._examined: dict[str, SavedImage | None] = {}

    def unrecorded(self, batch_size: int) -> dict[str, list[str]]:
        """Job id -> names of the image objects no recorded success accounts for."""
        found: dict[str, list[str]] = {}
        names = list(self.listed)
        for start in range(0, len(names), batch_size):
            batch = names[start : start + batch_size]
            recorded = self.store.finished_images([str(image_job_id(n)) for n in batch])
            for name in batch:
                if IMAGES_PREFIX + name not in recorded:
                    found.setdefault(str(image_job_id(name)), []).append(name)
        return found

    def prepare(self, jobs: Sequence[Job], unrecorded: dict[str, list[str]]) -> None:
        """Do the HEADs and downloads the plan of ``jobs`` needs, before its transaction: the
        images of their successes, and the objects to adopt among ``unrecorded``."""
        records = self.store.job_records([job.id for job in jobs])
        for record in records.values():
            if record.status == "succeeded" and record.image_path:
                self._look(record)
        for job in jobs:
            key = self._candidate(unrecorded.get(job.id, []))
            if key is not None:
                self._examine(job, key)

    def check(self, record: JobRecord) -> tuple[JobRecord, Found] | None:
        """As :meth:`runner.core.plan._Planner._check`, on the object at the record's key."""
        if (record.image_path or "") in self.sources:
            return None
        looked = self._look(record)
        if looked is None:
            return None
        if looked[0] == record.image_stat:
            return record, "intact"
        self.rehashed += 1
        return judge(self.store, record, looked, dry_run=self.dry_run)

    def adopt(self, job: Job, names: list[str]) -> bool | None:
        """Adopt the first object of ``names`` that is a good image of ``job``: True when
        adopted (a dry run: would be), False when none is (a bad one is deleted once the batch
        committed), None when none is left to look at."""
        key = self._candidate(names)
        if key is None:
            return None
        image = self._examine(job, key)
        if image is None:
            if not self.dry_run:
                self._deletes.append(key)  # not a finished image of this job: made again
            return False
        if not self.dry_run:
            self.store.adopt(job.id, image)
        return True

    def stray(self, job_id: str) -> str | None:
        """The key of an image object of ``job_id`` in ``images/``, if there is one."""
        for ext in EXTENSION_RANK:
            key = f"{IMAGES_PREFIX}{job_id}.{ext}"
            if key.removeprefix(IMAGES_PREFIX) in self.listed and key not in self.sources:
                return key
        return None

    def target(self, source: str, aside: str, job_id: str, version: int) -> str:
        """The key ``source`` (version ``version`` of ``job_id``) goes to in ``aside``: one no
        object has, nor one promised to another of this plan."""
        for target in aside_names(aside, job_id, version, PurePosixPath(source).suffix):
            if target not in self._targets and target not in self.aside:
                return target
        raise AssertionError("aside_names() never ends")

    def add(self, source: str, target: str, version: tuple[str, int] | None = None) -> None:
        self._pending.append((source, target, version))
        self._targets.add(target)
        self.sources.add(source)

    def discard(self) -> None:
        self._pending.clear()
        self._targets.clear()
        self._deletes.clear()
        self._looked.clear()
        self._examined.clear()

    def finish(self) -> None:
        """Move the objects of the batch that just committed (copy, then delete), then record
        their versions as moved, and delete the objects it found no image of their job; a dry
        run moves and deletes nothing."""
        pending, self._pending = self._pending, []
        deletes, self._deletes = self._deletes, []
        self.discard()
        if self.dry_run:
            return
        for key in deletes:
            self.location.delete(key)
            self.listed.pop(key.removeprefix(IMAGES_PREFIX), None)
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
            name = f"{kept.job_id}{PurePosixPath(kept.image_path).suffix}"
            if name in self.listed and kept.image_path not in self.aside:
                data = self.location.read_bytes(IMAGES_PREFIX + name)
                if hashlib.sha256(data).hexdigest() == kept.sha256:
                    self.sources.add(IMAGES_PREFIX + name)
                    moved.append((IMAGES_PREFIX + name, kept.image_path))
            done.append((kept.job_id, kept.version))
        if self.dry_run or not done:
            return
        for source, target in moved:
            self._move(source, target)
        self.store.mark_moved(done)

    def _move(self, source: str, target: str) -> None:
        name = source.removeprefix(IMAGES_PREFIX)
        if name not in self.listed:  # gone meanwhile: nothing left to keep
            return
        self.location.copy(source, target)
        self.location.delete(source)
        del self.listed[name]
        self.aside.add(target)

    def _candidate(self, names: list[str]) -> str | None:
        """The key of the object among ``names`` (an image's first) that adoption looks at."""
        keys = [IMAGES_PREFIX + n for n in names if IMAGES_PREFIX + n not in self.sources]
        if not keys:
            return None
        return min(keys, key=lambda k: EXTENSION_RANK.get(k.rpartition(".")[2], 99))

    def _examine(self, job: Job, key: str) -> SavedImage | None:
        """The object at ``key`` as ``job``'s image to adopt, downloaded once a batch."""
        if key not in self._examined:
            size_bytes, mtime_s = self.listed[key.removeprefix(IMAGES_PREFIX)]
            stat = ImageStat(size_bytes, mtime_s * NS_PER_S, 0)
            self._examined[key] = adoptable(job, self.location.read_bytes(key), key, stat)
        return self._examined[key]

    def _look(self, record: JobRecord) -> Looked:
        """What the object of a success is now, looked at once a batch: the listing when it
        agrees with the record, else a HEAD (an object the listing lacks is looked for, not
        taken as gone), and a download when the store reports no sha256 that settles it."""
        key, recorded = record.image_path or "", record.sha256 or ""
        memo = (key, recorded)
        if memo in self._looked:
            return self._looked[memo]
        name = key.removeprefix(IMAGES_PREFIX)
        listed = self.listed.get(name) if key.startswith(IMAGES_PREFIX) else None
        looked: Looked = None
        if listed is not None and ImageStat(listed[0], listed[1] * NS_PER_S, 0) == (
            record.image_stat
        ):
            looked = record.image_stat, recorded, None
        elif (head := self.location.info(key)) is not None:
            if listed is None and key.startswith(IMAGES_PREFIX) and image_job_id(name):
                self.listed[name] = (head.size_bytes, int(head.mtime_s or 0))
            stat = object_stat(head)
            if stat == record.image_stat or head.checksum == f"sha256:{recorded}":
                looked = stat, recorded, None
            else:
                data = self.location.read_bytes(key)
                sha256 = hashlib.sha256(data).hexdigest()
                looked = stat, sha256, pixel_size(data) if sha256 != recorded else None
        self._looked[memo] = looked
        return looked
