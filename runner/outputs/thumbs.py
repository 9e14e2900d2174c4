"""The report's thumbnail cache, ``thumbs/`` beside ``report.html``: one small WebP a picture.

A finished image's thumb is ``<job_id>-<first 12 of its sha256>.webp``; a reference image's (an
edit's input, shown beside its output) is ``ref-<first 12 of its sha256>.webp``, made once
however many jobs share the file. That name is also that of a job called ``ref`` whose image
has the same bytes, which would be the same picture: the one file serves both.

Naming by content makes the cache check a ``stat``: a finished image's thumb is looked up by the
sha256 the run recorded, as long as the file's stat (size, mtime, ctime) is still the one recorded
with it, so a report over a folder whose images have not changed decodes none of them. An image
whose stat differs is hashed: changed since the run (a new sha), it gets a new thumb and a note.
Thumbs are written with :func:`~runner.images.files.write_atomic` without fsync (a cache: a power
cut may leave one empty, never half of another), so an empty file is a miss.

``thumbs/`` is shared: by the report, by a review app making thumbs on demand, maybe by a second
report at the same time. The thumbs a report no longer uses (an older image's, a job no longer
done) are deleted by :meth:`Thumbnails.sweep` once its page is in place, and only those older than
its start: one a review app or another report made meanwhile is theirs. To know its own without a
set of every name, a report keeps an 8-byte hash of each name used: 0.8 MB for 100,000 jobs. The
temp files an interrupted write left go in the same pass, once an hour old: a younger one may be a
thumb another process is writing.

The methods making thumbs run in worker threads (decoding and shrinking release the GIL).

What is the same wherever the images are (naming, the references remembered, the names a report
keeps) is :class:`ThumbCache`; where a finished image is read and a thumb kept is its seam,
five methods: :class:`Thumbnails` for a folder, as above, and
:class:`~runner.outputs.location_thumbs.LocationThumbnails` for a run in object storage.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from stat import S_ISREG
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
from PIL import Image

from runner.errors import StorageError
from runner.images.files import is_temp_name, sha256_file, temp_path_for, write_atomic
from runner.store.base import ImageStat

THUMBS_DIR: Final = "thumbs"
THUMB_MAX_PX: Final = 256
THUMB_QUALITY: Final = 70

THUMB_NAME: Final = re.compile(r".+-[0-9a-f]{12}\.webp")
_THUMB_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, StorageError)
_SWEPT_AT_ONCE = 8192  # thumbs/ entries whose names a sweep looks up in one search
_REFERENCES_REMEMBERED = 1024  # distinct reference files whose thumb a report remembers
# A thumb is written in milliseconds: a temp file an hour old is no write going on.
_TEMP_FILE_AGE_NS = 3600 * 1_000_000_000
CHANGED_NOTE: Final = "changed since the run: the next run keeps it as an edit"


class Thumb(NamedTuple):
    """A picture's thumb file name under ``thumbs/``, or None, and a note for the reader."""

    name: str | None
    note: str | None


Source = Path | bytes  # a picture: its file on this machine, or its bytes read from a store


class FoundImage(NamedTuple):
    """A finished image where the run put it: ``load`` gives the picture (read only when a
    thumb must be made or the image hashed), ``as_recorded`` says the sha256 recorded holds."""

    load: Callable[[], Source]
    as_recorded: bool


