"""The report's thumbnail cache for a run whose images are in object storage: ``thumbs/`` in
the location, beside ``report.html`` and ``images/``.

:class:`~runner.outputs.thumbs.ThumbCache` (naming, references, what a report keeps) over a
:class:`~runner.storage.Location`; only where images are read and thumbs kept differs:

- An image is as recorded when its store reports the sha256 the run recorded (S3 keeps the
  SHA-256 sent with the image's conditional create, and a HEAD returns it): a cached thumb is
  then found without reading a byte of the image. One whose store reports another checksum or
  none (put there by hand, a store with MD5s only) is read and hashed, as a folder's image
  whose stat changed is.
- An image is read whole (``read_bytes``) by the thread making its thumb, then let go: one
  picture at a time a thread, :data:`THREADS` threads, never the run's images together.
- A thumb is cached when the listing of ``thumbs/`` made as the cache opened had it (8 bytes a
  name, one LIST for 1,000 names), or this cache made it lately (the review app asks again for
  what it showed). It is written through a local temp file, replacing whatever has its name: a
  thumb is named by its picture's content, so that is the same picture.
- The sweep lists ``thumbs/`` again and deletes the thumbs this report did not use, dated before
  it started by the store's own clock (the date the store gave a marker object as the cache
  opened; a thumb made in that same second is left): never one that a review app or another
  report made meanwhile.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Final

import numpy as np

from runner.errors import StorageError
from runner.outputs.thumbs import THUMB_NAME, THUMBS_DIR, FoundImage, KeptNames, ThumbCache
from runner.storage import Location
from runner.storage.base import checksums_agree
from runner.store.base import ImageStat

THREADS: Final = 8  # waiting on the network more than decoding: more than the cores
_MADE_REMEMBERED = 4096  # thumbs a review app made whose names it remembers


class LocationThumbnails(ThumbCache):
    """The thumbs under ``thumbs/`` of the images in ``location``, an object store."""

    threads = THREADS

    def __init__(self, location: Location) -> None:
        super().__init__()
        self.location = location
        self._started_s = _store_time_now_s(location)
        listed = (hash(_name(found.key)) for found in location.list(f"{THUMBS_DIR}/"))
        self._listed = KeptNames.of(np.fromiter(listed, dtype=np.int64))
        self._made: OrderedDict[str, None] = OrderedDict()

    def find_image(
        self, image_path: str, sha256: str | None, stat: ImageStat | None
    ) -> FoundImage | None:
        """The object, as recorded while its store reports the sha256 recorded (``stat``,
        what a folder compares, is not needed: the checksum says more)."""
        found = self.location.info(image_path)
        if found is None:
            return None
        recorded = sha256 is not None and checksums_agree(found.checksum, f"sha256:{sha256}")
        return FoundImage(lambda: self.location.read_bytes(image_path), recorded is True)

    def read(self, name: str) -> bytes:
        key = f"{THUMBS_DIR}/{name}"
        try:
            return self.location.read_bytes(key)
        except StorageError:
            if self.location.info(key) is None:  # swept meanwhile: the caller makes it again
                raise FileNotFoundError(f"{self.location.url}/{key}") from None
            raise

    def sweep(self) -> None:
        kept = self._kept_names()
        for found in self.location.list(f"{THUMBS_DIR}/"):
            name = _name(found.key)
            if not THUMB_NAME.fullmatch(name) or name in kept:
                continue
            if found.mtime_s is not None and found.mtime_s < self._started_s:
                self.location.delete(found.key)

    def _cached(self, name: str) -> bool:
        if name in self._listed:
            return True
        with self._lock:
            return name in self._made

    def _write(self, name: str, thumb: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix="image-runner-thumb-", suffix=".webp")
        path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(thumb)
            self.location.put(f"{THUMBS_DIR}/{name}", path)
        finally:
            path.unlink(missing_ok=True)
        with self._lock:
            self._made[name] = None
            if len(self._made) > _MADE_REMEMBERED:
                self._made.popitem(last=False)


def _name(key: str) -> str:
    return key.removeprefix(f"{THUMBS_DIR}/")


def _store_time_now_s(location: Location) -> float:
    """The date ``location``'s store gives an object made now, by its own clock (which dates
    the thumbs), from an empty marker object put and deleted; -inf when the store dates
    nothing (the sweep then deletes nothing)."""
    fd, tmp = tempfile.mkstemp(prefix="image-runner-now-")
    os.close(fd)
    key = f"{THUMBS_DIR}/.now-{secrets.token_hex(8)}"
    try:
        marker = location.put(key, Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)
    location.delete(key)
    return float("-inf") if marker.mtime_s is None else marker.mtime_s
