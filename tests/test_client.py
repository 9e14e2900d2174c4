"""The client against a small fault server of its own: what it does with ``url`` images that
redirect, are too big, too slow or not http(s), and that the key never goes to the CDN; and
``b64_json`` answers, streamed into a temp file: cut short, over the cap, malformed (no file is
left), and never held whole in memory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from runner.errors import (
    AmbiguousError,
    ApiError,
    ImageWriteError,
    JobFailedError,
    NotSentError,
    RunStoppedError,
    ServerError,
    UnfetchedImageError,
)
from runner.http.answers import Usage
from runner.http.client import ClientConfig, ImageResult, ImagesClient
from runner.images.files import is_temp_name
from runner.images.verify import ImageInvalid, inspect_image
from runner.jobs import Job
from tests.conftest import TEST_KEY, closed_port_url, make_job, serve_app


def png(size: tuple[int, int] = (1280, 544)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format="PNG")
    return buffer.getvalue()


class FaultServer:
    """Answers every generation with ``data[0].url`` = ``self.image_url`` (relative paths are
    served here), and records the headers each CDN path was fetched with."""

    def __init__(self) -> None:
        self.image_url = "/img"
        self.cdn_headers: dict[str, dict[str, str]] = {}
        self.cdn_gets: dict[str, int] = {}
        self.base = ""
        self.generations = 0

    async def generate(self, request: web.Request) -> web.Response:
        self.generations += 1
        url = self.image_url if "://" in self.image_url else self.base + self.image_url
        return web.json_response({"data": [{"url": url}]})

    def cdn(
        self, body: bytes | None = None, status: int = 200, delay_s: float = 0.0
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.cdn_headers[request.path] = dict(request.headers)
            self.cdn_gets[request.path] = self.cdn_gets.get(request.path, 0) + 1
            await asyncio.sleep(delay_s)
            if status == 302:
                raise web.HTTPFound("/img")
            return web.Response(body=body, status=status, content_type="image/png")

        return handler


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    fault = FaultServer()
    app = web.Application()
    app.router.add_post("/v1/images/generations", fault.generate)
    app.router.add_get("/img", fault.cdn(png()))
    app.router.add_get("/redirect", fault.cdn(status=302))
    app.router.add_get("/huge", fault.cdn(b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000))
    app.router.add_get("/slow", fault.cdn(png(), delay_s=2.0))
    app.router.add_get("/gone", fault.cdn(b"expired", status=404))
    app.router.add_get("/html", fault.cdn(b"<html>Service busy</html>"))
    flaky = fault.cdn(png())

    async def flaky_twice(request: web.Request) -> web.StreamResponse:
        if fault.cdn_gets.get(request.path, 0) < 2:
            fault.cdn_gets[request.path] = fault.cdn_gets.get(request.path, 0) + 1
            return web.Response(status=503, text="busy")
        return await flaky(request)

    app.router.add_get("/flaky", flaky_twice)
    async with serve_app(app) as base:
        fault.base = base
        yield fault


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def job() -> Job:
    return make_job("j", "p", response_format="url")


def client(server: FaultServer) -> ImagesClient:
    return ImagesClient(
        ClientConfig(
            base_url=server.base + "/v1",
            api_key=TEST_KEY,
            max_download_bytes=100_000,
            download_timeout_s=0.5,
            download_attempts=3,
            download_backoff_s=0.001,
        )
    )


async def test_url_image_is_fetched_without_the_key(server: FaultServer, tmp_path: Path) -> None:
    async with client(server) as c:
        result = await c.create(job(), tmp_path)
    assert result.path.parent == tmp_path and is_temp_name(result.path.name)
    assert result.path.read_bytes() == png() and result.size_bytes == len(png())
    assert inspect_image(result.path, (1280, 544)).format == "png"
    assert "Authorization" not in server.cdn_headers["/img"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/redirect", "HTTP 302"),
        ("/huge", "over the cap"),
        ("/slow", "download failed"),
        ("/gone", "HTTP 404"),
        ("file:///etc/passwd", r"not http\(s\)"),
        ("ftp://127.0.0.1/x.png", r"not http\(s\)"),
    ],
)
async def test_unsafe_or_failed_url_downloads_are_confirmed_charges(
    server: FaultServer, tmp_path: Path, path: str, message: str
) -> None:
    """The API answered 200 with a url: it billed the generation, whatever the CDN does."""
    server.image_url = path
    async with client(server) as c:
        with pytest.raises(UnfetchedImageError, match=message) as info:
            await c.create(job(), tmp_path)
    assert info.value.billing == "confirmed"
    assert server.generations == 1
    assert "/img" not in server.cdn_headers  # a redirect is never followed
    assert files_in(tmp_path) == []  # the temp file is gone


@pytest.mark.parametrize(
    ("path", "tries"), [("/gone", 3), ("/slow", 3), ("/html", 3), ("/huge", 1)]
)
async def test_a_failed_download_is_retried_as_a_download(
    server: FaultServer, tmp_path: Path, path: str, tries: int
) -> None:
    server.image_url = path
    async with client(server) as c:
        with pytest.raises(UnfetchedImageError, match=f"{tries} tries"):
            await c.create(job(), tmp_path)
    assert server.generations == 1
    assert server.cdn_gets[path] == tries  # over the cap: another try would be too


async def test_a_flaky_cdn_costs_no_new_generation(server: FaultServer, tmp_path: Path) -> None:
    server.image_url = "/flaky"
    async with client(server) as c:
        result = await c.create(job(), tmp_path)
    assert result.path.read_bytes() == png()  # the failed tries left nothing in the file
    assert server.generations == 1 and server.cdn_gets["/flaky"] == 3


def chunked(status: int, body: dict[str, object]) -> Callable[[web.Request], Awaitable[object]]:
    """A handler that sends ``body`` as JSON in three chunks, pausing between them."""

    async def handler(request: web.Request) -> web.StreamResponse:
        data = json.dumps(body).encode()
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        third = len(data) // 3
        for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
            await response.write(piece)
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    return handler


async def chunked_answer_error(status: int, body: dict[str, object], tmp_path: Path) -> ApiError:
    """The error ``create()`` raises against a server that answers ``body`` in chunks."""
    app = web.Application()
    app.router.add_post("/v1/images/generations", chunked(status, body))
    async with (
        serve_app(app) as base,
        ImagesClient(ClientConfig(base_url=f"{base}/v1", api_key=TEST_KEY)) as c,
    ):
        with pytest.raises(ApiError) as info:
            await c.create(job(), tmp_path)
    return info.value


def error_body(code: str, type_: str = "invalid_request_error") -> dict[str, object]:
    message = "A long enough message, so that the code comes in the last chunk of three."
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, "insufficient_quota", RunStoppedError),
        (429, "rate_limit_exceeded", ServerError),
        (400, "content_policy_violation", JobFailedError),
        (200, "content_policy_violation", JobFailedError),
        (200, "insufficient_quota", RunStoppedError),
        (200, "invalid_api_key", RunStoppedError),
        (200, "rate_limit_exceeded", ServerError),
        (200, "server_error", ServerError),
        (200, "something_new", JobFailedError),
    ],
)
async def test_error_bodies_in_chunks_and_errors_inside_a_200_are_sorted_by_code(
    tmp_path: Path, status: int, code: str, expected: type[ApiError]
) -> None:
    error = await chunked_answer_error(status, error_body(code), tmp_path)
    assert type(error) is expected
    assert error.code == code and error.billing == "none"
    if status == 200:
        assert "inside a 200" in error.message
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, {"code": 502, "message": "bad gateway upstream"}, ServerError),
        (200, {"code": "429"}, ServerError),
        (200, {"message": "upstream timeout"}, ServerError),
        (200, {"code": "x", "type": "insufficient_quota"}, RunStoppedError),
        (429, {"code": "x", "type": "insufficient_quota"}, RunStoppedError),
        (200, {"code": "model_not_found"}, JobFailedError),
    ],
)
async def test_error_objects_are_sorted_by_numeric_codes_and_types_too(
    tmp_path: Path, status: int, error: dict[str, object], expected: type[ApiError]
) -> None:
    """A gateway's numeric code is a status; a spend limit named by the type alone still
    stops the run; an error that names nothing known is retried, never failed for good."""
    raised = await chunked_answer_error(status, {"error": error}, tmp_path)
    assert type(raised) is expected
    assert raised.billing == "none"


async def test_a_200_with_empty_data_is_a_possible_charge_that_says_so(tmp_path: Path) -> None:
    error = await chunked_answer_error(200, {"created": 1, "data": []}, tmp_path)
    assert isinstance(error, AmbiguousError) and "empty data list" in error.message
    assert error.billing == "possible"


async def test_a_dead_host_says_where_it_could_not_connect(tmp_path: Path) -> None:
    base_url = closed_port_url()
    port = base_url.split(":")[2].split("/")[0]
    async with ImagesClient(ClientConfig(base_url=base_url, api_key=TEST_KEY)) as c:
        with pytest.raises(NotSentError) as info:
            await c.create(job(), tmp_path)
    assert info.value.message == f"connection refused to 127.0.0.1:{port}"


@pytest.mark.parametrize(
    "base_url", ["ftp://x/v1", "not a url", "http:///v1", "http://127.0.0.1:99999/v1"]
)
async def test_a_url_aiohttp_refuses_is_never_sent_not_ambiguous(
    tmp_path: Path, base_url: str
) -> None:
    """aiohttp refuses these before it connects: nothing went out, so nothing may be booked
    as a possible charge (Options refuses them earlier; a ClientConfig built by hand does not)."""
    async with ImagesClient(ClientConfig(base_url=base_url, api_key=TEST_KEY)) as c:
        with pytest.raises(NotSentError) as info:
            await c.create(job(), tmp_path)
    assert info.value.billing == "none"
    assert "not an http(s) URL with a host" in info.value.message
    assert files_in(tmp_path) == []  # no temp file left


async def test_a_redirect_to_a_url_aiohttp_refuses_is_ambiguous(tmp_path: Path) -> None:
    """The request went out and the server answered with a redirect aiohttp will not follow:
    whatever the server did is unknown, a possible charge."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("ftp://elsewhere/v1/images/generations")

    app = web.Application()
    app.router.add_post("/v1/images/generations", redirect)
    async with (
        serve_app(app) as base,
        ImagesClient(ClientConfig(base_url=f"{base}/v1", api_key=TEST_KEY)) as c,
    ):
        with pytest.raises(AmbiguousError) as info:
            await c.create(job(), tmp_path)
    assert info.value.billing == "possible"


