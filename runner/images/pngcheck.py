"""Checking a PNG whole without decoding its pixels: every byte accounted for, at zlib's speed.

A full decode of a 4K PNG unfilters and unpacks 25-33 MB of pixels only to throw them away, and
on a 4K run that was most of the runner's CPU. What makes a PNG complete and uncorrupted can be
checked without the pixels, in one pass over the file with bounded memory:

- the signature, then every chunk whole, each with a valid type and its CRC right (a full
  decode checks no IDAT chunk's CRC at all);
- IHDR first and only once, with a width, height, bit depth, colour type, compression, filter
  and interlace method that the PNG specification allows; PLTE before the image data when the
  colour type needs one; no critical chunk this check does not know;
- the IDAT chunks in one unbroken run, their zlib stream inflated to its end (zlib then checks
  its Adler-32), nothing after that end, every scanline's filter type one of the five, and the
  inflated length exactly what IHDR's size, colour type, bit depth and interlace imply: a cut
  stream comes up short, a decompression bomb is stopped as soon as it runs over;
- an empty IEND chunk at the end of the chunks. Bytes after it are left alone, as every decoder
  leaves them (some tools pad their files): they are not part of the image, and a file cut
  anywhere before the end of IEND is refused.

Inflated data is discarded a :data:`INFLATE_BYTES` piece at a time and the file is read
:data:`READ_BYTES` at a time, so a check holds about 2 MB whatever the image's size.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
READ_BYTES: Final = 1 << 20
INFLATE_BYTES: Final = 1 << 20
_MAX_CHUNK_BYTES: Final = (1 << 31) - 1  # the specification's limit on a chunk's length
_CRITICAL: Final = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
# Colour type -> (samples per pixel, the bit depths allowed).
_COLOUR_TYPES: Final = {
    0: (1, (1, 2, 4, 8, 16)),  # greyscale
    2: (3, (8, 16)),  # RGB
    3: (1, (1, 2, 4, 8)),  # palette indices
    4: (2, (8, 16)),  # greyscale and alpha
    6: (4, (8, 16)),  # RGBA
}
# Adam7: each pass's first column and row, and its column and row steps.
_ADAM7: Final = (
    (0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)
)  # fmt: skip
_MAX_FILTER_TYPE: Final = 4


class PngError(ValueError):
    """Not a complete, uncorrupted PNG."""


class PngTooLarge(PngError):
    """A PNG of more pixels than the caller allows: refused before anything is inflated."""


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    bits_per_pixel: int
    colour_type: int
    interlaced: bool

    def rows(self) -> Iterator[int]:
        """The length of each scanline in the inflated stream, in order, its filter byte
        included; an interlaced image's passes one after the other, empty passes left out."""
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        for x0, y0, dx, dy in passes:
            columns = -(-(self.width - x0) // dx) if self.width > x0 else 0
            rows = -(-(self.height - y0) // dy) if self.height > y0 else 0
            if columns and rows:
                row_bytes = 1 + -(-(columns * self.bits_per_pixel) // 8)
                for _ in range(rows):
                    yield row_bytes

    def inflated_bytes(self) -> int:
        if not self.interlaced:
            return self.height * (1 + -(-(self.width * self.bits_per_pixel) // 8))
        return sum(self.rows())  # at most 2 x height rows: cheap next to inflating them


def check_png(f: BinaryIO, max_pixels: int | None = None) -> tuple[int, int]:
    """Check the PNG ``f`` reads from its start to its end; return its width and height.

    Raise :class:`PngError` for anything incomplete or corrupt, :class:`PngTooLarge` (before
    inflating) for more than ``max_pixels`` pixels; ``OSError`` comes from reading ``f``."""
    if f.read(len(SIGNATURE)) != SIGNATURE:
        raise PngError("no PNG signature")
    header: _Header | None = None
    inflater: _Inflater | None = None
    palette = image_data_ended = False
    while True:
        length, kind = _chunk_head(f)
        name = kind.decode("ascii")
        if header is None and kind != b"IHDR":
            raise PngError(f"starts with a {name} chunk, not IHDR")
        if kind == b"IDAT":
            if image_data_ended:
                raise PngError("its IDAT chunks are split by other chunks")
            if inflater is None:
                assert header is not None  # the first chunk is IHDR
                if header.colour_type == 3 and not palette:
                    raise PngError("a palette image without a PLTE chunk before its data")
                inflater = _Inflater(header)
            crc = zlib.crc32(kind)
            for piece in _pieces(f, length, name):
                crc = zlib.crc32(piece, crc)
                inflater.feed(piece)
        else:
            image_data_ended = inflater is not None
            if kind == b"IHDR" and length != 13:
                raise PngError(f"an IHDR chunk of {length} bytes, not 13")
            data, crc = _small_chunk(f, kind, length, name)
        if _read_exactly(f, 4, name) != struct.pack(">I", crc):
            raise PngError(f"the CRC of a {name} chunk does not match its contents")
        if kind == b"IHDR":
            if header is not None:
                raise PngError("a second IHDR chunk")
            header = _parse_header(data, max_pixels)
        elif kind == b"PLTE":
            palette = True
            if inflater is not None:
                raise PngError("a PLTE chunk after the image data")
        elif kind == b"IEND":
            if length:
                raise PngError(f"an IEND chunk of {length} bytes, not empty")
            break
        elif kind[0] < ord("a") and kind not in _CRITICAL:  # an upper-case first letter
            raise PngError(f"an unknown critical chunk {name}")
    if inflater is None:
        raise PngError("no IDAT chunk: no image data")
    inflater.finish()
    assert header is not None
    return header.width, header.height


class _Inflater:
    """The image data's zlib stream, inflated piece by piece and thrown away as it is checked."""

    def __init__(self, header: _Header) -> None:
        self._zlib = zlib.decompressobj()
        self._expected_bytes = header.inflated_bytes()
        self._inflated_bytes = 0
        self._filter_offsets = _offsets(header.rows())
        self._next_filter = next(self._filter_offsets, None)
        self._size = f"{header.width}x{header.height}"

    def feed(self, data: bytes) -> None:
        try:
            while data:
                if self._zlib.eof:
                    raise PngError("data after the end of its compressed image data")
                self._take(self._zlib.decompress(data, INFLATE_BYTES))
                data = self._zlib.unused_data or self._zlib.unconsumed_tail
        except zlib.error as exc:
            raise PngError(f"its compressed image data is corrupt ({exc})") from None

    def finish(self) -> None:
        try:
            while not self._zlib.eof and (out := self._zlib.decompress(b"", INFLATE_BYTES)):
                self._take(out)  # what zlib still held when the input ran out
        except zlib.error as exc:
            raise PngError(f"its compressed image data is corrupt ({exc})") from None
        if not self._zlib.eof:
            raise PngError("its compressed image data is cut short")
        if self._inflated_bytes != self._expected_bytes:
            raise PngError(
                f"its image data inflates to {self._inflated_bytes} bytes, but a {self._size} "
                f"image of its kind has {self._expected_bytes}"
            )

    def _take(self, out: bytes) -> None:
        start = self._inflated_bytes
        end = start + len(out)
        if end > self._expected_bytes:
            raise PngError(
                f"its image data inflates to more than the {self._expected_bytes} bytes "
                f"a {self._size} image of its kind has"
            )
        while self._next_filter is not None and self._next_filter < end:
            if out[self._next_filter - start] > _MAX_FILTER_TYPE:
                raise PngError(f"an unknown scanline filter type at byte {self._next_filter}")
            self._next_filter = next(self._filter_offsets, None)
        self._inflated_bytes = end


def _offsets(lengths: Iterator[int]) -> Iterator[int]:
    offset = 0
    for length in lengths:
        yield offset
        offset += length


def _parse_header(data: bytes, max_pixels: int | None) -> _Header:
    width, height, depth, colour_type, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", data
    )
    if not (0 < width <= _MAX_CHUNK_BYTES and 0 < height <= _MAX_CHUNK_BYTES):
        raise PngError(f"an impossible size {width}x{height}")
    samples, depths = _COLOUR_TYPES.get(colour_type, (0, ()))
    if depth not in depths:
        raise PngError(f"colour type {colour_type} with bit depth {depth}: no such PNG")
    if compression or filtering or interlace > 1:
        methods = f"{compression}, {filtering}, {interlace}"
        raise PngError(f"an unknown compression, filter or interlace method ({methods})")
    if max_pixels is not None and width * height > max_pixels:
        raise PngTooLarge(f"{width}x{height} is over the limit of {max_pixels} pixels")
    return _Header(width, height, samples * depth, colour_type, interlace == 1)


def _chunk_head(f: BinaryIO) -> tuple[int, bytes]:
    head = f.read(8)
    if len(head) < 8:
        raise PngError("cut short: it ends before its IEND chunk")
    length, kind = struct.unpack(">I4s", head)
    if not kind.isalpha():  # bytes.isalpha: ASCII letters only
        raise PngError(f"a chunk type {kind!r} that is not four letters")
    if length > _MAX_CHUNK_BYTES:
        raise PngError(f"a {kind.decode()} chunk of {length} bytes, over the PNG limit")
    return length, kind


def _small_chunk(f: BinaryIO, kind: bytes, length: int, name: str) -> tuple[bytes, int]:
    """A chunk other than IDAT, and its CRC: IHDR's 13 bytes are returned, any other chunk is
    only read through for its CRC, however long."""
    crc = zlib.crc32(kind)
    kept = b""
    for piece in _pieces(f, length, name):
        crc = zlib.crc32(piece, crc)
        if kind == b"IHDR":
            kept = piece  # 13 bytes: one piece
    return kept, crc


def _pieces(f: BinaryIO, length: int, name: str) -> Iterator[bytes]:
    while length > 0:
        piece = _read_exactly(f, min(length, READ_BYTES), name)
        length -= len(piece)
        yield piece


def _read_exactly(f: BinaryIO, size: int, name: str) -> bytes:
    data = f.read(size)
    if len(data) < size:
        raise PngError(f"cut short inside a {name} chunk")
    return data
