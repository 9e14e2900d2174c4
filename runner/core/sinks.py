"""Where the pool puts an image that came back: an :class:`ImageSink`, chosen once per run.

- :class:`FolderSink`, the output folder of a run on one machine (the SQLite checkpoint, one
  writer): :func:`~runner.images.saving.save_image`, its temp files in ``images/``, renamed
  into place; the folder's fsync, which makes the rename durable, is left to the checkpoint,
  which does it once per group commit before the successes it commits
  (:meth:`~runner.store.sqlite.SqliteStore.record_success`), not once per image.
- :class:`LocationSink`, the output of a run whose state is shared (``--state``): other workers
  write there too. The image is verified and tagged, then created at ``images/<job id>.<ext>``
  only if absent (:func:`~runner.storage.save_image_to`; an image already there is verified and
  adopted, never overwritten). An object store (``--out s3://...``): staged in a local spool
  folder, its stat what the store reports (size, and the modification time in whole seconds,
  which is what every listing and HEAD agree on), so that the next plan checks it by one
  listing. A local folder (:class:`~runner.storage.LocalLocation`, several workers on one
  machine or on an NFS share): staged in ``images/`` and linked into place, its stat the file's
  own, taken by the store, as for one machine.

Either blocks (decode, fsync, network): the pool calls :meth:`ImageSink.save` in a thread. A
success is recorded only after it returned, so only once the image's bytes are durable in its
place, and committed only once its name is too.

**Adoption before a request** (:meth:`LocationSink.adopt_existing`; a location is the sink
of every run with a shared state, and only there do other workers write). With workers, a job
is claimed again when the worker that had it died; if that one died between writing the image
and recording it, its last attempt is a possible charge and its image is in place. Before such
a job is sent, the sink looks for that image (:meth:`LocationSink.existing`: a HEAD per image
extension, png first) and a good one is adopted: recorded as the job's success, the possible
charge confirmed, no request sent. Only then: a job with no possible charge has no image to
find, and costs no look.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Protocol

from runner.core.finding import EXTENSION_RANK, adoptable
from runner.errors import ImageWriteError
from runner.images.saving import save_image
from runner.jobs import Job
from runner.stages import timed
from runner.storage import Location, ObjectInfo, save_image_to
from runner.storage.base import checksums_agree
from runner.store.base import ImageStat, SavedImage, Store

NS_PER_S: Final = 1_000_000_000


class ImageSink(Protocol):
    @property
    def where(self) -> str:
        """Where the images go, as messages name it."""
        ...

    def save(self, job: Job, tmp: Path) -> SavedImage:
        """Verify the image in the temp file ``tmp`` (then gone), put it in its place, and say
        what is recorded of it. Raises ImageInvalid / WrongSize for an image that is not the
        one paid for, ImageWriteError when its place refuses it."""
        ...


class FolderSink:
    """``images_dir`` in the output folder ``folder``."""

    def __init__(self, images_dir: Path, folder: Path) -> None:
        self.images_dir = images_dir
        self.folder = folder

    @property
    def where(self) -> str:
        return str(self.images_dir)

    def save(self, job: Job, tmp: Path) -> SavedImage:
        with timed("save"):
            info, sha256, relative = save_image(
                job, tmp, self.images_dir, self.folder, sync_folder=False
            )
        return SavedImage(relative, info.width, info.height, sha256)


class LocationSink:
    """``images/`` in ``location``, shared with other workers."""

    def __init__(self, location: Location) -> None:
        self.location = location

    @property
    def where(self) -> str:
        folder = self.location.local_path("images")
        return f"{self.location.url}/images" if folder is None else str(folder)

    def save(self, job: Job, tmp: Path) -> SavedImage:
        saved = save_image_to(self.location, job, tmp)
        image = saved.image
        if self.location.is_local:  # the store stats the file, to the nanosecond
            return SavedImage(saved.key, image.width, image.height, saved.sha256)
        found = self.location.info(saved.key)  # the put's answer has no modification time
        if found is None:
            raise ImageWriteError(
                f"{job.id}: {self.location.url}/{saved.key} vanished right after it was written"
            )
        return SavedImage(saved.key, image.width, image.height, saved.sha256, object_stat(found))

    def existing(self, job: Job) -> SavedImage | None:
        """The good image of ``job`` already at ``images/<job id>.<ext>`` (it decodes at the
        size asked for, and hashes to what its store reports), as adoption records it; None
        when there is none."""
        for ext in EXTENSION_RANK:
            found = self.location.info(f"images/{job.id}.{ext}")
            if found is not None:
                data = self.location.read_bytes(found.key)
                stat = None if self.location.is_local else object_stat(found)
                image = adoptable(job, data, found.key, stat)
                reported = checksums_agree(found.checksum, f"sha256:{image and image.sha256}")
                return None if reported is False else image
        return None

    def adopt_existing(self, store: Store, job: Job) -> bool:
        """Adopt ``job``'s image when its last attempt is a possible charge and a good image
        of it is in place; whether it was (then no request is to be sent). Blocks: the pool
        calls it in a thread."""
        charge = store.adoption_charge(job.id)
        if charge is None or charge[0] != "possible":
            return False
        image = self.existing(job)
        if image is None:
            return False
        store.adopt(job.id, image)
        return True


def object_stat(found: ObjectInfo) -> ImageStat:
    """What is recorded of an object to see later whether it changed: its size and its
    modification time in whole seconds (a listing and a HEAD round it differently), no ctime."""
    return ImageStat(found.size_bytes, int(found.mtime_s or 0) * NS_PER_S, 0)
