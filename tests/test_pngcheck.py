"""The PNG check without a pixel decode (:mod:`runner.images.pngcheck`, through
:func:`~runner.images.verify.inspect_image`) against a fuzz corpus: every PNG kind the
specification allows is accepted at its size, as Pillow decodes it; every file cut short, every
single bit flipped, every bit of the image data flipped with its chunk's CRC made right again,
and every structural mutation below is refused. The corpus's PNGs are small, so that every
offset and every bit is tried; the check reads them as it reads a 4K one."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from runner.emulator.render import noise_png_b64
from runner.images import pngcheck
from runner.images.provenance import add_provenance
from runner.images.verify import ImageInvalid, WrongSize, inspect_image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
ADAM7 += ((0, 1, 1, 2),)
SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunks(png: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, type, data) of each chunk of a well-formed ``png``."""
    pos = len(SIGNATURE)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        yield pos, png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        pos += 12 + length


def rebuild(png: bytes, edit: dict[bytes, bytes | None]) -> bytes:
    """``png`` with the data of each chunk type in ``edit`` replaced (None: the chunk dropped),
    each CRC made right: structure changed, no checksum to give it away."""
    out = SIGNATURE
    for _, kind, data in chunks(png):
        new = edit.get(kind, data)
        out += b"" if new is None else chunk(kind, new)
    return out


def ihdr(width: int, height: int, depth: int, colour_type: int, interlace: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)