async def test_error_bodies_that_are_not_json_still_classify(tmp_path: Path) -> None:
    async def html_502(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad gateway</html>", content_type="text/html")

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    app = web.Application()
    app.router.add_post("/v1/images/generations", html_502)
    app.router.add_post("/v2/images/generations", not_found)
    async with serve_app(app) as base:
        async with ImagesClient(ClientConfig(base_url=f"{base}/v1", api_key=TEST_KEY)) as c:
            with pytest.raises(ServerError) as info:
                await c.create(job(), tmp_path)
            assert info.value.status == 502
        async with ImagesClient(ClientConfig(base_url=f"{base}/v2", api_key=TEST_KEY)) as c:
            with pytest.raises(JobFailedError):
                await c.create(job(), tmp_path)
    assert files_in(tmp_path) == []


def test_decompression_bomb_in_a_response_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png((64, 64))  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the warning range: between 1x and 2x
    with pytest.raises(ImageInvalid, match="decompression bomb"):
        inspect_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own error range
    with pytest.raises(ImageInvalid, match="decompression bomb"):
        inspect_image(data)


async def test_odd_success_statuses_and_absurd_json_are_possible_charges(tmp_path: Path) -> None:
    async def accepted(request: web.Request) -> web.Response:
        return web.json_response({"data": []}, status=202)

    async def nested(request: web.Request) -> web.Response:
        return web.Response(text="[" * 200_000, content_type="application/json")

    app = web.Application()
    app.router.add_post("/a/images/generations", accepted)
    app.router.add_post("/n/images/generations", nested)
    async with serve_app(app) as base:
        for path in ("/a", "/n"):
            async with ImagesClient(ClientConfig(base_url=base + path, api_key=TEST_KEY)) as c:
                with pytest.raises(AmbiguousError):
                    await c.create(job(), tmp_path)
    assert files_in(tmp_path) == []


# --- b64_json answers, streamed into a temp file ------------------------------------------------


CAP = ClientConfig.max_response_bytes


def b64_body(raw: bytes, prefix: str = "data:image/png;base64,", **extra: object) -> bytes:
    item = {"b64_json": prefix + base64.b64encode(raw).decode()}
    return json.dumps({"created": 1, "data": [item], **extra}).encode()


async def answer(
    body: bytes, tmp_path: Path, *, cut_at: int | None = None, max_bytes: int = CAP
) -> ImageResult:
    """``create()`` against a server whose every generation answers ``body``, sent in small
    pieces (cut off after ``cut_at`` bytes, with the full Content-Length announced)."""

    async def generate(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        end = len(body) if cut_at is None else cut_at
        for offset in range(0, end, 1 << 16):  # pieces, so neither side buffers it whole
            await response.write(body[offset : min(end, offset + (1 << 16))])
        if cut_at is not None:
            assert request.transport is not None
            request.transport.close()
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    async with serve_app(app) as base:
        b64_job = make_job("j", "p", response_format="b64_json")
        config = ClientConfig(base_url=f"{base}/v1", api_key=TEST_KEY, max_response_bytes=max_bytes)
        async with ImagesClient(config) as c:
            return await c.create(b64_job, tmp_path)


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", ""])
async def test_b64_image_is_streamed_to_a_temp_file(tmp_path: Path, prefix: str) -> None:
    body = b64_body(png(), prefix, usage={"input_tokens": 7, "output_tokens": 9})
    result = await answer(body, tmp_path)
    assert files_in(tmp_path) == [result.path]
    assert result.path.name.endswith("-j.part") and is_temp_name(result.path.name)
    assert result.path.read_bytes() == png() and result.size_bytes == len(png())
    assert result.usage == Usage(7, 9, None)


@pytest.mark.parametrize(
    ("body", "cut_at", "max_bytes", "message"),
    [
        (b64_body(png()), 3000, CAP, "sent, then"),  # the connection closes mid-body
        (b64_body(png())[:-2], None, CAP, "truncated"),  # the body itself ends early
        (b64_body(png()), None, 2000, "over the cap"),
        (b64_body(png()).replace(b",iVBOR", b",iV*BOR"), None, CAP, "malformed base64"),
        (b64_body(png()).replace(b'"}]', b'A"}]'), None, CAP, "multiple of 4"),
        (b64_body(png()) + b"}", None, CAP, "malformed JSON"),
        (b64_body(png(), revised_prompt="x" * 2_000_000), None, CAP, "besides the image"),
        (b'{"data": []}', None, CAP, "empty data list"),
        (b'{"data": [{"b64_json": null}]}', None, CAP, "neither b64_json nor url"),
        (b"[1, 2]", None, CAP, "not a JSON object"),
    ],
)
async def test_bad_b64_answers_are_possible_charges_and_leave_no_file(
    tmp_path: Path, body: bytes, cut_at: int | None, max_bytes: int, message: str
) -> None:
    with pytest.raises(AmbiguousError, match=message) as info:
        await answer(body, tmp_path, cut_at=cut_at, max_bytes=max_bytes)
    assert info.value.billing == "possible"
    assert files_in(tmp_path) == []


async def test_the_cap_holds_without_a_content_length(tmp_path: Path) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b64_body(png()))
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", chunked)
    async with serve_app(app) as base:
        config = ClientConfig(base_url=f"{base}/v1", api_key=TEST_KEY, max_response_bytes=2000)
        async with ImagesClient(config) as c:
            with pytest.raises(AmbiguousError, match="over the cap of 2000 bytes"):
                await c.create(job(), tmp_path)
    assert files_in(tmp_path) == []


async def test_a_disk_that_refuses_the_image_is_an_image_write_error(tmp_path: Path) -> None:
    """The pool books an :class:`ImageWriteError` as an image that came back but could not be
    kept; an error answer never touches the disk, so it stays an API error."""
    with pytest.raises(ImageWriteError, match="No such file"):
        await answer(b64_body(png()), tmp_path / "missing")
    async with (
        serve_app(web.Application()) as base,  # every path answers 404
        ImagesClient(ClientConfig(base_url=base, api_key=TEST_KEY)) as c,
    ):
        with pytest.raises(JobFailedError):
            await c.create(job(), tmp_path / "missing")


async def test_a_large_answer_is_never_held_whole(tmp_path: Path) -> None:
    raw = os.urandom(20_000_000)
    body = b64_body(raw)  # ~27 MB of JSON
    tracemalloc.start()
    try:
        result = await answer(body, tmp_path)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 4_000_000, f"{peak_bytes / 1e6:.1f} MB traced"
    assert result.size_bytes == len(raw)
    assert hashlib.sha256(result.path.read_bytes()).digest() == hashlib.sha256(raw).digest()
