"""The HTTP client: one aiohttp session, requests for both endpoints, outcomes as typed errors.

``ImagesClient.create(job)`` sends one request and returns the image bytes, or raises one of the
:mod:`runner.errors` classes, sorted by what the outcome means for billing and retrying:

- nothing reached the server (connect failed or timed out): :class:`NotSentError`;
- the server answered with an error: by status and code, see :func:`error_from_response`;
- the request was sent but the answer is unknown or unusable (read timeout, reset, truncated or
  malformed body, a url that cannot be fetched): :class:`AmbiguousError`, possibly billed.

The API key goes only to the API's host: ``url`` images are fetched from the CDN without it,
with no redirects followed and bounded in bytes and time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from runner.api import MIME_TYPES, SPEND_LIMIT_CODES, sniff_format
from runner.errors import (
    AmbiguousError,
    ApiError,
    JobFailedError,
    NotSentError,
    RunStoppedError,
    ServerError,
)
from runner.jobs import Job
from runner.redact import redact, register_secret

DEFAULT_BASE_URL = "https://api.apiyi.com/v1"
ERROR_BODY_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: str = ""
    timeout_s: float = 300.0
    connect_timeout_s: float = 30.0
    download_timeout_s: float = 120.0
    max_response_bytes: int = 256 * 1024 * 1024  # a 4K image as base64 JSON is tens of MB
    max_download_bytes: int = 128 * 1024 * 1024


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None


@dataclass(frozen=True)
class ImageResult:
    data: bytes
    usage: Usage | None


class ImagesClient:
    """One session for the whole run; use as ``async with ImagesClient(config) as client``."""

    def __init__(self, config: ClientConfig, *, max_connections: int = 16) -> None:
        self.config = config
        self.max_connections = max(1, max_connections)
        register_secret(config.api_key)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ImagesClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            timeout=aiohttp.ClientTimeout(
                total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s
            ),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ImagesClient is used outside 'async with'")
        return self._session

    async def create(self, job: Job) -> ImageResult:
        """Send one request for ``job`` and return its image bytes (not yet verified)."""
        url = f"{self.config.base_url.rstrip('/')}/images/{job.endpoint}"
        headers = {"Authorization": f"Bearer {self.config.api_key}"}
        with ExitStack() as files:
            if job.endpoint == "edits":
                form = aiohttp.FormData()
                for name, value in _fields(job).items():
                    form.add_field(name, value)
                for path in job.images:
                    # Streamed from disk, opened anew for every attempt; the reads are small
                    # and local, so they stay on the event loop.
                    try:
                        f = files.enter_context(open(path, "rb"))  # noqa: ASYNC230
                        fmt = sniff_format(f.read(16)) or "png"
                        f.seek(0)
                    except OSError as exc:  # gone since validation: nothing was sent
                        message = f"reference image {path} cannot be read: {exc.strerror}"
                        raise JobFailedError(
                            message, job_id=job.id, code="reference_unreadable"
                        ) from None
                    form.add_field("image", f, filename=path.name, content_type=MIME_TYPES[fmt])
                request = self.session.post(url, data=form, headers=headers)
            else:
                request = self.session.post(url, json=_fields(job), headers=headers)
            payload = await self._send(request, job)
        return await self._image_from(payload, job)

    async def _send(self, request: Any, job: Job) -> dict[str, Any]:
        try:
            async with request as response:
                if 200 < response.status < 300:  # not what the API answers: maybe billed
                    message = f"unexpected HTTP {response.status} to an image request"
                    raise AmbiguousError(message, job_id=job.id, status=response.status)
                if response.status != 200:
                    raise await error_from_response(response, job.id)
                body = await _read_capped(response, self.config.max_response_bytes, job.id)
        except ApiError:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise NotSentError(_describe(exc), job_id=job.id) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AmbiguousError(f"sent, then {_describe(exc)}", job_id=job.id) from None
        # A 4K image as base64 JSON is tens of MB: parse it off the event loop.
        return await asyncio.to_thread(_parse_payload, body, job.id)

    async def _image_from(self, payload: dict[str, Any], job: Job) -> ImageResult:
        data = payload.get("data")
        item = data[0] if isinstance(data, list) and data else None
        if not isinstance(item, dict):
            raise AmbiguousError("a 200 response without data[0]", job_id=job.id)
        if isinstance(item.get("b64_json"), str):
            image = await asyncio.to_thread(_decode_b64, item["b64_json"], job.id)
        elif isinstance(item.get("url"), str):
            image = await self._download(item["url"], job.id)
        else:
            raise AmbiguousError("data[0] has neither b64_json nor url", job_id=job.id)
        return ImageResult(image, _usage(payload.get("usage")))

    async def _download(self, url: str, job_id: str) -> bytes:
        if urlsplit(url).scheme not in ("http", "https"):
            raise AmbiguousError(f"image url is not http(s): {url[:80]!r}", job_id=job_id)
        try:
            async with self.session.get(
                url,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.download_timeout_s),
            ) as response:
                if response.status != 200:
                    raise AmbiguousError(
                        f"image url answered HTTP {response.status}", job_id=job_id
                    )
                return bytes(await _read_capped(response, self.config.max_download_bytes, job_id))
        except ApiError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AmbiguousError(
                f"image download failed: {_describe(exc)}", job_id=job_id
            ) from None


def _fields(job: Job) -> dict[str, str]:
    fields = {"model": job.model, "prompt": job.prompt, "response_format": job.response_format}
    if job.size is not None:
        fields["size"] = job.size
    return fields


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int, job_id: str) -> bytearray:
    if response.content_length is not None and response.content_length > max_bytes:
        raise AmbiguousError(
            f"response of {response.content_length} bytes is over the cap", job_id=job_id
        )
    buffer = bytearray()
    async for chunk in response.content.iter_chunked(1 << 20):
        buffer += chunk
        if len(buffer) > max_bytes:
            raise AmbiguousError(f"response is over the cap of {max_bytes} bytes", job_id=job_id)
    return buffer


def _parse_payload(body: bytearray, job_id: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise AmbiguousError("malformed JSON in a 200 response", job_id=job_id) from None
    if not isinstance(payload, dict):
        raise AmbiguousError("a 200 response that is not a JSON object", job_id=job_id)
    return payload


def _decode_b64(value: str, job_id: str) -> bytes:
    # The provider prefixes "data:image/png;base64,"; plain OpenAI does not. Accept both.
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AmbiguousError("malformed base64 in a 200 response", job_id=job_id) from None


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None

    def number(key: str) -> int | None:
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
            return value
        return None

    return Usage(number("input_tokens"), number("output_tokens"), number("total_tokens"))


async def error_from_response(response: aiohttp.ClientResponse, job_id: str) -> ApiError:
    """Sort a non-200 answer into the error class that says what to do next."""
    status = response.status
    message, code = f"HTTP {status}", None
    try:
        body = await response.content.read(ERROR_BODY_MAX_BYTES)
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = str(error.get("code") or error.get("type") or "") or None
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, RecursionError):
        pass
    message = redact(message)
    retry_after_s = retry_after_from(response.headers)
    should_retry = response.headers.get("x-should-retry", "").lower()
    kwargs: dict[str, Any] = {"job_id": job_id, "status": status, "code": code}
    if status in (401, 403):
        return RunStoppedError(message, **kwargs)
    if status == 429 and code in SPEND_LIMIT_CODES:
        return RunStoppedError(message, **kwargs)
    if should_retry == "true" or (
        should_retry != "false" and (status in (408, 409, 429) or status >= 500)
    ):
        return ServerError(message, retry_after_s=retry_after_s, **kwargs)
    return JobFailedError(message, **kwargs)


def retry_after_from(headers: CIMultiDictProxy[str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``retry-after`` (seconds or HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}" if str(exc) else text)
