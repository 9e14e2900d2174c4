"""The streaming scanner: every body is fed whole, byte by byte, in 2-, 3- and 7-byte chunks and
at random cuts (short ones also in two pieces cut at every byte), so chunk boundaries fall inside
keys, JSON escapes, the ``data:`` prefix and base64 groups; it must decode the same image and
keep the same skeleton every time, and refuse what is not valid base64 or JSON. Last, the whole
runner against a real server that writes its base64 the way .NET does (``\\u002B``), spaced."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pandas as pd
import pytest
from aiohttp import web
from PIL import Image

from runner.http import b64stream
from runner.http.b64stream import B64JsonScanner, B64StreamError
from tests.conftest import db_rows, run_manifest, serve_app, write_manifest

RAW = bytes(range(256)) * 3 + b"\xff\xfe"  # every byte value, and "/" and "+" in the base64
B64 = base64.b64encode(RAW).decode()
PREFIX = "data:image/png;base64,"
SPLITS: list[int | str] = ["whole", 1, 2, 3, 7, "random"]


def chunks(body: bytes, split: int | str, seed: int = 0) -> Iterator[bytes]:
    if split == "whole":
        yield body
        return
    if split == "random":
        rng = random.Random(seed)
        cuts = sorted({0, len(body), *(rng.randrange(len(body) + 1) for _ in range(40))})
        for start, end in itertools.pairwise(cuts):
            yield body[start:end]
        return
    assert isinstance(split, int)
    for start in range(0, len(body), split):
        yield body[start : start + split]


def scan(
    body: bytes, split: int | str = "whole", skeleton_max_bytes: int = 1 << 20
) -> tuple[bytes, Any, bool]:
    """(what went to the sink, the parsed skeleton, whether the image string was found)"""
    sink = io.BytesIO()
    scanner = B64JsonScanner(sink, skeleton_max_bytes=skeleton_max_bytes)
    for chunk in chunks(body, split):
        scanner.feed(chunk)
    skeleton = scanner.finish()
    assert scanner.image_bytes == len(sink.getvalue())
    return sink.getvalue(), skeleton, scanner.found


def body_of(value: str, **extra: Any) -> bytes:
    return json.dumps({"created": 1, "data": [{"b64_json": value}], **extra}).encode()


def raw_body(value: str) -> bytes:
    """A body whose image string is ``value`` as written: its escapes are not escaped again."""
    return b'{"created": 1, "data": [{"b64_json": "' + value.encode() + b'"}]}'


def dotnet(b64: str, *, lower: bool = False) -> str:
    """``b64`` as System.Text.Json writes it: "+" (and here "/" and "=") as \\uXXXX escapes."""
    escapes = {"+": "\\u002B", "/": "\\u002F", "=": "\\u003D"}
    for char, escape in escapes.items():
        b64 = b64.replace(char, escape.lower() if lower else escape)
    return b64


def escape_all(text: str) -> str:
    return "".join(f"\\u{ord(char):04X}" for char in text)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    "body",
    [
        body_of(PREFIX + B64),
        body_of(B64),  # plain OpenAI: no prefix
        body_of(PREFIX + B64).replace(b"/", b"\\/"),  # escaped slashes, in the prefix too
        # a line-wrapped encoder: "\n" (and "\r\n") escapes every 76 characters
        body_of("\r\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))),
        body_of("data:image/webp;base64," + B64),
        json.dumps({"data": [{"b64_json": PREFIX + B64}]}, indent=2).encode(),
        b' \n{ "data" :\t[ { "b64_json"\r\n:\n"' + B64.encode() + b'" } ] }\n',
        b'{"data": [{"b64\\u005fjson": "' + B64.encode() + b'"}]}',  # an escaped key
        raw_body(PREFIX + dotnet(B64)),  # .NET and some gateways: "\u002B" for "+"
        raw_body(PREFIX + dotnet(B64, lower=True)),  # "\u002b", and "\u003d" for "="
        raw_body(escape_all(PREFIX + B64)),  # every character a \uXXXX, the prefix too
        raw_body("data\\u003Aimage\\/png\\u003bbase64\\u002C" + B64),  # an escaped prefix
        body_of(PREFIX + " ".join(B64[i : i + 60] for i in range(0, len(B64), 60)) + " "),
        body_of(" \t\n" + "\t".join(B64[i : i + 50] for i in range(0, len(B64), 50)) + "\r\n"),
        raw_body(PREFIX + "\r\n\t \\u0020".join(B64[i : i + 64] for i in range(0, len(B64), 64))),
        body_of(PREFIX + B64[:-1] + "\n ="),  # whitespace before the padding
    ],
    ids=[
        "prefix",
        "plain",
        "escaped-slash",
        "wrapped",
        "webp",
        "indented",
        "spaces",
        "key-esc",
        "dotnet",
        "dotnet-lower",
        "all-escaped",
        "escaped-prefix",
        "spaced",
        "tabbed",
        "literal-whitespace",
        "spaced-padding",
    ],
)
def test_the_image_is_decoded_at_every_chunking(body: bytes, split: int | str) -> None:
    image, skeleton, found = scan(body, split)
    assert found and image == RAW
    assert skeleton["data"][0]["b64_json"] == ""


@pytest.mark.parametrize("split", SPLITS)
def test_keys_in_any_order_and_the_rest_of_the_json_is_kept(split: int | str) -> None:
    prompt = 'a "quoted" \\ back\\slash, a tab\t, café \u2603 and a \\" fake end'
    body = (
        b'{"usage": {"input_tokens": 98, "output_tokens": 1185, "total_tokens": 1283},'
        b' "created": 1778037127, "data": [{"revised_prompt": '
        + json.dumps(prompt).encode()
        + b', "nested": {"b64_json": "QUFB"}, "b64_json": "'
        + (PREFIX + B64).encode()
        + b'", "list": [1, 2.5e3, true, false, null]}, {"b64_json": "QkJC"}]}'
    )
    image, skeleton, found = scan(body, split)
    assert found and image == RAW
    assert skeleton["usage"] == {"input_tokens": 98, "output_tokens": 1185, "total_tokens": 1283}
    item = skeleton["data"][0]
    assert item["revised_prompt"] == prompt
    assert item["nested"] == {"b64_json": "QUFB"}  # only data[0].b64_json is the image
    assert item["list"] == [1, 2500.0, True, False, None]
    assert skeleton["data"][1] == {"b64_json": "QkJC"}


@pytest.mark.parametrize("split", SPLITS)
def test_a_url_answer_has_no_image_and_keeps_its_url(split: int | str) -> None:
    body = b'{"data": [{"url": "https:\\/\\/cdn.example\\/a.png"}], "created": 1}'
    image, skeleton, found = scan(body, split)
    assert (image, found) == (b"", False)
    assert skeleton == {"data": [{"url": "https://cdn.example/a.png"}], "created": 1}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (PREFIX + "QUF*" + B64, "malformed base64"),
        ("QUE=QUFB", "malformed base64: .*after (its )?padding"),
        ("QQ==QQ==", "malformed base64: .*after (its )?padding"),
        ("Q===", "malformed base64"),
        ("=AAA", "malformed base64"),
        ("QUE", "multiple of 4"),
        (B64[:-1], "multiple of 4"),
        ("QUFB\\QUFB", "an escape that is not base64"),
        ("QUFB\\nQUFB", "an escape that is not base64"),  # JSON: backslash, "n"
        ('QUFB"QUFB', "an escape that is not base64"),
        ("QUFBQ\u00e9FB", "an escape that is not base64"),  # json.dumps escapes it as \u00e9
        ("data:image/png;base64", "without base64"),
        ("data:image/png," + B64, "not ;base64"),
        ("data:" + "x" * 300 + B64, "without a comma"),
        ("data:image/png; base64," + B64, "not ;base64"),  # whitespace is ignored in base64 only
        ("QQ==\nQQ==", "malformed base64: .*after (its )?padding"),
        ("QUFB\bQUFB", "malformed base64"),  # decoded, a control character
        ("QUFB\fQUFB", "malformed base64"),
        ("QUFB\x00QUFB", "malformed base64"),  # json.dumps writes \u0000
        ("QUFB\U0001f600QUFB", "an escape that is not base64"),  # a surrogate pair
    ],
)
def test_what_is_not_strict_base64_is_refused(split: int | str, value: str, message: str) -> None:
    with pytest.raises(B64StreamError, match=message):
        scan(body_of(value), split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("QUFB\\u0022QUFB", "malformed base64"),  # a quote, escaped another way
        ("QUFB\\u005CQUFB", "malformed base64"),  # a backslash, escaped another way
        ("QUFB\\u005C\\u002FQUFB", "malformed base64"),  # not an escaped "/" once decoded
        ("QUFB\\u00e9QUFB", "an escape that is not base64"),
        ("QUFB\\xQUFB", "an escape that is not base64"),
        ("QUFB\\u00G1QUFB", "an escape that is not base64"),
        ("QUFB\\u002", "an escape that is not base64"),  # cut short by the closing quote
        ("QUFB\\", "an escape that is not base64"),  # an escaped quote, the string goes on
        ("QUE\\u003DQUFB", "malformed base64: .*after (its )?padding"),
        ("QUFBQ\u00e9FB", "malformed base64"),  # non-ASCII as it is, in UTF-8
    ],
)
def test_escapes_that_are_not_base64_are_refused(
    split: int | str, value: str, message: str
) -> None:
    with pytest.raises(B64StreamError, match=message):
        scan(raw_body(value), split)


SHORT_RAW = b"\xfb\xff\xbf\xfe\xfb"  # its base64 holds "+", "/" and "="
SHORT = base64.b64encode(SHORT_RAW).decode()


@pytest.mark.parametrize(
    "value",
    [
        PREFIX + dotnet(SHORT),
        PREFIX.replace("/", "\\/") + SHORT.replace("/", "\\/"),
        escape_all(PREFIX + SHORT),
        "\\n " + "\\r\\n\\t".join(dotnet(char) for char in SHORT) + " \\u0020\t",
    ],
    ids=["dotnet", "escaped-slash", "all-escaped", "spaced"],
)
def test_escapes_and_whitespace_cut_at_every_byte(value: str) -> None:
    assert {"+", "/", "="} <= set(SHORT)
    body = raw_body(value)
    for cut in range(len(body) + 1):
        sink = io.BytesIO()
        scanner = B64JsonScanner(sink)
        scanner.feed(body[:cut])
        scanner.feed(body[cut:])
        scanner.finish()
        assert sink.getvalue() == SHORT_RAW, cut


@pytest.mark.parametrize("split", SPLITS)
def test_a_body_cut_anywhere_is_refused(split: int | str) -> None:
    body = body_of(PREFIX + B64, usage={"input_tokens": 1})
    for end in [*range(0, 60), *range(60, len(body), 41), *range(len(body) - 60, len(body))]:
        with pytest.raises(B64StreamError):
            scan(body[:end], split)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (body_of(B64) + b"}", "malformed JSON"),
        (b'{"data": [{"b64_json": "QUFB"}] "x": 1}', "malformed JSON"),
        (b'{"data": [{"b64_json": "QUFB"}]} {"data": [{"b64_json": "QUFB"}]}', "more than one"),
        (b'{"data": [{"b64_json": "QUFB", "b64_json": "QUFB"}]}', "more than one"),
        (b"not json", "malformed JSON"),
        (b"", "empty"),
        (b"]", "malformed JSON"),
        (b"[" * 100 + b"]" * 100, "nested too deeply"),
        (b'{"data": [{"b\\x": "QUFB"}]}', "a bad key"),
    ],
)
def test_what_is_not_json_is_refused(body: bytes, message: str) -> None:
    for split in SPLITS:
        with pytest.raises(B64StreamError, match=message):
            scan(body, split)


def test_the_skeleton_is_capped_and_long_strings_count() -> None:
    body = body_of(PREFIX + B64, revised_prompt="x" * 5000)
    assert scan(body, 7, skeleton_max_bytes=6000)[0] == RAW  # the image itself does not count
    with pytest.raises(B64StreamError, match="over 4000 bytes"):
        scan(body, 7, skeleton_max_bytes=4000)
    with pytest.raises(B64StreamError, match="over 4000 bytes"):  # an image not at data[0]
        scan(json.dumps({"data": {"b64_json": B64 * 10}}).encode(), 1000, 4000)


def python_lines_run(body: bytes, chunk_bytes: int) -> tuple[bytes, int]:
    """Feed ``body`` a chunk at a time; return the image and how many lines of
    :mod:`runner.http.b64stream` ran, as traced by :func:`sys.settrace`."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename != b64stream.__file__:
            return None

        def count(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal lines
            lines += event == "line"
            return count

        return count(frame, event, arg)

    sink = io.BytesIO()
    scanner = B64JsonScanner(sink)
    sys.settrace(trace)
    try:
        for offset in range(0, len(body), chunk_bytes):
            scanner.feed(body[offset : offset + chunk_bytes])
        scanner.finish()
    finally:
        sys.settrace(None)
    return sink.getvalue(), lines


@pytest.mark.parametrize(
    "encode",
    [
        lambda b64: PREFIX + b64,
        lambda b64: PREFIX + dotnet(b64),
        lambda b64: PREFIX + dotnet(b64, lower=True).replace("\\u002f", "\\/"),
        lambda b64: "\\r\\n ".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
    ],
    ids=["plain", "dotnet", "dotnet-lower", "wrapped"],
)
def test_python_work_is_per_chunk_not_per_character(encode: Callable[[str], str]) -> None:
    # How fast is for bench/; this is why it is fast: megabytes of base64, escaped the common
    # ways or not, cost a few dozen lines of Python per chunk, never a loop per character.
    raw = random.Random(3).randbytes(1_500_000)
    body = raw_body(encode(base64.b64encode(raw).decode()))  # 2 to 3 MB
    chunk_bytes = 1 << 16
    image, lines = python_lines_run(body, chunk_bytes)
    assert image == raw
    chunks = len(body) // chunk_bytes + 1
    assert lines < 100 * chunks, (lines, chunks)  # a chunk holds 65,536 characters
    assert python_lines_run(body, 1 << 12)[1] > lines  # the count does grow with the chunks


# --- the whole runner against a real server that writes its base64 escaped and spaced ---------


def png_of_a_size() -> bytes:
    """A 1280x544 PNG (one of the API's sizes) with a patch of noise."""
    image = Image.new("RGB", (1280, 544), "teal")
    image.paste(Image.frombytes("RGB", (64, 64), random.Random(5).randbytes(64 * 64 * 3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def test_an_escaped_spaced_answer_is_one_confirmed_image(tmp_path: Path) -> None:
    png = png_of_a_size()
    b64 = base64.b64encode(png).decode()
    assert "+" in b64 and "/" in b64
    lines = (dotnet(b64[i : i + 76]) for i in range(0, len(b64), 76))
    body = raw_body("data:image\\/png;base64," + " \\n".join(lines) + " ")
    # Pieces cut inside escapes ("\u00" | "2B...", "\" | "u002F...") and before the end.
    cuts = sorted({body.index(b"\\u002B") + 4, body.index(b"\\u002F") + 1, len(body) - 4})
    cuts = [0, *cuts, len(body)]
    requests = 0

    async def generate(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start, end in itertools.pairwise(cuts):
            await response.write(body[start:end])
            await asyncio.sleep(0.01)  # so that the client is likely to read them apart
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "escaped", "prompt": "noise"}])
    async with serve_app(app) as url:
        report = await run_manifest(manifest, out, f"{url}/v1")
    assert requests == 1
    assert report.ledger.totals.succeeded == 1
    assert db_rows(out, "SELECT state FROM attempts") == [("confirmed",)]
    assert list(pd.read_csv(out / "ledger.csv")["billing"]) == ["confirmed"]
    [saved] = (out / "images").glob("*.png")
    with Image.open(saved) as image, Image.open(io.BytesIO(png)) as sent:
        assert image.tobytes() == sent.tobytes()
