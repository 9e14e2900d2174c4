"""Provenance written into every image: its job id, prompt, model and size, so an image found
alone can be traced back to the manifest row and the run that made it.

The metadata is added to the container without re-encoding the pixels:

- PNG: one ``iTXt`` chunk (UTF-8 text) per field, before ``IEND``; Pillow shows them in
  ``Image.open(path).text``.
- JPEG: a ``COM`` segment after SOI holding the fields as JSON; Pillow: ``info["comment"]``.
- WebP: an ``XMP `` chunk (the container is promoted to the extended ``VP8X`` form when it is a
  simple one); Pillow: ``info["xmp"]``.

A 4K image is tens of MB, so the edit is worked out from a few headers read from the file
(:func:`provenance_splices`) as a short list of :class:`Splice` s, which
:func:`runner.images.files.write_atomic_copy` applies while it streams the file to its final place.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import BinaryIO, NamedTuple
from xml.sax.saxutils import quoteattr

from runner.provider import ImageFormat

SOFTWARE = "image-runner"
XMP_NAMESPACE = "https://image-runner.invalid/ns/1.0/"
_JPEG_COMMENT_MAX = 65533


class Splice(NamedTuple):
    """One edit of a file: at ``offset``, ``remove`` bytes of it are replaced by ``insert``."""

    offset: int
    remove: int
    insert: bytes


def provenance_splices(f: BinaryIO, fmt: ImageFormat, fields: Mapping[str, str]) -> list[Splice]:
    """The edits, in file order, that embed ``fields`` into the verified image open as ``f``
    (seekable); raise ``ValueError`` or ``struct.error`` for a container they cannot handle."""
    if fmt == "png":
        return _png(f, {**fields, "Software": SOFTWARE})
    if fmt == "jpeg":
        return _jpeg({**fields, "software": SOFTWARE})
    return _webp(f, fields)


def add_provenance(data: bytes, fmt: ImageFormat, fields: Mapping[str, str]) -> bytes:
    """``data`` with ``fields`` embedded as metadata; ``data`` must be a verified image."""
    return apply_splices(data, provenance_splices(io.BytesIO(data), fmt, fields))


def apply_splices(data: bytes, splices: Sequence[Splice]) -> bytes:
    out, pos = bytearray(), 0
    for offset, remove, insert in splices:
        out += data[pos:offset]
        out += insert
        pos = offset + remove
    out += data[pos:]
    return bytes(out)


def _png(f: BinaryIO, fields: Mapping[str, str]) -> list[Splice]:
    chunks = b"".join(
        _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
        for key, value in fields.items()
    )
    return [Splice(_png_iend_offset(f), 0, chunks)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_iend_offset(f: BinaryIO) -> int:
    offset = 8  # the signature
    while True:  # chunk headers only: the walk reads 8 bytes per chunk, never the pixels
        f.seek(offset)
        header = f.read(8)
        if len(header) < 8:
            raise ValueError("a PNG without an IEND chunk")
        (length,) = struct.unpack(">I", header[:4])
        if header[4:] == b"IEND":
            return offset
        offset += 12 + length


def _jpeg(fields: Mapping[str, str]) -> list[Splice]:
    text = json.dumps(dict(fields), ensure_ascii=False).encode("utf-8")
    if len(text) > _JPEG_COMMENT_MAX:
        short = {**fields, "prompt": fields.get("prompt", "")[:8000] + "..."}
        text = json.dumps(short, ensure_ascii=False).encode("utf-8")[:_JPEG_COMMENT_MAX]
    segment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    return [Splice(2, 0, segment)]  # right after SOI


def _webp(f: BinaryIO, fields: Mapping[str, str]) -> list[Splice]:
    attributes = " ".join(f"ir:{key}={quoteattr(value)}" for key, value in fields.items())
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:ir="{XMP_NAMESPACE}" ir:software="{SOFTWARE}" {attributes}/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()
    file_size = f.seek(0, io.SEEK_END)
    f.seek(12)  # after "RIFF" size "WEBP": the first chunk, its header and enough of its payload
    first = f.read(30)
    kind = first[:4]
    splices = []
    if kind == b"VP8X":
        flags = first[8] | 0x04  # XMP present
        splices.append(Splice(20, 1, bytes([flags])))
    else:
        width, height, alpha = _webp_canvas(kind, first[8:])
        flags = 0x04 | (0x10 if alpha else 0)
        header = bytes([flags, 0, 0, 0]) + _u24(width - 1) + _u24(height - 1)
        splices.append(Splice(12, 0, b"VP8X" + struct.pack("<I", len(header)) + header))
    tail = b"XMP " + struct.pack("<I", len(xmp)) + xmp + (b"\0" if len(xmp) % 2 else b"")
    splices.append(Splice(file_size, 0, tail))
    grown = sum(len(s.insert) - s.remove for s in splices)
    riff_size = struct.pack("<I", file_size + grown - 8)
    return [Splice(4, 4, riff_size), *splices]


def _webp_canvas(kind: bytes, payload: bytes) -> tuple[int, int, bool]:
    if kind == b"VP8 ":  # lossy: frame tag (3), start code (3), then 14-bit sizes
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if kind == b"VP8L":  # lossless: signature byte, then 14+14 bits of size, alpha bit
        (bits,) = struct.unpack("<I", payload[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    raise ValueError(f"an unknown WebP chunk {kind!r}")


def _u24(value: int) -> bytes:
    return struct.pack("<I", value)[:3]
