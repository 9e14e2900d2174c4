"""Images on the way in and out: decode and verify with Pillow, write atomically, hash.

Every image the runner touches, a reference it uploads or a result it keeps, is decoded in full
before it is trusted. Pillow's decompression-bomb warning is raised as an error here, so a huge
image is refused instead of filling memory. Results are written as the crash-safe recipe asks:
``<final>.tmp-<random>`` in the same folder, fsync, ``os.replace``, fsync the folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runner.api import EXTENSIONS, ImageFormat, sniff_format

TMP_MARKER = ".tmp-"


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


def inspect_image(data: bytes, expected_size: tuple[int, int] | None = None) -> ImageInfo:
    """Decode ``data`` in full and return what it is; raise :class:`ImageInvalid` otherwise."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageInvalid("not a png, jpeg or webp image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInvalid(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInvalid(f"does not decode: {exc}") from None
    if expected_size is not None and (width, height) != expected_size:
        raise WrongSize(
            f"is {width}x{height}, but {expected_size[0]}x{expected_size[1]} was requested"
        )
    return ImageInfo(fmt, width, height)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old state or the new file.

    A leftover ``*.tmp-*`` file is the only trace a crash can leave; :func:`remove_temp_files`
    deletes those on the next start.
    """
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{secrets.token_hex(6)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files an interrupted :func:`write_atomic` left behind; return how many."""
    removed = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            if TMP_MARKER in entry.name and entry.is_file():
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
