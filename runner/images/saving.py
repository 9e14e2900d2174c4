"""Saving one image that came back: verified, tagged with its provenance, durably in place.

:func:`save_image` takes the temp file the client streamed an answer into and either puts the
image at ``<images>/<job id>.<ext>`` or says why not:

- :class:`~runner.images.verify.ImageInvalid` when it does not decode (the pool books a possible
  or confirmed charge), :class:`~runner.images.verify.WrongSize` when it is not the size asked
  for, or, when no size was asked for, not one of the 30 the provider makes: either way not the
  image that was paid for;
- :class:`~runner.errors.ImageWriteError` when the disk refuses it (any ``OSError`` here is the
  disk's: the network is done by now), final for the run.

The provenance (job id, prompt, model, size; see :mod:`runner.images.provenance`) is spliced
into the temp file where it lies, which is then renamed into place, when the edits touch only
its end (a PNG's, before IEND): the image is written once, by the client. Otherwise (a JPEG's
comment after SOI, a large WebP's header) it is spliced in while the file is copied, never by
loading it whole. A container the splicer cannot handle is kept untagged rather than lost, since
the image was paid for. The temp file is removed whatever happens. It blocks (a full decode,
fsyncs): the pool runs it in a worker thread.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from runner.errors import ImageWriteError
from runner.images.files import rename_spliced, write_atomic_copy
from runner.images.provenance import Splice, provenance_splices
from runner.images.verify import ImageInfo, WrongSize, inspect_image
from runner.jobs import JOB_ID_RE, Job
from runner.provider import SIZE_SET
from runner.stages import timed

log = logging.getLogger(__name__)


def save_image(
    job: Job, tmp: Path, images_dir: Path, folder: Path, *, sync_folder: bool = True
) -> tuple[ImageInfo, str, str]:
    """Verify the image in ``tmp``, tag it and write it durably into ``images_dir``; return what
    it is, the sha256 of the file written, and its path relative to ``folder`` (the output
    folder, as the checkpoint records it). ``tmp`` is gone afterwards, whatever happened.
    ``sync_folder=False``: the image's bytes are durable, its name in ``images_dir`` not
    yet; the caller fsyncs the folder before it counts the image as saved."""
    try:
        info, splices = prepare_image(job, tmp)
        path = images_dir / f"{job.id}.{info.extension}"
        sha256 = None
        if tmp.parent == images_dir:  # renamed into place, edited where it lies if it can be
            sha256 = rename_spliced(path, tmp, splices, sync_folder=sync_folder)
        if sha256 is None:
            sha256 = write_atomic_copy(path, tmp, splices, sync_folder=sync_folder)
    except OSError as exc:
        raise ImageWriteError(f"{exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return info, sha256, path.relative_to(folder).as_posix()


def prepare_image(job: Job, tmp: Path) -> tuple[ImageInfo, list[Splice]]:
    """Verify the image in ``tmp`` (decode, size) and work out the provenance splices to apply
    while it is copied to its final place; shared with :mod:`runner.storage.images`.

    A job id that is not a manifest's (``../x``) raises :class:`ValueError` before any path is
    made from it: the validator never makes one, so it is a bug, never a file outside the
    images folder. ``OSError``: ``tmp`` cannot be read."""
    if not JOB_ID_RE.fullmatch(job.id):
        raise ValueError(f"job id {job.id!r} cannot name an image file: not a manifest's id")
    with timed("verify"):
        info = inspect_image(tmp, job.expected_size)
    if job.expected_size is None and f"{info.width}x{info.height}" not in SIZE_SET:
        raise WrongSize(f"is {info.width}x{info.height}, not one of the 30 sizes")
    provenance = {"job_id": job.id, "prompt": job.prompt, "model": job.model}
    provenance["size"] = f"{info.width}x{info.height}"  # also for "auto" and the default
    splices: list[Splice] = []
    try:
        with open(tmp, "rb") as f:
            splices = provenance_splices(f, info.format, provenance)
    except (ValueError, struct.error) as exc:  # an odd container: keep it untagged
        log.warning("no provenance written into %s: %s", job.id, exc)
    return info, splices
