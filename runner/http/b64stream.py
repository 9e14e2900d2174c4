"""Streaming decode of an images API answer: the base64 image goes to a file as it arrives.

A 4K image comes back as ~33 MB of JSON, nearly all of it one string, ``data[0].b64_json``.
Reading the body whole, parsing it and decoding it costs several copies of that per request in
flight. :class:`B64JsonScanner` is fed the body chunk by chunk instead and splits it in two:

- the image string is unescaped (every JSON escape, ``\\u002B`` as .NET writes "+" too, even
  one cut in two by a chunk boundary), stripped of its optional ``data:<mime>;base64,`` prefix
  and of whitespace (space, tab, CR, LF: base64 decoders conventionally ignore it), and decoded
  with ``binascii.a2b_base64(strict_mode=True)`` in 4-aligned pieces straight into a binary sink
  (a temp file);
- everything else, the *skeleton* (the same JSON with that string replaced by ``""``), is kept
  and parsed with :func:`json.loads` at the end, for ``usage`` or ``data[0].url``. It is small,
  so it is capped (:data:`SKELETON_MAX_BYTES`): other long strings count against it.

The scanner does not validate JSON itself: it follows only what it needs to find the image
string (strings, brackets, commas, the keys on the path ``data`` / ``0`` / ``b64_json``), and
leaves validation to :func:`json.loads` on the skeleton. Emptying one string cannot make invalid
JSON valid, so nothing malformed slips through. String boundaries are found with ``bytes.find``
and regular expressions, escapes are decoded by the :mod:`json` module's C string scanner (only
in a piece that holds a backslash) and whitespace is removed with ``bytes.translate``, never a
Python loop per character: plain base64 costs a scan for a backslash and for whitespace before
it is decoded. No buffer grows beyond about one chunk. Any problem is a
:class:`B64StreamError`.
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any, Final, Literal, Protocol

from runner.stages import timed

SKELETON_MAX_BYTES: Final = 1 << 20
MAX_DEPTH: Final = 64  # API answers nest 3 deep; refuse absurd nesting before it costs memory
PREFIX_MAX_BYTES: Final = 256

_STRUCTURAL: Final = re.compile(rb'[{}\[\]:,"]')
# The body of a JSON string up to its closing quote, a lone trailing backslash or the end.
_STRING_BODY: Final = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_PATH: Final = ("data", 0, "b64_json")
_WHITESPACE: Final = b" \t\r\n"
# Decodes the escapes of a piece of the image string in C; literal control characters pass.
_JSON_STRING: Final = json.JSONDecoder(strict=False)
_LONGEST_ESCAPE: Final = len(b"\\u002B")


class B64StreamError(ValueError):
    """The body is not a JSON answer whose ``data[0].b64_json`` is valid base64."""


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Frame:
    """One open container: an object (with the key whose value comes next) or an array."""

    __slots__ = ("expect_key", "index", "is_object", "key")

    def __init__(self, is_object: bool) -> None:
        self.is_object = is_object
        self.expect_key = is_object
        self.key: str | None = None
        self.index = 0


class B64JsonScanner:
    """Feed with :meth:`feed`, then call :meth:`finish` for the parsed skeleton.

    ``image_bytes`` counts what went to the sink; ``found`` says whether the body had a
    ``data[0].b64_json`` string at all (a ``url`` answer has none).
    """

    def __init__(self, sink: Sink, *, skeleton_max_bytes: int = SKELETON_MAX_BYTES) -> None:
        self.sink = sink
        self.skeleton_max_bytes = skeleton_max_bytes
        self.image_bytes = 0
        self.found = False
        self._skeleton = bytearray()
        self._stack: list[_Frame] = []
        self._string: Literal["key", "value", "image"] | None = None  # inside a string
        self._escape = False  # a key or value string's chunk ended right after a backslash
        self._key_raw = bytearray()
        # The image string, stage by stage: an escape cut by the chunk boundary, held back; the
        # undecided start (None once the prefix question is settled); the base64 characters
        # short of a group of 4.
        self._carry = b""
        self._head: bytearray | None = None
        self._tail = b""
        self._padded = False

    def feed(self, chunk: bytes) -> None:
        with timed("b64 stream"):
            pos, end = 0, len(chunk)
            while pos < end:
                if self._string == "image":
                    pos = self._feed_image(chunk, pos)
                elif self._string is not None:
                    pos = self._feed_string(chunk, pos)
                else:
                    pos = self._feed_structure(chunk, pos)

    def finish(self) -> Any:
        """The skeleton, parsed; raise :class:`B64StreamError` if the body was cut short or is
        not JSON."""
        if self._string is not None or self._stack:
            raise B64StreamError("the JSON body is truncated")
        if not self._skeleton.strip():
            raise B64StreamError("the body is empty")
        try:
            return json.loads(self._skeleton)
        except (ValueError, RecursionError):
            raise B64StreamError("malformed JSON") from None

    # --- outside strings ----------------------------------------------------------------------

    def _feed_structure(self, chunk: bytes, pos: int) -> int:
        match = _STRUCTURAL.search(chunk, pos)
        if match is None:
            self._keep(chunk[pos:])
            return len(chunk)
        at = match.start()
        self._keep(chunk[pos : at + 1])
        char = chunk[at]
        stack = self._stack
        if char in b"{[":
            if len(stack) >= MAX_DEPTH:
                raise B64StreamError("JSON nested too deeply")
            stack.append(_Frame(char == ord("{")))
        elif char in b"}]":
            if not stack:
                raise B64StreamError("malformed JSON")
            stack.pop()
        elif char == ord(","):
            if stack and stack[-1].is_object:
                stack[-1].expect_key, stack[-1].key = True, None
            elif stack:
                stack[-1].index += 1
        elif char == ord('"'):
            if stack and stack[-1].expect_key:
                self._string = "key"
                self._key_raw.clear()
            elif self._at_image():
                if self.found:
                    raise B64StreamError("more than one data[0].b64_json")
                self._string = "image"
                self._head = bytearray()
            else:
                self._string = "value"
        return at + 1  # ":" changes nothing: a key already turned its object to "value next"

    def _at_image(self) -> bool:
        stack = self._stack
        return (
            len(stack) == 3
            and stack[0].is_object
            and stack[0].key == _PATH[0]
            and not stack[1].is_object
            and stack[1].index == _PATH[1]
            and stack[2].is_object
            and stack[2].key == _PATH[2]
        )

    def _keep(self, data: bytes) -> None:
        self._skeleton += data
        if len(self._skeleton) > self.skeleton_max_bytes:
            raise B64StreamError(
                f"the JSON besides the image is over {self.skeleton_max_bytes} bytes"
            )

    # --- keys and other strings: kept in the skeleton -----------------------------------------

    def _feed_string(self, chunk: bytes, pos: int) -> int:
        start = pos
        if self._escape:  # the character after a backslash that ended the previous chunk
            self._escape = False
            pos += 1
        match = _STRING_BODY.match(chunk, pos)
        assert match is not None  # the pattern matches the empty string
        at = match.end()
        closed = at < len(chunk) and chunk[at] == ord('"')
        if at < len(chunk) and not closed:  # a backslash, the last byte of the chunk
            self._escape = True
            at += 1
        piece = chunk[start : at + 1 if closed else at]
        self._keep(piece)
        if self._string == "key":
            self._key_raw += piece
        if closed:
            if self._string == "key":
                self._end_key()
            self._string = None
        return at + 1 if closed else at

    def _end_key(self) -> None:
        try:
            key = json.loads(b'"' + self._key_raw)  # the closing quote is in _key_raw
        except ValueError:
            raise B64StreamError("malformed JSON: a bad key") from None
        frame = self._stack[-1]
        frame.key, frame.expect_key = key, False

    # --- the image string: streamed to the sink -----------------------------------------------

    def _feed_image(self, chunk: bytes, pos: int) -> int:
        # The first quote ends the string: an escaped one would not be base64 anyway, and
        # _unescape refuses the backslash it leaves at the end.
        quote = chunk.find(b'"', pos)
        final = quote >= 0
        piece = chunk[pos:quote] if final else chunk[pos:]
        if self._carry:
            piece, self._carry = self._carry + piece, b""
        if b"\\" in piece:
            piece, self._carry = _unescape(piece, final=final)
        self._text(piece)
        if not final:
            return len(chunk)
        self._end_image()
        self._keep(b'"')
        self._string = None
        return quote + 1

    def _text(self, text: bytes) -> None:
        """Unescaped characters of the image string: settle the prefix, then decode."""
        if self._head is not None:
            self._head += text
            head = self._head
            if len(head) < 5 and b"data:".startswith(head):
                return  # too short to tell yet
            if head.startswith(b"data:"):
                comma = head.find(b",")
                if comma < 0:
                    if len(head) > PREFIX_MAX_BYTES:
                        raise B64StreamError("a data: prefix without a comma")
                    return
                if not head[:comma].endswith(b";base64"):
                    raise B64StreamError("a data: prefix that is not ;base64")
                text = bytes(head[comma + 1 :])
            else:
                text = bytes(head)
            self._head = None
        self._decode(text)

    def _decode(self, text: bytes) -> None:
        if b" " in text or b"\n" in text or b"\r" in text or b"\t" in text:
            text = text.translate(None, _WHITESPACE)
        if not text:
            return
        if self._padded:
            raise B64StreamError("malformed base64: data after its padding")
        if self._tail:
            text = self._tail + text
        cut = len(text) - len(text) % 4
        if cut:
            try:
                data = binascii.a2b_base64(memoryview(text)[:cut], strict_mode=True)
            except binascii.Error as exc:
                raise B64StreamError(f"malformed base64: {exc}") from None
            self._padded = text[cut - 1] == ord("=")
            self.sink.write(data)
            self.image_bytes += len(data)
        self._tail = text[cut:]

    def _end_image(self) -> None:
        if self._head is not None:  # a string too short to have settled the prefix
            head, self._head = bytes(self._head), None
            if head.startswith(b"data:"):
                raise B64StreamError("a data: prefix without base64 after it")
            self._decode(head)
        if self._tail:
            raise B64StreamError("malformed base64: its length is not a multiple of 4")
        self.found = True


def _unescape(piece: bytes, *, final: bool) -> tuple[bytes, bytes]:
    """Decode the JSON escapes of a piece of the image string that starts outside any escape.

    Return the text and the start of an escape cut off by the piece's end, to be completed by
    the next chunk; at the end of the string (``final``) that is an error. What an escape
    decodes to is judged like any other character: ``\\"`` and ``\\\\`` are not base64, and
    neither is anything beyond ASCII.
    """
    last = piece.rfind(b"\\")
    # Two backslashes in a row always hold an escaped backslash, never base64. Without them,
    # the last backslash starts an escape (none has a backslash inside it).
    if last > 0 and piece[last - 1] == ord("\\"):
        raise _bad_escape()
    rest = b""
    if len(piece) - last < _LONGEST_ESCAPE and (
        last == len(piece) - 1 or piece[last + 1] == ord("u")
    ):
        if final:
            raise _bad_escape()
        piece, rest = piece[:last], piece[last:]
    try:
        text = piece.decode("ascii")
    except UnicodeDecodeError:
        raise B64StreamError("malformed base64: a character that is not ASCII") from None
    try:  # the piece holds no quote: it ends before the first one
        decoded: str = _JSON_STRING.decode('"' + text + '"')
        return decoded.encode("ascii"), rest
    except ValueError:  # an unknown escape, or one of a character beyond ASCII
        raise _bad_escape() from None


def _bad_escape() -> B64StreamError:
    return B64StreamError("malformed base64: an escape that is not base64")
