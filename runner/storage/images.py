"""Saving one image that came back into a :class:`~runner.storage.base.Location`: verified,
tagged, created only if absent, and an image already there adopted rather than replaced.

:func:`save_image_to` is :func:`runner.images.saving.save_image` for any location, with the
same pieces (:func:`~runner.images.saving.prepare_image` verifies and works out the provenance,
:func:`~runner.images.files.copy_spliced` copies) and the same errors:

- :class:`~runner.images.verify.ImageInvalid` / :class:`~runner.images.verify.WrongSize` when
  the image that came back is not the one paid for;
- :class:`~runner.errors.ImageWriteError` when the location refuses it, or holds something at
  its key that is not a good image of the job (never overwritten: a person must look).

The tagged copy is staged as a temp file beside the final one in a local folder (then linked
in place, no second copy) or beside ``tmp`` for a remote store (then uploaded), and removed
whatever happens; so no stray object or file is left.

An object already at ``images/<job id>.<ext>`` means an earlier write of this job got there
(a worker died between the upload and the commit, or two workers raced): it is downloaded,
decoded, hashed, compared with the checksum the store reports, and adopted as the job's image.
It blocks (decode, fsync, network): the pool runs it in a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from runner.errors import ImageWriteError, StorageError
from runner.images.files import copy_spliced, temp_path_for
from runner.images.saving import prepare_image
from runner.images.verify import ImageInfo, ImageInvalid, inspect_image
from runner.jobs import Job
from runner.storage.base import Location, ObjectInfo, checksums_agree, file_digests


class SavedImage(NamedTuple):
    """The job's image in its location: what it is, its sha256, its key, and whether it was
    there already (``adopted``) rather than written now."""

    image: ImageInfo
    sha256: str
    key: str
    adopted: bool


def save_image_to(location: Location, job: Job, tmp: Path) -> SavedImage:
    """Verify the image in ``tmp``, tag it and create it at ``images/<job id>.<ext>`` in
    ``location``, or adopt the image already there. ``tmp`` is gone afterwards, whatever
    happened."""
    try:
        info, splices = prepare_image(job, tmp)
        key = f"images/{job.id}.{info.extension}"
        final = location.local_path(key)
        if final is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
        staged = temp_path_for(final if final is not None else tmp)
        try:
            with open(staged, "xb") as out:
                sha256 = copy_spliced(out, tmp, splices)
            result = location.put_new(key, staged, sha256)
        finally:
            staged.unlink(missing_ok=True)
        if result.created:
            return SavedImage(info, sha256, key, adopted=False)
        return _adopt(location, job, result.info, tmp)
    except OSError as exc:
        raise ImageWriteError(f"{job.id}: {exc.strerror or exc}") from exc
    except StorageError as exc:
        raise ImageWriteError(f"{job.id}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _adopt(location: Location, job: Job, found: ObjectInfo, tmp: Path) -> SavedImage:
    """The image already at ``found.key``, once it decodes at the size asked for and hashes to
    what its store reports; else ImageWriteError, and the object stays as it is."""
    where = f"{location.url}/{found.key}"
    path = location.local_path(found.key)
    download = None
    if path is None:
        path = download = temp_path_for(tmp)
        location.get(found.key, download)
    try:
        try:
            image = inspect_image(path, job.expected_size)
        except ImageInvalid as exc:
            raise ImageWriteError(
                f"{job.id}: {where} is already there but {exc}; it is never overwritten: move "
                "it away and run again"
            ) from None
        _, sha256, md5 = file_digests(path)
    finally:
        if download is not None:
            download.unlink(missing_ok=True)
    reported = found.checksum
    ours = f"md5:{md5}" if (reported or "").startswith("md5:") else f"sha256:{sha256}"
    if checksums_agree(reported, ours) is False:
        raise ImageWriteError(
            f"{job.id}: {where} was read as {ours}, but its store reports {reported}: the "
            "download was damaged; run again"
        )
    return SavedImage(image, sha256, found.key, adopted=True)
