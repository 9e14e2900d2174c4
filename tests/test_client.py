"""The client against a small fault server of its own: what it does with ``url`` images that
redirect, are too big, too slow or not http(s), and that the key never goes to the CDN."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from PIL import Image

from runner.client import ClientConfig, ImagesClient
from runner.errors import AmbiguousError, JobFailedError, ServerError
from runner.images import ImageInvalid, inspect_image
from runner.jobs import Job
from tests.conftest import TEST_KEY, serve_app


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
        self.base = ""

    async def generate(self, request: web.Request) -> web.Response:
        url = self.image_url if "://" in self.image_url else self.base + self.image_url
        return web.json_response({"data": [{"url": url}]})

    def cdn(
        self, body: bytes | None = None, status: int = 200, delay_s: float = 0.0
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.cdn_headers[request.path] = dict(request.headers)
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
    async with serve_app(app) as base:
        fault.base = base
        yield fault


def job() -> Job:
    return Job(id="j", prompt="p", model="gpt-image-2-vip", size="1280x544", response_format="url")


def client(server: FaultServer) -> ImagesClient:
    return ImagesClient(
        ClientConfig(
            base_url=server.base + "/v1",
            api_key=TEST_KEY,
            max_download_bytes=100_000,
            download_timeout_s=0.5,
        )
    )


async def test_url_image_is_fetched_without_the_key(server: FaultServer) -> None:
    async with client(server) as c:
        result = await c.create(job())
    assert inspect_image(result.data, (1280, 544)).format == "png"
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
async def test_unsafe_or_failed_url_downloads_are_possible_charges(
    server: FaultServer, path: str, message: str
) -> None:
    server.image_url = path
    async with client(server) as c:
        with pytest.raises(AmbiguousError, match=message) as info:
            await c.create(job())
    assert info.value.billing == "possible"
    assert "/img" not in server.cdn_headers  # a redirect is never followed


async def test_error_bodies_that_are_not_json_still_classify() -> None:
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
                await c.create(job())
            assert info.value.status == 502
        async with ImagesClient(ClientConfig(base_url=f"{base}/v2", api_key=TEST_KEY)) as c:
            with pytest.raises(JobFailedError):
                await c.create(job())


def test_decompression_bomb_in_a_response_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png((64, 64))  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the warning range: between 1x and 2x
    with pytest.raises(ImageInvalid, match="decompression bomb"):
        inspect_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own error range
    with pytest.raises(ImageInvalid, match="decompression bomb"):
        inspect_image(data)


def test_b64_with_and_without_the_data_prefix_decode_alike() -> None:
    from runner.client import _decode_b64

    raw = png((32, 32))
    plain = base64.b64encode(raw).decode()
    assert _decode_b64(plain, "j") == _decode_b64("data:image/png;base64," + plain, "j") == raw
    with pytest.raises(AmbiguousError):
        _decode_b64("data:image/png;base64,not*base64", "j")


async def test_odd_success_statuses_and_absurd_json_are_possible_charges() -> None:
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
                    await c.create(job())
