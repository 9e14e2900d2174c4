"""Provenance written into every image: its job id, prompt, model and size, so an image found
alone can be traced back to the manifest row and the run that made it.

The metadata is added to the container without re-encoding the pixels:

- PNG: one ``iTXt`` chunk (UTF-8 text) per field, before ``IEND``; Pillow shows them in
  ``Image.open(path).text``.
- JPEG: a ``COM`` segment after SOI holding the fields as JSON; Pillow: ``info["comment"]``.
- WebP: an ``XMP `` chunk (the container is promoted to the extended ``VP8X`` form when it is a
  simple one); Pillow: ``info["xmp"]``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

from runner.api import ImageFormat

SOFTWARE = "image-runner"
XMP_NAMESPACE = "https://image-runner.invalid/ns/1.0/"
_JPEG_COMMENT_MAX = 65533


def add_provenance(data: bytes, fmt: ImageFormat, fields: Mapping[str, str]) -> bytes:
    """``data`` with ``fields`` embedded as metadata; ``data`` must be a verified image."""
    if fmt == "png":
        return _png(data, {**fields, "Software": SOFTWARE})
    if fmt == "jpeg":
        return _jpeg(data, {**fields, "software": SOFTWARE})
    return _webp(data, fields)


def _png(data: bytes, fields: Mapping[str, str]) -> bytes:
    chunks = b"".join(
        _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
        for key, value in fields.items()
    )
    iend = _png_iend_offset(data)
    return data[:iend] + chunks + data[iend:]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_iend_offset(data: bytes) -> int:
    offset = 8  # the signature
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        if data[offset + 4 : offset + 8] == b"IEND":
            return offset
        offset += 12 + length
    raise ValueError("a PNG without an IEND chunk")


def _jpeg(data: bytes, fields: Mapping[str, str]) -> bytes:
    text = json.dumps(dict(fields), ensure_ascii=False).encode("utf-8")
    if len(text) > _JPEG_COMMENT_MAX:
        short = {**fields, "prompt": fields.get("prompt", "")[:8000] + "..."}
        text = json.dumps(short, ensure_ascii=False).encode("utf-8")[:_JPEG_COMMENT_MAX]
    segment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    return data[:2] + segment + data[2:]  # right after SOI


def _webp(data: bytes, fields: Mapping[str, str]) -> bytes:
    attributes = " ".join(f"ir:{key}={quoteattr(value)}" for key, value in fields.items())
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:ir="{XMP_NAMESPACE}" ir:software="{SOFTWARE}" {attributes}/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()
    body = data[12:]  # after "RIFF" size "WEBP"
    kind = body[:4]
    if kind == b"VP8X":
        flags = body[8] | 0x04  # XMP present
        body = body[:8] + bytes([flags]) + body[9:]
    else:
        width, height, alpha = _webp_canvas(kind, body[8:])
        flags = 0x04 | (0x10 if alpha else 0)
        header = bytes([flags, 0, 0, 0]) + _u24(width - 1) + _u24(height - 1)
        body = b"VP8X" + struct.pack("<I", len(header)) + header + body
    body += b"XMP " + struct.pack("<I", len(xmp)) + xmp + (b"\0" if len(xmp) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


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
