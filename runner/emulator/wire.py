"""How the emulator's answers go on the wire: a big body in slices, cut short, or a connection
closed or reset; and base64 written as some serializers write it.

A success's body is sent as the chunks the server renders: the JSON around the image, and the
image's base64, which for ``payload="noise"`` is the one cached copy of that size's. Sixteen
33 MB answers in flight thus cost no 33 MB copy each, only the socket buffers.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Final

from aiohttp import web

_WRITE_SLICE_BYTES: Final = 1024 * 1024  # what one write hands the socket buffer, at most


async def send_chunks(
    request: web.Request,
    chunks: tuple[bytes, ...],
    headers: Mapping[str, str],
    *,
    cut_after_bytes: int | None = None,
) -> web.StreamResponse:
    """Send a JSON body given in chunks, a slice at a time, so no chunk is copied whole.

    ``cut_after_bytes``: announce the full length, send that many bytes, close the connection.
    """
    total_bytes = sum(map(len, chunks))
    response = web.StreamResponse(headers=headers)
    response.content_type = "application/json"
    response.content_length = total_bytes
    await response.prepare(request)
    left_bytes = total_bytes if cut_after_bytes is None else cut_after_bytes
    try:
        for chunk in chunks:
            view = memoryview(chunk)[:left_bytes]
            left_bytes -= len(view)
            for start in range(0, len(view), _WRITE_SLICE_BYTES):
                await response.write(view[start : start + _WRITE_SLICE_BYTES])
        if cut_after_bytes is None:
            await response.write_eof()
    except ConnectionResetError:  # the client went away; nothing left to tell it
        return response
    if cut_after_bytes is not None:
        close_connection(request, reset=False)
    return response


def close_connection(request: web.Request, *, reset: bool) -> None:
    """End the request's connection without an answer, or after a cut one: ``reset`` makes the
    client read a reset (``"reset"``), else an early end of the stream (``"drop"``, a cut)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if reset and sock is not None:
        # Linger 0 turns the close into a TCP RST: the client reads ECONNRESET, not EOF.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def escaped_b64(b64: bytes) -> bytes:
    """The same base64 as a .NET serializer or a gateway may write it: ``+`` as ``\\u002B``,
    ``/`` as ``\\/`` or ``\\u002F``, and a space every 76 characters. Valid JSON, and the same
    base64 to a decoder that follows JSON and the base64 spec."""
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    text = b" ".join(lines).replace(b"+", b"\\u002B").replace(b"/", b"\\/")
    return text.replace(b"\\/", b"\\u002F", 3)