class ThumbCache(ABC):
    """The thumbs of one report (made or found, then the unused ones swept), or of a review
    app's requests. Subclasses say where the finished images are read and the thumbs kept."""

    threads: int = os.cpu_count() or 2  # how many make thumbs at once, one picture each

    def __init__(self) -> None:
        self._kept = array("q")  # hash() of each name used: only this process compares them
        self._references: OrderedDict[tuple[str, int, int], Thumb] = OrderedDict()
        self._lock = threading.Lock()

    @abstractmethod
    def find_image(
        self, image_path: str, sha256: str | None, stat: ImageStat | None
    ) -> FoundImage | None:
        """The finished image at ``image_path`` (relative to the output location), None when
        there is none; raises one of the errors of an unreadable image."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of the thumb ``name``: FileNotFoundError when it is not (or no longer)
        there."""

    @abstractmethod
    def sweep(self) -> None:
        """Delete the thumbs this report did not use and made before it started: called once
        the new page is in place (the page it replaces shows the old thumbs until then, and
        stays if the new one cannot be written)."""

    @abstractmethod
    def _cached(self, name: str) -> bool: ...

    @abstractmethod
    def _write(self, name: str, thumb: bytes) -> None: ...

    def of_image(
        self, job_id: str, image_path: str | None, sha256: str | None, stat: ImageStat | None
    ) -> Thumb:
        """The thumb of a job's finished image, as the checkpoint records it (``stat``: None
        when none was recorded). Named by the recorded sha256 while the image is the one
        recorded; else it is hashed, and a changed image gets a thumb of its own, with a
        note: a reviewer judges the picture there is, and knows it is not the generated one."""
        if not image_path:
            return Thumb(None, "no image recorded")
        try:
            found = self.find_image(image_path, sha256, stat)
            if found is None:
                return Thumb(None, f"image file missing: {image_path}")
            if sha256 and found.as_recorded:
                return Thumb(self._make(found.load, f"{job_id}-{sha256[:12]}.webp"), None)
            source = found.load()
            digest = _sha256_of(source)
            name = self._make(lambda: source, f"{job_id}-{digest[:12]}.webp")
        except _THUMB_ERRORS as exc:
            return Thumb(None, f"image unreadable: {image_path} ({exc})")
        return Thumb(name, None if digest == sha256 else CHANGED_NOTE)

    def of_reference(self, path: str) -> Thumb:
        """The thumb of a reference image (a path on this machine, as the run recorded it),
        hashed once a report for each of the last thousand files asked for, decoded once for
        all reports."""
        source = Path(path)
        try:
            stat = source.stat()
        except OSError:
            return Thumb(None, f"reference missing: {path}")
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._references:
                self._references.move_to_end(key)
                return self._references[key]
        try:
            name = f"ref-{sha256_file(source)[:12]}.webp"
            thumb = Thumb(self._make(lambda: source, name), None)
        except _THUMB_ERRORS as exc:
            thumb = Thumb(None, f"reference unreadable: {path} ({exc})")
        with self._lock:
            self._references[key] = thumb
            if len(self._references) > _REFERENCES_REMEMBERED:
                self._references.popitem(last=False)
        return thumb

    def keep(self, name: str) -> None:
        """Mark ``name`` as used by this report, so that :meth:`sweep` leaves it."""
        self._kept.append(hash(name))

    def _kept_names(self) -> KeptNames:
        return KeptNames.of(np.frombuffer(self._kept, dtype=np.int64))

    def _make(self, load: Callable[[], Source], name: str) -> str:
        """``name``, made from the picture ``load`` gives unless a thumb of that name is there
        already."""
        if not self._cached(name):
            self._write(name, make_thumb(load()))
        return name


class KeptNames:
    """A sorted array of names' ``hash()``: which thumbs to keep, 8 bytes a name."""

    def __init__(self, hashes: npt.NDArray[np.int64]) -> None:
        self._hashes = hashes

    @classmethod
    def of(cls, hashes: npt.NDArray[np.int64]) -> KeptNames:
        return cls(np.sort(hashes))

    def __contains__(self, name: str) -> bool:
        key = hash(name)
        at = int(np.searchsorted(self._hashes, key))
        return at < len(self._hashes) and bool(self._hashes[at] == key)

    def which(self, names: list[str]) -> npt.NDArray[np.bool_]:
        """``name in self`` for each of ``names``, in one search: a sweep asks it of every
        file in ``thumbs/``, a million of them, where a search a name costs microseconds."""
        keys = np.fromiter(map(hash, names), dtype=np.int64, count=len(names))
        at = np.searchsorted(self._hashes, keys)
        found: npt.NDArray[np.bool_] = at < len(self._hashes)
        found[found] = self._hashes[at[found]] == keys[found]
        return found


