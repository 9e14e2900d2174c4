"""Images on the way in and out: decode and verify with Pillow, write atomically, hash.

Every image the runner touches, a reference it uploads or a result it keeps, is decoded in full
before it is trusted. Pillow's decompression-bomb warning is raised as an error here, so a huge
image is refused instead of filling memory. A 4K decode holds 25-33 MB of pixels, so decodes
run on :data:`MAX_FULL_DECODES` threads of their own, whatever the concurrency: at most that many
at once, and only those threads' malloc arenas ever hold pixels. Results are written as the
crash-safe recipe asks: a temp file in the same folder, fsync, ``os.replace``, fsync the folder;
an image that came back as a temp file is streamed across with its edits
(:func:`write_atomic_copy`), never loaded whole.

Every temp file the runner makes is named by :func:`temp_path_for`, ``.tmp-<random>-<final
name>``: a name no final file can have, since a job id never starts with a dot. A marker inside
the name would not do: ``shot.tmp-1`` is a valid id, and the start-up sweep would delete its
image as a leftover, so that every run paid for it again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from PIL import Image

from runner.provider import EXTENSIONS, ImageFormat, sniff_format

TEMP_PREFIX: Final = ".tmp-"
# What earlier versions named their temp files: ``<final name>.tmp-<12 or 8 hex digits>``. A final
# image ends in its extension, and no other file of an output folder ends so, so these are
# still safe to sweep.
_OLD_TEMP_NAME: Final = re.compile(r"\.tmp-(?:[0-9a-f]{12}|[0-9a-f]{8})\Z")
MAX_FULL_DECODES = 2
COPY_CHUNK_BYTES = 1 << 20

_decoders = ThreadPoolExecutor(MAX_FULL_DECODES, thread_name_prefix="image-decode")


class ImageInvalid(ValueError):
    """The bytes are not a complete png, jpeg or webp image, or not the size asked for."""


class WrongSize(ImageInvalid):
    """A good image, but not of the size that was asked for."""


@dataclass(frozen=True)
class ImageInfo:
    format: ImageFormat
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def inspect_image(source: bytes | Path, expected_size: tuple[int, int] | None = None) -> ImageInfo:
    """Decode ``source`` (the bytes, or a file) in full and return what it is; raise
    :class:`ImageInvalid` otherwise (``OSError`` if the file cannot be opened)."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(16)
    else:
        head = source[:16]
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageInvalid("not a png, jpeg or webp image")
    width, height = _decoders.submit(_decode, source).result()
    if expected_size is not None and (width, height) != expected_size:
        raise WrongSize(
            f"is {width}x{height}, but {expected_size[0]}x{expected_size[1]} was requested"
        )
    return ImageInfo(fmt, width, height)


def _decode(source: bytes | Path) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = source if isinstance(source, Path) else io.BytesIO(source)
            with Image.open(opened) as image:
                image.load()
                return image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInvalid(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInvalid(f"does not decode: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old state or the new file.

    A leftover temp file (see :func:`temp_path_for`) is the only trace a crash can leave;
    :func:`remove_temp_files` deletes those on the next start. ``durable=False`` skips the
    fsyncs, for caches that are checked when read (a power cut may then leave the file empty,
    never half of another).
    """
    with _atomic_file(path, durable=durable) as f:
        f.write(data)


def write_atomic_copy(
    path: Path, source: Path, splices: Sequence[tuple[int, int, bytes]] = ()
) -> str:
    """Copy ``source`` to ``path`` as :func:`write_atomic` does, streamed, with ``splices``
    applied: ``(offset, bytes removed, bytes inserted)`` in file order (see
    :class:`runner.images.provenance.Splice`). Return the sha256 of what was written."""
    digest = hashlib.sha256()
    with _atomic_file(path) as out, open(source, "rb") as src:

        def put(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        pos = 0
        for offset, remove, insert in splices:
            _copy(src, put, offset - pos)
            put(insert)
            src.seek(remove, os.SEEK_CUR)
            pos = offset + remove
        _copy(src, put, None)
    return digest.hexdigest()


def _copy(src: BinaryIO, put: Callable[[bytes], None], size_bytes: int | None) -> None:
    """Pass the next ``size_bytes`` of ``src`` (all that is left: None) to ``put``."""
    left = size_bytes
    while left is None or left > 0:
        chunk = src.read(COPY_CHUNK_BYTES if left is None else min(left, COPY_CHUNK_BYTES))
        if not chunk:
            if left is not None:
                raise OSError(f"{getattr(src, 'name', 'the file')} shrank while it was copied")
            return
        put(chunk)
        if left is not None:
            left -= len(chunk)


@contextmanager
def _atomic_file(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A new temp file's path beside ``path``, to be renamed onto it: ``.tmp-<random>-<name>``."""
    return path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is that of a temp file of this version or an earlier one, never that of
    a finished image or of another file the runner keeps."""
    return name.startswith(TEMP_PREFIX) or _OLD_TEMP_NAME.search(name) is not None


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files an interrupted write left in ``folder``; return how many."""
    removed = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if is_temp_name(entry.name) and entry.is_file():
                entry.unlink()
                removed += 1
    return removed


def find_image(folder: Path, job_id: str) -> Path | None:
    """The final image file of a job, whatever its format, if one exists."""
    for ext in EXTENSIONS.values():
        candidate = folder / f"{job_id}.{ext}"
        if candidate.is_file():
            return candidate
    return None
