"""What a plan makes of an image it finds, wherever the image is: the judgement shared by
:mod:`runner.core.plan` (files on disk) and :mod:`runner.core.remote_plan` (objects in a
store), so that both answer alike and only the looking differs.

- :func:`judge`: a finished image whose stat changed, once hashed: intact (its new stat
  recorded), edited by hand (recorded as the job's next version), or not an image any more;
- :func:`adoptable`: an image no success accounts for, as the job's image if it is one;
- :data:`EXTENSION_RANK` and :func:`image_job_id`: which names in ``images/`` are images of
  which job, in the order :func:`~runner.images.files.find_image` tries them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, Literal

from runner.images.verify import ImageInvalid, inspect_image
from runner.jobs import Job
from runner.provider import EXTENSIONS
from runner.store.base import ImageStat, JobRecord, SavedImage, Store

# What a plan finds of a finished image, besides its being gone.
Found = Literal["intact", "edited", "unreadable"]

EXTENSION_RANK: Final = {ext: rank for rank, ext in enumerate(EXTENSIONS.values())}


def image_job_id(name: str) -> str | None:
    """The job id of an image's name in ``images/`` (``<job id>.<ext>``), else None."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext in EXTENSION_RANK else None


def pixel_size(source: bytes | Path) -> tuple[int, int] | None:
    """The width and height of an image; None if it does not decode (or cannot be read)."""
    try:
        info = inspect_image(source)
    except (ImageInvalid, OSError):
        return None
    return info.width, info.height


def judge(
    store: Store,
    record: JobRecord,
    found: tuple[ImageStat, str, tuple[int, int] | None],
    *,
    dry_run: bool,
) -> tuple[JobRecord, Found]:
    """The record of a success whose image's stat differs from the one recorded, after
    hashing it: ``found`` is its stat, sha256 and pixel size (None: it does not decode). The
    same sha256 is intact (the new stat recorded, so it is not hashed again); a different
    image is an edit, recorded as the job's next version and returned as such; a file that no
    longer decodes is no edit (nothing recorded; the record returned has its sha256)."""
    stat, sha256, size = found
    if sha256 == record.sha256:
        if not dry_run:
            store.record_image_stat(record.job_id, stat)
        return record, "intact"
    if size is None:
        return record._replace(sha256=sha256), "unreadable"
    if not dry_run:
        store.record_edit(record.job_id, sha256, stat, size)
    edited = record._replace(
        version=record.version + 1,
        review="unreviewed",
        edited_at="found by this plan",  # what the store records is its own clock's
        sha256=sha256,
    )
    return edited, "edited"


def adoptable(job: Job, data: bytes, key: str, stat: ImageStat | None) -> SavedImage | None:
    """The image ``data`` (at ``key``, with ``stat``; None: a local file the store stats) as
    what :meth:`Store.adopt` records for ``job``; None when it is no finished image of the job
    (it does not decode at the size asked for)."""
    try:
        info = inspect_image(data, job.expected_size)
    except ImageInvalid:
        return None
    sha256 = hashlib.sha256(data).hexdigest()
    return SavedImage(key, info.width, info.height, sha256, stat)
