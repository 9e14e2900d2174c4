"""Verifying images: checked whole, under bounds, before anything trusts them.

Every image the runner touches, a reference it uploads or a result it keeps, is checked from
its first byte to its last before it is trusted: a file that starts like a PNG and is cut
short, or a picture of the wrong size, must never count as the image that was paid for.

A PNG is checked by :mod:`runner.images.pngcheck` without decoding its pixels (every chunk's
CRC, the image data inflated to its end and its length matched against the header): it catches
everything a full decode does and more, at a fraction of the CPU (a 3840x2160 noise PNG: ~20 ms
against ~55 ms for Pillow's decode), and holds about 2 MB, so it runs in the caller's thread.
JPEG and WebP are decoded in full with Pillow. An image over Pillow's ``MAX_IMAGE_PIXELS`` is
refused as a decompression bomb, whatever its format. A 4K decode holds 25-33 MB of pixels, so
decodes run on :data:`MAX_FULL_DECODES` threads of their own, whatever the concurrency: at most
that many at once, and only those threads' malloc arenas ever hold pixels.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runner.images.pngcheck import PngError, PngTooLarge, check_png
from runner.provider import EXTENSIONS, ImageFormat, sniff_format

MAX_FULL_DECODES = 2

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
    """Check ``source`` (the bytes, or a file) whole and return what it is; raise
    :class:`ImageInvalid` otherwise (``OSError`` if the file cannot be opened)."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(16)
    else:
        head = source[:16]
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageInvalid("not a png, jpeg or webp image")
    if fmt == "png":
        width, height = _check_png(source)
    else:
        width, height = _decoders.submit(_decode, source).result()
    if expected_size is not None and (width, height) != expected_size:
        raise WrongSize(
            f"is {width}x{height}, but {expected_size[0]}x{expected_size[1]} was requested"
        )
    return ImageInfo(fmt, width, height)


def _check_png(source: bytes | Path) -> tuple[int, int]:
    try:
        with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as f:
            return check_png(f, Image.MAX_IMAGE_PIXELS)
    except PngTooLarge as exc:
        raise ImageInvalid(f"refused as a decompression bomb: {exc}") from None
    except PngError as exc:
        raise ImageInvalid(f"does not decode: {exc}") from None


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
