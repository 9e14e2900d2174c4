"""The emulator over real HTTP on loopback: validation, images, the CDN, faults and billing."""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image, UnidentifiedImageError

from runner.emulator import (
    BILLED_FAULTS,
    FAULT_KINDS,
    RATE_LIMITED,
    Emulator,
    EmulatorConfig,
    EmulatorThread,
)
from runner.emulator.bucket import TokenBucket, format_duration
from runner.provider import PRICE_PER_IMAGE_USD, SPEND_LIMIT_CODES
from tests.conftest import MakeEmulator

MODEL = "gpt-image-2-vip"
AUTH = {"Authorization": "Bearer sk-test"}
PREFIX = "data:image/png;base64,"
SMALL = "1280x544"


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_b64_json(value: str) -> Image.Image:
    assert value.startswith(PREFIX)
    return open_image(base64.b64decode(value.removeprefix(PREFIX), validate=True))


def gen_body(**changes: Any) -> dict[str, Any]:
    """A valid generations body; a change to None removes the field."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "a lighthouse at dusk", "size": SMALL}
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def edit_form(
    prompt: str, images: list[bytes], part_name: str = "image", **fields: str
) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", MODEL)
    form.add_field("prompt", prompt)
    for name, value in fields.items():
        form.add_field(name, value)
    for index, data in enumerate(images, 1):
        form.add_field(part_name, data, filename=f"ref{index}.png", content_type="image/png")
    return form


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as client:
        yield client


def gen_url(emulator: Emulator) -> str:
    return f"{emulator.base_url}/images/generations"


def edit_url(emulator: Emulator) -> str:
    return f"{emulator.base_url}/images/edits"


# --- successes ------------------------------------------------------------------------------


async def test_generation_b64_is_a_png_of_the_exact_size(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    body = gen_body(size="1280x720", response_format="b64_json")
    status, payload = await post_json(session, gen_url(emulator), body)

    assert status == 200
    assert isinstance(payload["created"], int)
    assert list(payload["data"][0]) == ["b64_json"]
    image = decode_b64_json(payload["data"][0]["b64_json"])
    assert (image.format, image.size) == ("PNG", (1280, 720))
    [bill] = emulator.bills
    assert (bill.seq, bill.endpoint, bill.size, bill.outcome) == (
        1,
        "generations",
        "1280x720",
        "ok",
    )
    assert bill.cost_usd == PRICE_PER_IMAGE_USD
    assert emulator.billed_usd == 0.03
    [record] = emulator.requests
    assert (record.size, record.response_format, record.status, record.fault) == (
        "1280x720",
        "b64_json",
        200,
        None,
    )


async def test_generation_defaults_to_url_and_the_cdn_serves_the_png(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, payload = await post_json(session, gen_url(emulator), gen_body())

    assert status == 200
    [item] = payload["data"]
    assert list(item) == ["url"]
    assert item["url"].startswith(emulator.base_url.removesuffix("/v1") + "/cdn/")
    async with session.get(item["url"]) as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        assert open_image(await response.read()).size == (1280, 544)
    assert emulator.requests[0].response_format is None


async def test_generation_without_size_renders_the_default_tier(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    body = gen_body(size=None, response_format="b64_json")
    _, payload = await post_json(session, gen_url(emulator), body)

    assert decode_b64_json(payload["data"][0]["b64_json"]).size == (1280, 1280)
    assert emulator.bills[0].size == "1280x1280"
    assert emulator.requests[0].size is None


async def test_unknown_json_fields_are_ignored(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, _ = await post_json(session, gen_url(emulator), gen_body(style="vivid", user="u1"))
    assert status == 200


async def test_cdn_answers_404_for_unknown_and_expired_images(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(cdn_ttl_s=0.3)
    _, payload = await post_json(session, gen_url(emulator), gen_body())
    url = payload["data"][0]["url"]
    async with session.get(url) as response:
        assert response.status == 200
    async with session.get(url.rsplit("/", 1)[0] + "/no-such-image.png") as response:
        assert response.status == 404
    await asyncio.sleep(0.4)
    async with session.get(url) as response:
        assert response.status == 404


async def test_latency_delays_every_response(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(latency_s=0.2)
    started = time.monotonic()
    status, _ = await post_json(session, gen_url(emulator), gen_body(size="2048X2048"))
    assert status == 400
    assert time.monotonic() - started >= 0.2


async def test_edit_records_three_image_parts_in_upload_order_with_usage(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    images = [image_bytes(64, 64), image_bytes(96, 64, "JPEG"), image_bytes(64, 96, "WEBP")]
    prompt = "Place the person from image1 into the scene of image2, in the style of image3"
    async with session.post(
        edit_url(emulator), data=edit_form(prompt, images, size=SMALL)
    ) as response:
        assert response.status == 200
        payload = await response.json()

    assert decode_b64_json(payload["data"][0]["b64_json"]).size == (1280, 544)
    [record] = emulator.requests
    assert record.endpoint == "edits"
    assert record.image_part_names == ("image", "image", "image")
    assert record.image_count == 3
    assert record.image_sizes == ("64x64", "96x64", "64x96")
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0

    async with session.post(
        edit_url(emulator), data=edit_form(prompt, images[:1], size=SMALL)
    ) as response:
        one_image_usage = (await response.json())["usage"]
    assert one_image_usage["input_tokens"] < usage["input_tokens"]
    assert [bill.endpoint for bill in emulator.bills] == ["edits", "edits"]


@pytest.mark.parametrize(
    ("prompt", "size_field", "expected"),
    [
        ("modify image2, change image2's outfit and hat to match image1", None, (1280, 1280)),
        ("put a hat on the person", "auto", (1280, 720)),
        ("edit image3: make it night, like image1", "auto", (1280, 544)),
        ("retouch image4, keep everything else", None, (2048, 2048)),
        ("modify image9", None, (1280, 720)),
    ],
)
async def test_edit_size_auto_follows_the_target_reference(
    emulator: Emulator,
    session: aiohttp.ClientSession,
    prompt: str,
    size_field: str | None,
    expected: tuple[int, int],
) -> None:
    # image1 16:9, image2 1:1, image3 21:9, image4 1:1 at about the 2K tier's area.
    images = [image_bytes(320, 180), image_bytes(100, 100), image_bytes(420, 180)]
    images.append(image_bytes(2000, 2000))
    fields = {} if size_field is None else {"size": size_field}
    async with session.post(edit_url(emulator), data=edit_form(prompt, images, **fields)) as resp:
        assert resp.status == 200
        payload = await resp.json()

    assert decode_b64_json(payload["data"][0]["b64_json"]).size == expected
    assert emulator.bills[0].size == "{}x{}".format(*expected)


async def test_b64_prefix_false_returns_bare_base64(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(b64_prefix=False)
    _, payload = await post_json(session, gen_url(emulator), gen_body(response_format="b64_json"))

    value = payload["data"][0]["b64_json"]
    assert not value.startswith("data:")
    assert open_image(base64.b64decode(value, validate=True)).size == (1280, 544)


# --- rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "status", "param", "code"),
    [
        ({"size": "2048X2048"}, 400, "size", "invalid_size"),
        ({"size": "2048\u00d72048"}, 400, "size", "invalid_size"),  # the Unicode sign
        ({"size": "auto"}, 400, "size", "invalid_size"),
        ({"size": "1024x1024"}, 400, "size", "invalid_size"),
        ({"n": 1}, 400, "n", "unsupported_parameter"),
        ({"quality": "high"}, 400, "quality", "unsupported_parameter"),
        ({"aspect_ratio": "16:9"}, 400, "aspect_ratio", "unsupported_parameter"),
        ({"prompt": None}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": "   "}, 400, "prompt", "missing_required_parameter"),
        ({"model": None}, 400, "model", "missing_required_parameter"),
        ({"model": "dall-e-3"}, 404, "model", "model_not_found"),
        ({"response_format": "png"}, 400, "response_format", "invalid_value"),
        ({"prompt": "a cat [[faults:nope]]"}, 400, "prompt", "invalid_fault_directive"),
    ],
)
async def test_generation_rejections(
    emulator: Emulator,
    session: aiohttp.ClientSession,
    changes: dict[str, Any],
    status: int,
    param: str,
    code: str,
) -> None:
    async with session.post(gen_url(emulator), json=gen_body(**changes)) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        error = (await response.json())["error"]

    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert emulator.bills == []
    assert [record.status for record in emulator.requests] == [status]


@pytest.mark.parametrize(
    ("images", "fields", "param", "code"),
    [
        ([], {}, "image", "missing_required_parameter"),
        ([b"GIF89a\x01\x00\x01\x00"], {}, "image", "invalid_image_format"),
        ([b"\x89PNG\r\n\x1a\nnot really a png"], {}, "image", "invalid_image"),
        ([image_bytes(8, 8)], {"size": "2048X2048"}, "size", "invalid_size"),
        ([image_bytes(8, 8)], {"n": "3"}, "n", "unsupported_parameter"),
    ],
)
async def test_edit_rejections(
    emulator: Emulator,
    session: aiohttp.ClientSession,
    images: list[bytes],
    fields: dict[str, str],
    param: str,
    code: str,
) -> None:
    form = edit_form("modify image1", images, **fields)
    async with session.post(edit_url(emulator), data=form) as response:
        assert response.status == 400
        error = (await response.json())["error"]

    assert (error["param"], error["code"]) == (param, code)
    assert emulator.bills == []
    assert emulator.requests[0].image_count == len(images)


async def test_edit_rejects_a_json_body(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    status, payload = await post_json(session, edit_url(emulator), gen_body())
    assert status == 400
    assert payload["error"]["code"] == "invalid_content_type"


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Basic c2stdGVzdA=="])
async def test_a_missing_key_is_401(emulator: Emulator, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(gen_url(emulator), json=gen_body()) as response,
    ):
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert emulator.bills == []


async def test_a_configured_key_must_match(make_emulator: MakeEmulator) -> None:
    emulator = await make_emulator(api_key="sk-right")
    for key, expected in [("sk-wrong", 401), ("sk-right", 200)]:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.post(gen_url(emulator), json=gen_body()) as response,
        ):
            assert response.status == expected
    assert len(emulator.bills) == 1


def test_config_rejects_unknown_fault_kinds() -> None:
    with pytest.raises(ValueError, match="bogus"):
        EmulatorConfig(fault_kinds=("429", "bogus"))
    with pytest.raises(ValueError, match="nope"):
        EmulatorConfig(script=("ok", "nope"))


# --- faults ---------------------------------------------------------------------------------

RETRY_AFTER = {"retry-after": "0.05", "retry-after-ms": "50"}
ERROR_FAULTS: dict[str, tuple[int, str | None, dict[str, str]]] = {
    "429": (429, "rate_limit_exceeded", RETRY_AFTER),
    "quota": (429, "insufficient_quota", {}),
    "401": (401, "invalid_api_key", {}),
    "403": (403, "permission_denied", {}),
    "500": (500, None, {}),
    "502": (502, None, {}),
    "503": (503, None, RETRY_AFTER),
    "504": (504, None, {}),
    "500_noretry": (500, None, {"x-should-retry": "false"}),
    "400_retry": (400, None, {"x-should-retry": "true"}),
    "policy": (400, "content_policy_violation", {}),
    "quota_chunked": (429, "insufficient_quota", {}),
    "policy_chunked": (400, "content_policy_violation", {}),
    "policy200": (200, "content_policy_violation", {}),
}


def test_every_fault_kind_is_tested_as_an_error_or_a_billed_fault() -> None:
    assert set(FAULT_KINDS) == {*ERROR_FAULTS, "drop", *BILLED_FAULTS}
    assert ERROR_FAULTS["quota"][1] in SPEND_LIMIT_CODES


@pytest.mark.parametrize("kind", list(ERROR_FAULTS))
async def test_error_faults_answer_their_status_and_are_not_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, kind: str
) -> None:
    status, code, headers = ERROR_FAULTS[kind]
    emulator = await make_emulator(script=(kind,))
    async with session.post(gen_url(emulator), json=gen_body()) as response:
        assert response.status == status
        for name, value in headers.items():
            assert response.headers[name] == value
        if kind == "502":
            assert response.content_type == "text/html"
        else:
            assert (await response.json())["error"]["code"] == code
    async with session.post(gen_url(emulator), json=gen_body()) as response:
        assert response.status == 200

    assert [(r.fault, r.status) for r in emulator.requests] == [(kind, status), (None, 200)]
    assert [(bill.seq, bill.outcome) for bill in emulator.bills] == [(2, "ok")]


@pytest.mark.parametrize("kind", ["quota_chunked", "policy_chunked"])
async def test_chunked_error_faults_send_their_body_in_pieces(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, kind: str
) -> None:
    emulator = await make_emulator(script=(kind,))
    async with session.post(gen_url(emulator), json=gen_body()) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        first = await response.content.readany()  # what a read of "what is there" gets
        rest = await response.content.read()
    assert b'"code"' not in first  # the code comes only in a later chunk
    assert json.loads(first + rest)["error"]["code"] == ERROR_FAULTS[kind][1]


async def test_drop_closes_the_connection_before_the_work_and_is_not_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("drop",))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_json(session, gen_url(emulator), gen_body())
    assert emulator.bills == []
    assert [(r.fault, r.status) for r in emulator.requests] == [("drop", 0)]


async def test_reset_is_a_connection_reset_after_the_work_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("reset",))
    with pytest.raises(aiohttp.ClientOSError) as caught:
        await post_json(session, gen_url(emulator), gen_body())
    assert caught.value.errno == errno.ECONNRESET
    assert [bill.outcome for bill in emulator.bills] == ["reset"]
    assert emulator.billed_usd == 0.03


async def test_truncate_sends_half_the_body_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("truncate",))
    async with session.post(gen_url(emulator), json=gen_body(response_format="b64_json")) as resp:
        assert resp.status == 200
        assert resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert [bill.outcome for bill in emulator.bills] == ["truncate"]


async def test_malformed_is_not_json_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("malformed",))
    async with session.post(gen_url(emulator), json=gen_body()) as response:
        assert response.status == 200
        text = await response.text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert [bill.outcome for bill in emulator.bills] == ["malformed"]


async def test_badb64_is_not_base64_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("badb64",))
    _, payload = await post_json(session, gen_url(emulator), gen_body(response_format="b64_json"))
    value = payload["data"][0]["b64_json"]
    assert value.startswith(PREFIX)
    with pytest.raises(binascii.Error):
        base64.b64decode(value.removeprefix(PREFIX), validate=True)
    assert [bill.outcome for bill in emulator.bills] == ["badb64"]


async def test_badb64_in_url_mode_serves_bytes_that_are_not_an_image(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("badb64",))
    _, payload = await post_json(session, gen_url(emulator), gen_body())
    async with session.get(payload["data"][0]["url"]) as response:
        assert response.status == 200
        data = await response.read()
    with pytest.raises(UnidentifiedImageError):
        open_image(data)
    assert [bill.outcome for bill in emulator.bills] == ["badb64"]


async def test_badsize_returns_a_png_of_the_wrong_width_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("badsize",))
    _, payload = await post_json(session, gen_url(emulator), gen_body(response_format="b64_json"))
    assert decode_b64_json(payload["data"][0]["b64_json"]).size == (1280 + 16, 544)
    assert [(bill.outcome, bill.size) for bill in emulator.bills] == [("badsize", SMALL)]


async def test_empty200_answers_no_image_and_is_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("empty200",))
    _, payload = await post_json(session, gen_url(emulator), gen_body(response_format="b64_json"))
    assert payload["data"] == []
    assert [bill.outcome for bill in emulator.bills] == ["empty200"]


async def test_escaped_b64_is_the_same_image_with_json_escapes_and_spaces(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("escaped_b64",))
    async with session.post(gen_url(emulator), json=gen_body(response_format="b64_json")) as r:
        raw = await r.read()
    assert b"\\u002B" in raw or b"\\u002F" in raw
    value = json.loads(raw)["data"][0]["b64_json"]
    assert " " in value
    assert decode_b64_json(value.replace(" ", "")).size == (1280, 544)
    assert [bill.outcome for bill in emulator.bills] == ["escaped_b64"]


@pytest.mark.parametrize(("kind", "failures"), [("cdn_flaky", 2), ("cdn_dead", 5)])
async def test_cdn_faults_fail_the_download_and_are_billed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, kind: str, failures: int
) -> None:
    emulator = await make_emulator(script=(kind,))
    _, payload = await post_json(session, gen_url(emulator), gen_body())
    url = payload["data"][0]["url"]
    for _ in range(failures):
        async with session.get(url) as response:
            assert response.status == 503
    async with session.get(url) as response:
        assert response.status == (200 if kind == "cdn_flaky" else 503)
    assert [bill.outcome for bill in emulator.bills] == [kind]


async def test_slow_times_the_client_out_after_billing(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("slow",), slow_s=0.3)
    with pytest.raises(TimeoutError):
        async with session.post(
            gen_url(emulator), json=gen_body(), timeout=aiohttp.ClientTimeout(total=0.1)
        ) as response:
            await response.read()
    assert [bill.outcome for bill in emulator.bills] == ["slow"]


async def test_slow_answers_normally_to_a_patient_client(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("slow",), slow_s=0.2)
    started = time.monotonic()
    status, _ = await post_json(session, gen_url(emulator), gen_body())
    assert status == 200
    assert time.monotonic() - started >= 0.2


async def test_directive_faults_follow_the_prompt_sequence(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    cat, dog = "a cat [[faults:503,reset]]", "a dog [[faults:ok,429]]"
    assert (await post_json(session, gen_url(emulator), gen_body(prompt=cat)))[0] == 503
    assert (await post_json(session, gen_url(emulator), gen_body(prompt=dog)))[0] == 200
    with pytest.raises(aiohttp.ClientOSError):
        await post_json(session, gen_url(emulator), gen_body(prompt=cat))
    assert (await post_json(session, gen_url(emulator), gen_body(prompt=cat)))[0] == 200
    assert (await post_json(session, gen_url(emulator), gen_body(prompt=dog)))[0] == 429

    assert [r.fault for r in emulator.requests] == ["503", None, "reset", None, "429"]
    assert [(bill.prompt, bill.outcome) for bill in emulator.bills] == [
        (dog, "ok"),
        (cat, "reset"),
        (cat, "ok"),
    ]


async def test_directives_are_exact_under_concurrency(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    prompts = ["red [[faults:500,500,500]]", "blue [[faults:policy]]"]
    bodies = [gen_body(prompt=prompts[i % 2], response_format="b64_json") for i in range(12)]
    results = await asyncio.gather(*(post_json(session, gen_url(emulator), b) for b in bodies))

    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 8 + [400] + [500] * 3
    assert len(emulator.bills) == 8
    assert emulator.billed_usd == 0.24


async def test_directives_win_over_the_random_fault_rate(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(fault_rate=1.0, fault_kinds=("500",))
    body = gen_body(prompt="steady [[faults:ok]]")
    assert (await post_json(session, gen_url(emulator), body))[0] == 200
    assert (await post_json(session, gen_url(emulator), gen_body()))[0] == 500


async def test_random_faults_are_reproducible_with_a_seed(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    async def faults(seed: int) -> list[str | None]:
        emulator = await make_emulator(
            seed=seed, fault_rate=0.5, fault_kinds=("429", "500", "policy")
        )
        for _ in range(30):
            await post_json(session, gen_url(emulator), gen_body(response_format="b64_json"))
        return [record.fault for record in emulator.requests]

    first, again, other = await faults(7), await faults(7), await faults(8)
    assert first == again
    assert first != other
    assert None in first
    assert {"429", "500", "policy"} <= set(first)


async def test_stats_endpoint_reports_the_books(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(script=("ok", "429"))
    await post_json(session, gen_url(emulator), gen_body())
    await post_json(session, gen_url(emulator), gen_body())
    stats_url = emulator.base_url.removesuffix("/v1") + "/_emulator/stats"
    async with session.get(stats_url) as response:
        stats = await response.json()

    assert (stats["requests"], stats["bills"], stats["billed_usd"]) == (2, 1, 0.03)
    assert stats["bill_records"][0]["outcome"] == "ok"
    assert [r["fault"] for r in stats["request_records"]] == [None, "429"]
    assert stats["request_records"][0]["image_part_names"] == []
    async with session.get(stats_url, params={"since": "1"}) as response:
        later = await response.json()
    assert (later["requests"], later["last_seq"], later["bill_records"]) == (2, 2, [])
    assert [r["seq"] for r in later["request_records"]] == [2]


def test_emulator_thread_serves_a_synchronous_client() -> None:
    body = json.dumps(gen_body(response_format="b64_json")).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    with EmulatorThread(EmulatorConfig(script=("429",))) as server:
        url = f"{server.base_url}/images/generations"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=5)
        caught.value.close()
        assert caught.value.code == 429
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=5) as resp:
            payload = json.load(resp)
    assert decode_b64_json(payload["data"][0]["b64_json"]).size == (1280, 544)
    assert [bill.outcome for bill in server.emulator.bills] == ["ok"]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=5)


# --- the rate limit -------------------------------------------------------------------------

LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")
LIMIT_HEADERS += ("x-ratelimit-reset-requests",)
RETRY_HEADERS = ("retry-after", "retry-after-ms")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0101, "11ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.9995, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3725.5, "1h2m5.5s"),
    ],
)
def test_durations_are_written_like_openai_headers(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_token_bucket_admits_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_min=60, burst=3, clock=clock)

    admitted = [bucket.take() for _ in range(4)]
    assert [a.admitted for a in admitted] == [True, True, True, False]
    assert [a.remaining for a in admitted] == [2, 1, 0, 0]
    assert admitted[2].reset_s == pytest.approx(3.0)
    assert admitted[3].retry_after_s == pytest.approx(1.0)
    assert admitted[3].headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "3s",
        "retry-after-ms": "1000",
        "retry-after": "1",
    }
    clock.now_s += 0.75
    refused = bucket.take()
    assert not refused.admitted
    assert refused.headers()["retry-after-ms"] == "250"
    clock.now_s += 0.25
    assert bucket.take().admitted
    clock.now_s += 3600  # never more than the burst
    assert [bucket.take().admitted for _ in range(4)] == [True, True, True, False]


def test_admitted_requests_get_no_retry_after() -> None:
    headers = TokenBucket(rate_per_min=300, burst=10).take().headers()
    assert set(headers) == set(LIMIT_HEADERS)
    assert headers["x-ratelimit-limit-requests"] == "300"
    assert headers["x-ratelimit-remaining-requests"] == "9"


async def test_rate_limit_answers_a_bare_429_at_once_and_bills_nothing(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(rate_limit_rpm=6, rate_limit_burst=2, latency_s=0.3)
    statuses = []
    for _ in range(2):
        async with session.post(gen_url(emulator), json=gen_body()) as response:
            statuses.append(response.status)
            assert not any(name in response.headers for name in LIMIT_HEADERS + RETRY_HEADERS)
    started = time.monotonic()
    async with session.post(gen_url(emulator), json=gen_body()) as response:
        assert response.status == 429
        error = (await response.json())["error"]
        assert not any(name in response.headers for name in LIMIT_HEADERS + RETRY_HEADERS)
    assert time.monotonic() - started < 0.3  # refused on arrival, before the latency

    assert statuses == [200, 200]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "try again" not in error["message"]
    assert [(r.fault, r.status) for r in emulator.requests] == [
        (None, 200),
        (None, 200),
        (RATE_LIMITED, 429),
    ]
    assert len(emulator.bills) == 2


async def test_announced_limits_are_on_every_answer_and_retry_after_on_the_429(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(
        rate_limit_rpm=60, rate_limit_burst=2, rate_limit_headers=True, script=("500",)
    )
    answers = []
    for _ in range(3):
        async with session.post(gen_url(emulator), json=gen_body()) as response:
            answers.append((response.status, response.headers.copy()))

    assert [status for status, _ in answers] == [500, 200, 429]
    for _, headers in answers:
        assert headers["x-ratelimit-limit-requests"] == "60"
    assert [h["x-ratelimit-remaining-requests"] for _, h in answers] == ["1", "0", "0"]
    assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", answers[0][1]["x-ratelimit-reset-requests"])
    assert not any(name in answers[1][1] for name in RETRY_HEADERS)
    refused = answers[2][1]
    assert 900 <= int(refused["retry-after-ms"]) <= 1000
    assert refused["retry-after"] == "1"


async def test_a_429_clears_once_the_bucket_refills(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    emulator = Emulator(EmulatorConfig(rate_limit_rpm=30, rate_limit_burst=1), clock=clock)
    await emulator.start()
    try:
        statuses = []
        for advance_s in (0, 0, 1.9, 0.1):
            clock.now_s += advance_s
            statuses.append((await post_json(session, gen_url(emulator), gen_body()))[0])
    finally:
        await emulator.stop()
    assert statuses == [200, 429, 429, 200]


@pytest.mark.parametrize(("scope", "edit_status"), [("shared", 429), ("per_endpoint", 200)])
async def test_rate_limit_scope(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, scope: str, edit_status: int
) -> None:
    emulator = await make_emulator(rate_limit_rpm=1, rate_limit_burst=1, rate_limit_scope=scope)
    assert (await post_json(session, gen_url(emulator), gen_body()))[0] == 200
    form = edit_form("modify image1", [image_bytes(8, 8)], size=SMALL)
    async with session.post(edit_url(emulator), data=form) as response:
        assert response.status == edit_status
    assert (await post_json(session, gen_url(emulator), gen_body()))[0] == 429


async def test_records_carry_when_a_request_arrived_and_was_answered(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(latency_s=0.2)
    before = time.time()
    await post_json(session, gen_url(emulator), gen_body())
    after = time.time()

    [record] = emulator.requests
    assert before <= record.received_at <= record.answered_at <= after
    assert record.answered_at - record.received_at >= 0.2


@pytest.mark.parametrize(
    "changes",
    [
        {"rate_limit_rpm": 0},
        {"rate_limit_rpm": 60, "rate_limit_burst": 0},
        {"rate_limit_headers": True},
        {"rate_limit_rpm": 60, "rate_limit_scope": "global"},
        {"payload": "photo"},
    ],
)
def test_config_rejects_bad_limits_and_payloads(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(**changes)


# --- big payloads ---------------------------------------------------------------------------


async def test_noise_payload_is_incompressible_cached_and_the_right_size(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(payload="noise")
    bodies = [gen_body(prompt=p, response_format="b64_json") for p in ("red", "blue")]
    values = [(await post_json(session, gen_url(emulator), b))[1]["data"][0] for b in bodies]
    _, url_payload = await post_json(session, gen_url(emulator), gen_body())
    async with session.get(url_payload["data"][0]["url"]) as response:
        served = await response.read()

    assert values[0] == values[1]  # rendered once for the size, whatever the prompt
    png = base64.b64decode(values[0]["b64_json"].removeprefix(PREFIX))
    assert served == png
    assert len(png) > 1280 * 544 * 3  # noise: no smaller than its raw pixels
    image = open_image(png)
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (1280, 544))


async def test_sixteen_concurrent_4k_noise_answers(make_emulator: MakeEmulator) -> None:
    emulator = await make_emulator(payload="noise")
    body = gen_body(size="3840x2160", response_format="b64_json")

    async def fetch(session: aiohttp.ClientSession) -> bytes:
        async with session.post(gen_url(emulator), json=body) as response:
            assert response.status == 200
            return await response.read()

    async with aiohttp.ClientSession(headers=AUTH) as session:
        answers = await asyncio.gather(*(fetch(session) for _ in range(16)))

    assert len({len(answer) for answer in answers}) == 1
    assert len(answers[0]) > 30_000_000
    payload = json.loads(answers[-1])
    png = base64.b64decode(payload["data"][0]["b64_json"].removeprefix(PREFIX))
    assert 24_000_000 < len(png) < 27_000_000
    assert open_image(png).size == (3840, 2160)
    assert len(emulator.bills) == 16


async def test_faults_still_cut_a_noise_body(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emulator = await make_emulator(payload="noise", script=("truncate", "malformed"))
    body = gen_body(response_format="b64_json")
    async with session.post(gen_url(emulator), json=body) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with session.post(gen_url(emulator), json=body) as response:
        with pytest.raises(json.JSONDecodeError):
            json.loads(await response.read())


# --- image-runner emulate -------------------------------------------------------------------


def test_emulate_command_prints_its_url_and_applies_its_flags() -> None:
    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "runner", "emulate", "--port", "0", "--rate-limit", "60"]
    command += ["--burst", "1", "--announce-limits", "--payload", "noise"]
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        request = urllib.request.Request(
            f"{match.group(1)}/images/generations",
            json.dumps(gen_body(response_format="b64_json")).encode(),
            {**AUTH, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = json.load(response)
            assert response.headers["x-ratelimit-limit-requests"] == "60"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        caught.value.close()
        assert caught.value.code == 429
        assert caught.value.headers["retry-after"] == "1"
    finally:
        process.terminate()
        process.wait(timeout=10)
    png = base64.b64decode(payload["data"][0]["b64_json"].removeprefix(PREFIX))
    assert len(png) > 1280 * 544 * 3


# --- the official openai SDK as a client -----------------------------------------------------


async def test_openai_sdk_generates_and_edits(emulator: Emulator) -> None:
    wide, square = image_bytes(320, 180), image_bytes(100, 100)
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=emulator.base_url, max_retries=0
    ) as client:
        generated = await client.images.generate(
            model=MODEL, prompt="a fox", size="1280x720", response_format="b64_json"
        )
        fused = await client.images.edit(
            model=MODEL, image=[wide, square], prompt="modify image2 to match image1"
        )
        single = await client.images.edit(
            model=MODEL, image=("a.png", wide, "image/png"), prompt="add a hat"
        )

    assert generated.data is not None and generated.data[0].b64_json is not None
    assert decode_b64_json(generated.data[0].b64_json).size == (1280, 720)
    assert fused.data is not None and fused.data[0].b64_json is not None
    assert decode_b64_json(fused.data[0].b64_json).size == (1280, 1280)
    assert fused.usage is not None and fused.usage.input_tokens > 0
    assert single.data is not None and single.data[0].b64_json is not None
    assert decode_b64_json(single.data[0].b64_json).size == (1280, 720)
    assert [r.image_part_names for r in emulator.requests] == [(), ("image[]",) * 2, ("image",)]
    assert emulator.requests[1].image_sizes == ("320x180", "100x100")


async def test_openai_sdk_honours_retry_after_ms(make_emulator: MakeEmulator) -> None:
    emulator = await make_emulator(script=("429", "503"))
    started = time.monotonic()
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=emulator.base_url, max_retries=2
    ) as client:
        result = await client.images.generate(model=MODEL, prompt="a fox", size=SMALL)
    # Without the 50 ms hints the SDK's own backoff would wait about 0.5 s + 1 s.
    assert time.monotonic() - started < 0.5
    assert result.data is not None and result.data[0].url is not None
    assert [r.status for r in emulator.requests] == [429, 503, 200]


@pytest.mark.parametrize(("kind", "attempts"), [("500_noretry", 1), ("400_retry", 2)])
async def test_openai_sdk_obeys_x_should_retry(
    make_emulator: MakeEmulator, kind: str, attempts: int
) -> None:
    emulator = await make_emulator(script=(kind,))
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=emulator.base_url, max_retries=1
    ) as client:
        try:
            await client.images.generate(model=MODEL, prompt="a fox", size=SMALL)
        except openai.InternalServerError:
            assert kind == "500_noretry"
    assert len(emulator.requests) == attempts