def raw_rows(width: int, height: int, bits: int, interlace: int, seed: int = 0) -> bytes:
    """Scanlines of random samples, their filter types cycling through all five."""
    rng = random.Random(seed)
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    out = bytearray()
    for x0, y0, dx, dy in passes:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        for _ in range(rows if columns else 0):
            out += bytes([len(out) % 5]) + rng.randbytes((columns * bits + 7) // 8)
    return bytes(out)


def make_png(
    width: int, height: int, depth: int, colour_type: int, interlace: int = 0, level: int = 6
) -> bytes:
    raw = raw_rows(width, height, SAMPLES[colour_type] * depth, interlace)
    palette = chunk(b"PLTE", bytes(range(48))) if colour_type == 3 else b""
    return (
        SIGNATURE
        + chunk(b"IHDR", ihdr(width, height, depth, colour_type, interlace))
        + palette
        + chunk(b"IDAT", zlib.compress(raw, level))
        + chunk(b"IEND", b"")
    )


def pillow_png(mode: str, size: tuple[int, int] = (24, 16), **options: int) -> bytes:
    pixels = random.Random(1).randbytes(size[0] * size[1] * 4)
    image = Image.frombytes("RGBA", size, pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def smooth_png(size: tuple[int, int], **options: int) -> bytes:
    """A picture zlib compresses with Huffman codes: random pixels are only ever stored."""
    image = Image.effect_mandelbrot(size, (-2.0, -1.2, 1.0, 1.2), 40)
    image = Image.merge("RGB", (image, Image.linear_gradient("L").resize(size), image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


KINDS = [(0, d) for d in (1, 2, 4, 8, 16)] + [(2, 8), (2, 16), (4, 8), (4, 16), (6, 8), (6, 16)]
KINDS += [(3, d) for d in (1, 2, 4, 8)]
VALID = {
    f"ct{ct}-{depth}bit-{w}x{h}-{'adam7' if il else 'plain'}": make_png(w, h, depth, ct, il)
    for ct, depth in KINDS
    for w, h in ((1, 1), (3, 5), (9, 2), (17, 11))
    for il in (0, 1)
}
CORPUS = {
    "pillow-rgb": pillow_png("RGB"),
    "smooth-fast": smooth_png((48, 32), compress_level=1),
    "smooth-default": smooth_png((48, 32)),
    "smooth-best": smooth_png((40, 24), compress_level=9),
    "pillow-rgba-best": pillow_png("RGBA", compress_level=9),
    "pillow-palette": pillow_png("P"),
    "pillow-1bit": pillow_png("1"),
    "emulator-noise-stored": noise_png_b64(24, 16)[0],
    "tagged": add_provenance(pillow_png("RGB"), "png", {"job_id": "j", "prompt": "a lamp"}),
    "adam7-rgb": make_png(24, 16, 8, 2, interlace=1),
    "adam7-stored": make_png(13, 7, 16, 6, interlace=1, level=0),
}


def refused(data: bytes) -> bool:
    try:
        inspect_image(data)
    except ImageInvalid:
        return True
    return False


@pytest.mark.parametrize("name", sorted(VALID | CORPUS))
def test_every_kind_of_png_is_accepted_at_the_size_pillow_decodes(name: str) -> None:
    data = (VALID | CORPUS)[name]
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        size = image.size
    info = inspect_image(data, size)
    assert (info.format, info.width, info.height) == ("png", *size)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_cut_is_refused(name: str) -> None:
    data = CORPUS[name]
    assert [cut for cut in range(len(data)) if not refused(data[:cut])] == []
    assert not refused(data + b"\0" * 64)  # bytes after IEND are not the image's: left alone


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_single_bit_flip_is_refused(name: str) -> None:
    data = CORPUS[name]
    missed = []
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        if not refused(bytes(flipped)):
            missed.append(bit)
    assert missed == []


def inflated(stream: bytes) -> bytes | None:
    try:
        return zlib.decompress(stream)
    except zlib.error:
        return None


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_image_data_bit_flip_is_refused_even_with_its_crc_made_right(name: str) -> None:
    """With the CRC right again, the chunk walk sees nothing: what refuses each flip is zlib
    (a broken stream, or its Adler-32 over the inflated data) or the length or filter check.

    The flips that pass change no byte of the image: the 5 bits that pad a stored block's
    3-bit header to a byte, which no decoder reads, and a few bits of a Huffman block's code
    tables that still decode every symbol the block uses to the same bytes. Each flip that
    passes is checked to inflate to the very same data: no flip that changes a pixel passes."""
    data = CORPUS[name]
    idat = b"".join(body for _, kind, body in chunks(data) if kind == b"IDAT")
    one_idat = rebuild(data, {b"IDAT": idat})  # the stream in one chunk, to flip it anywhere
    assert not refused(one_idat)
    for bit in range(len(idat) * 8):
        flipped = bytearray(idat)
        flipped[bit // 8] ^= 1 << (bit % 8)
        if not refused(rebuild(one_idat, {b"IDAT": bytes(flipped)})):
            assert inflated(bytes(flipped)) == inflated(idat), f"bit {bit} changed the image"


ROW = 1 + 17 * 3
RAW = bytes(11 * ROW)  # black, every filter type 0: a stream read out of step still looks fine
BASE = rebuild(make_png(17, 11, 8, 2), {b"IDAT": zlib.compress(RAW)})
IEND = chunk(b"IEND", b"")


def with_chunk_before_iend(png: bytes, extra: bytes) -> bytes:
    return png.removesuffix(IEND) + extra + IEND


STRUCTURAL = {
    "wider than its data": (rebuild(BASE, {b"IHDR": ihdr(33, 11, 8, 2)}), "inflates to 572"),
    "shorter than its data": (rebuild(BASE, {b"IHDR": ihdr(17, 10, 8, 2)}), "more than the 520"),
    "16 bits, data of 8": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 16, 2)}), "but a 17x11"),
    "said interlaced": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 8, 2, 1)}), "but a 17x11"),
    "one row short": (rebuild(BASE, {b"IDAT": zlib.compress(RAW[:-ROW])}), "inflates to 520"),
    "one row more": (rebuild(BASE, {b"IDAT": zlib.compress(RAW + RAW[:ROW])}), "more than"),
    "a filter type 5": (
        rebuild(BASE, {b"IDAT": zlib.compress(RAW[:ROW] + b"\x05" + RAW[ROW + 1 :])}),
        "filter type at byte 52",
    ),
    "a stream cut short": (
        rebuild(BASE, {b"IDAT": zlib.compressobj().compress(RAW)}),  # never flushed
        "cut short",
    ),
    "bytes after the stream": (
        rebuild(BASE, {b"IDAT": zlib.compress(RAW) + b"\0"}),
        "after the end of its compressed",
    ),
    "a stream without its Adler-32": (
        rebuild(BASE, {b"IDAT": zlib.compress(RAW)[:-4]}),
        "cut short",
    ),
    "a raw deflate stream": (
        rebuild(BASE, {b"IDAT": zlib.compress(RAW, wbits=-15)}),
        "corrupt",
    ),
    "a zlib dictionary": (
        rebuild(BASE, {b"IDAT": (c := zlib.compressobj(zdict=b"x")).compress(RAW) + c.flush()}),
        "corrupt",
    ),
    "no IEND": (BASE.removesuffix(IEND), "ends before its IEND"),
    "an IEND with data": (BASE.removesuffix(IEND) + chunk(b"IEND", b"x"), "IEND chunk of 1"),
    "no IDAT": (rebuild(BASE, {b"IDAT": None}), "no IDAT"),
    "IDAT first": (SIGNATURE + chunk(b"IDAT", b"") + BASE[8:], "not IHDR"),
    "a second IHDR": (with_chunk_before_iend(BASE, chunk(b"IHDR", ihdr(17, 11, 8, 2))), "second"),
    "an IHDR of 14 bytes": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 8, 2) + b"\0"}), "not 13"),
    "IDAT split": (
        rebuild(BASE, {b"IDAT": None}).removesuffix(IEND)
        + chunk(b"IDAT", zlib.compress(RAW)[:40])
        + chunk(b"tEXt", b"a\0b")
        + chunk(b"IDAT", zlib.compress(RAW)[40:])
        + IEND,
        "split",
    ),
    "an unknown critical chunk": (with_chunk_before_iend(BASE, chunk(b"ABCD", b"")), "ABCD"),
    "a chunk type not of letters": (with_chunk_before_iend(BASE, chunk(b"ab1d", b"")), "letters"),
    "a palette image without PLTE": (
        rebuild(make_png(5, 5, 8, 3), {b"PLTE": None}),
        "without a PLTE",
    ),
    "PLTE after the data": (
        with_chunk_before_iend(BASE, chunk(b"PLTE", bytes(48))),
        "PLTE chunk after",
    ),
    "RGB of 4 bits": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 4, 2)}), "no such PNG"),
    "colour type 5": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 8, 5)}), "no such PNG"),
    "compression method 1": (
        rebuild(BASE, {b"IHDR": ihdr(17, 11, 8, 2)[:10] + b"\x01\0\0"}),
        "unknown compression",
    ),
    "interlace method 2": (rebuild(BASE, {b"IHDR": ihdr(17, 11, 8, 2, 2)}), "unknown"),
    "width 0": (rebuild(BASE, {b"IHDR": ihdr(0, 11, 8, 2)}), "impossible size"),
    "a chunk over 2**31 bytes": (BASE[:33] + b"\x80\0\0\0IDAT" + BASE[41:], "over the PNG limit"),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_every_structural_mutation_is_refused_and_says_what(name: str) -> None:
    data, message = STRUCTURAL[name]
    with pytest.raises(ImageInvalid, match="does not decode") as info:
        inspect_image(data)
    assert message in str(info.value)