class Thumbnails(ThumbCache):
    """The thumbs under ``folder/thumbs/`` of the images in ``folder``, on this machine."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.dir = folder / THUMBS_DIR
        self.dir.mkdir(exist_ok=True)
        # As text: a report stats two files a job, and Path's joins double a stat's cost.
        self._folder_name = str(folder)
        self._dir_name = str(self.dir)
        self._started_ns = _file_time_now_ns(self.dir)

    def find_image(
        self, image_path: str, sha256: str | None, stat: ImageStat | None
    ) -> FoundImage | None:
        """The file, as recorded while its stat is the one recorded with its sha256."""
        try:
            found = os.stat(os.path.join(self._folder_name, image_path))  # noqa: PTH116, PTH118
        except OSError:
            return None
        if not S_ISREG(found.st_mode):
            return None
        as_recorded = stat is not None and ImageStat.of(found) == stat
        return FoundImage(lambda: self.folder / image_path, as_recorded)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def sweep(self) -> None:
        """Also the temp files an interrupted write left over an hour ago. A name kept is a
        thumb's, never a temp file's (a job id starts with no dot, a thumb's name ends in
        ``.webp``): the entries of the names kept, nearly all of them, are left unlooked at."""
        kept = self._kept_names()
        temps_before_ns = time.time_ns() - _TEMP_FILE_AGE_NS
        with os.scandir(self.dir) as entries:
            while batch := list(islice(entries, _SWEPT_AT_ONCE)):
                unused = np.flatnonzero(~kept.which([entry.name for entry in batch]))
                for at in unused.tolist():
                    self._sweep_entry(batch[at], temps_before_ns)

    def _sweep_entry(self, entry: os.DirEntry[str], temps_before_ns: int) -> None:
        """Delete the file ``entry``, of a name not kept, if it is a thumb made before this
        report, or a temp file made before ``temps_before_ns``."""
        if entry.is_dir(follow_symlinks=False):
            return
        if is_temp_name(entry.name):  # checked first: ".tmp-<hex>-<thumb name>"
            before_ns = temps_before_ns
        elif THUMB_NAME.fullmatch(entry.name):
            before_ns = self._started_ns
        else:
            return
        try:
            if entry.stat(follow_symlinks=False).st_mtime_ns < before_ns:
                Path(entry.path).unlink(missing_ok=True)
        except FileNotFoundError:  # deleted meanwhile by another
            return

    def _cached(self, name: str) -> bool:
        try:
            return os.stat(f"{self._dir_name}/{name}").st_size > 0  # noqa: PTH116
        except OSError:
            return False

    def _write(self, name: str, thumb: bytes) -> None:
        write_atomic(self.dir / name, thumb, durable=False)


def _sha256_of(source: Source) -> str:
    if isinstance(source, Path):
        return sha256_file(source)
    return hashlib.sha256(source).hexdigest()


def _file_time_now_ns(folder: Path) -> int:
    """The mtime a file made in ``folder`` now gets. File times are coarse (a clock tick behind
    ``time.time_ns()``; two seconds on FAT), so a thumb made after this moment may be dated
    before a ``time.time_ns()`` taken now, never before this."""
    marker = temp_path_for(folder / "now")
    marker.touch(exist_ok=False)
    try:
        return marker.stat().st_mtime_ns
    finally:
        marker.unlink(missing_ok=True)


def make_thumb(source: Source) -> bytes:
    """A WebP of ``source`` (a file, or an image's bytes) at most 256 px a side, made for
    speed: a report may make 100,000. A palette image (a flat PNG) is first cut to about
    twice the thumb's size by nearest neighbour (converting 700,000 palette pixels to RGB
    costs more than the rest); then the image is shrunk by whole factors (box filter,
    ``reducing_gap=1``) and bilinear, and encoded with the least effort (``method=0``): 1.5 ms
    a 1280x544 PNG where the defaults take 4 ms, for a thumb of the same look a few percent
    bigger."""
    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
        image.draft("RGB", (THUMB_MAX_PX, THUMB_MAX_PX))  # JPEG decodes at 1/2..1/8 scale
        small: Image.Image = image
        factor = max(image.size) // (2 * THUMB_MAX_PX)
        if image.mode == "P" and factor > 1:
            small = image.resize(
                (image.width // factor, image.height // factor), Image.Resampling.NEAREST
            )
        alpha = small.mode in ("RGBA", "LA", "PA") or "transparency" in small.info
        mode = "RGBA" if alpha else "RGB"
        # Palette images would be resized with nearest-neighbour: convert them first.
        small = small if small.mode == mode else small.convert(mode)
        small.thumbnail((THUMB_MAX_PX, THUMB_MAX_PX), Image.Resampling.BILINEAR, reducing_gap=1.0)
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=THUMB_QUALITY, method=0)
    return buffer.getvalue()
