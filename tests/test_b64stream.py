"""The streaming scanner on its own: every body is fed whole, byte by byte, in 2-, 3- and 7-byte
chunks and at random cuts, so chunk boundaries fall inside keys, escapes, the ``data:`` prefix
and base64 groups; it must decode the same image and keep the same skeleton every time, and
refuse what is not valid base64 or JSON."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runner.b64stream import B64JsonScanner, B64StreamError

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
    ],
    ids=["prefix", "plain", "escaped-slash", "wrapped", "webp", "indented", "spaces", "key-esc"],
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
        (PREFIX + B64 + " ", "malformed base64"),
        ("QUE=QUFB", "malformed base64: .*after (its )?padding"),
        ("QQ==QQ==", "malformed base64: .*after (its )?padding"),
        ("Q===", "malformed base64"),
        ("=AAA", "malformed base64"),
        ("QUE", "multiple of 4"),
        (B64[:-1], "multiple of 4"),
        ("QUFB\tQUFB", "an escape that is not base64"),
        ("QUFB\\QUFB", "an escape that is not base64"),
        ("QUFB\\nQUFB", "an escape that is not base64"),  # JSON: backslash, "n"
        ('QUFB"QUFB', "an escape that is not base64"),
        ("QUFBQ\u00e9FB", "an escape that is not base64"),  # json.dumps escapes it as \u00e9
        ("data:image/png;base64", "without base64"),
        ("data:image/png," + B64, "not ;base64"),
        ("data:" + "x" * 300 + B64, "without a comma"),
    ],
)
def test_what_is_not_strict_base64_is_refused(split: int | str, value: str, message: str) -> None:
    with pytest.raises(B64StreamError, match=message):
        scan(body_of(value), split)


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


def test_35_mb_goes_through_well_under_a_second() -> None:
    raw = os.urandom(26_000_000)
    body = body_of(PREFIX + base64.b64encode(raw).decode())  # ~35 MB

    class Discard:
        size_bytes = 0

        def write(self, data: bytes) -> None:
            self.size_bytes += len(data)

    sink = Discard()
    started = time.perf_counter()
    scanner = B64JsonScanner(sink)
    for offset in range(0, len(body), 1 << 18):
        scanner.feed(body[offset : offset + (1 << 18)])
    scanner.finish()
    elapsed_s = time.perf_counter() - started
    assert sink.size_bytes == len(raw)
    assert elapsed_s < 1.0, f"{elapsed_s:.2f} s"