def test_a_bomb_is_stopped_as_soon_as_it_runs_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """16x16 pixels of header over 64 MB of zeros (64 KB compressed): refused after inflating no
    more than one piece past what the header allows; a header over Pillow's pixel limit is
    refused before anything is inflated, as a decompression bomb."""
    bomb = rebuild(make_png(16, 16, 8, 0), {b"IDAT": zlib.compress(bytes(64 << 20), 9)})
    inflated: list[int] = []
    real_take = pngcheck._Inflater._take

    def take(self: pngcheck._Inflater, out: bytes) -> None:
        inflated.append(len(out))
        real_take(self, out)

    monkeypatch.setattr(pngcheck._Inflater, "_take", take)
    with pytest.raises(ImageInvalid, match="more than the 272 bytes"):
        inspect_image(bomb)
    assert inflated == [pngcheck.INFLATE_BYTES]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 255)
    inflated.clear()
    with pytest.raises(ImageInvalid, match="decompression bomb: 16x16 is over the limit of 255"):
        inspect_image(make_png(16, 16, 8, 0))
    assert inflated == []


def test_a_file_is_read_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pngcheck, "READ_BYTES", 100)
    path = tmp_path / "noise.png"
    path.write_bytes(noise_png_b64(64, 40)[0])  # one IDAT of ~7.7 KB: read 100 bytes at a time
    reads: list[int] = []
    real_read = io.BufferedReader.read

    class Counting(io.BufferedReader):
        def read(self, size: int | None = -1, /) -> bytes:
            reads.append(-1 if size is None else size)
            return real_read(self, size)

    with Counting(io.FileIO(path)) as f:
        assert pngcheck.check_png(f) == (64, 40)
    assert max(reads) == 100 and -1 not in reads


def test_the_emulator_faults_are_refused(tmp_path: Path) -> None:
    """``badsize``: a good image 16 pixels wider than asked; ``badb64`` from a CDN: a page of
    HTML; ``truncate``: the answer cut in half (as the client would keep it, were the body's end
    not checked)."""
    png = noise_png_b64(96, 64)[0]
    with pytest.raises(WrongSize, match="is 112x64, but 96x64 was requested"):
        inspect_image(noise_png_b64(96 + 16, 64)[0], (96, 64))
    with pytest.raises(ImageInvalid, match="not a png"):
        inspect_image(b"<html><body>this is not an image</body></html>")
    half = tmp_path / "half.png"
    half.write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageInvalid, match="cut short inside a IDAT chunk"):
        inspect_image(half, (96, 64))
