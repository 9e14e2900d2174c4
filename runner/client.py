"""The HTTP client: one aiohttp session, requests for both endpoints, outcomes as typed errors.

``ImagesClient.create(job, folder)`` sends one request and streams the image into a temp file
in ``folder`` (see :mod:`runner.b64stream`: the body is never held whole, so memory stays
bounded per request in flight), or raises one of the :mod:`runner.errors` classes, sorted by
what the outcome means for billing and retrying:

- nothing reached the server (connect failed or timed out): :class:`NotSentError`;
- the server answered with an error: by status and code, see :func:`error_from_response`;
- the request was sent but the answer is unknown or unusable (read timeout, reset, truncated or
  malformed body, a url that cannot be fetched): :class:`AmbiguousError`, possibly billed.

The API key goes only to the API's host: ``url`` images are fetched from the CDN without it,
with no redirects followed and bounded in bytes and time.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from runner.api import MIME_TYPES, SPEND_LIMIT_CODES, sniff_format
from runner.b64stream import B64JsonScanner, B64StreamError
from runner.errors import (
    AmbiguousError,
    ApiError,
    JobFailedError,
    NotSentError,
    RunStoppedError,
    ServerError,
)
from runner.images import TMP_MARKER
from runner.jobs import Job
from runner.ratelimit import RateLimitHeaders, rate_limit_headers
from runner.redact import redact, register_secret

DEFAULT_BASE_URL = "https://api.apiyi.com/v1"
ERROR_BODY_MAX_BYTES = 1 << 20
CHUNK_BYTES = 1 << 18  # what one request in flight holds of its body at a time


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
    """An image that came back: a temp file (``<job id>.part.tmp-*``) the caller now owns."""

    path: Path
    size_bytes: int
    usage: Usage | None
    rate_limit: RateLimitHeaders | None = None  # the answer's x-ratelimit-* headers


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

    async def create(self, job: Job, folder: Path) -> ImageResult:
        """Send one request for ``job`` and stream its image (not yet verified) into a temp file
        in ``folder``; the caller owns that file. On any error no file is left behind."""
        tmp = folder / f"{job.id}.part{TMP_MARKER}{secrets.token_hex(6)}"
        try:
            return await self._create(job, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _create(self, job: Job, tmp: Path) -> ImageResult:
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
            payload, scanner, sink, limits = await self._send(request, job, tmp, files)
            usage = _usage(payload.get("usage"))
            if scanner.found:  # data[0].b64_json, already decoded into the sink
                await asyncio.to_thread(sink.close)  # flushing may wait on the disk
                return ImageResult(tmp, scanner.image_bytes, usage, limits)
            data = payload.get("data")
            item = data[0] if isinstance(data, list) and data else None
            if not isinstance(item, dict):
                raise AmbiguousError("a 200 response without data[0]", job_id=job.id)
            if not isinstance(item.get("url"), str):
                raise AmbiguousError("data[0] has neither b64_json nor url", job_id=job.id)
            size_bytes = await self._download(item["url"], job.id, sink)
            await asyncio.to_thread(sink.close)
            return ImageResult(tmp, size_bytes, usage, limits)

    async def _send(
        self, request: Any, job: Job, tmp: Path, files: ExitStack
    ) -> tuple[dict[str, Any], B64JsonScanner, BinaryIO, RateLimitHeaders | None]:
        """Send ``request``; stream a 200's image into ``tmp``, return the rest of its JSON."""
        try:
            async with request as response:
                if 200 < response.status < 300:  # not what the API answers: maybe billed
                    message = f"unexpected HTTP {response.status} to an image request"
                    raise AmbiguousError(message, job_id=job.id, status=response.status)
                if response.status != 200:
                    raise await error_from_response(response, job.id)
                limits = rate_limit_headers(response.headers)
                # Only now: an image is coming back, so a disk error from here on is an
                # OSError the pool books as a charge. Creating the file may wait on the
                # folder (other threads fsync it), so not on the event loop; the writes are a
                # chunk at a time and local: they stay on it.
                sink = files.enter_context(await asyncio.to_thread(open, tmp, "xb"))
                scanner = B64JsonScanner(sink)
                limit = self.config.max_response_bytes
                await _stream_capped(response, limit, job.id, scanner.feed)
            payload = scanner.finish()
        except ApiError:
            raise
        except B64StreamError as exc:
            raise AmbiguousError(f"{exc} in a 200 response", job_id=job.id) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise NotSentError(_describe(exc), job_id=job.id) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AmbiguousError(f"sent, then {_describe(exc)}", job_id=job.id) from None
        if not isinstance(payload, dict):
            raise AmbiguousError("a 200 response that is not a JSON object", job_id=job.id)
        return payload, scanner, sink, limits

    async def _download(self, url: str, job_id: str, sink: BinaryIO) -> int:
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
                limit = self.config.max_download_bytes
                return await _stream_capped(response, limit, job_id, sink.write)
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


async def _stream_capped(
    response: aiohttp.ClientResponse, max_bytes: int, job_id: str, write: Callable[[bytes], object]
) -> int:
    """Pass the body to ``write`` a chunk at a time; return its length."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise AmbiguousError(
            f"response of {response.content_length} bytes is over the cap", job_id=job_id
        )
    size_bytes = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size_bytes += len(chunk)
        if size_bytes > max_bytes:
            raise AmbiguousError(f"response is over the cap of {max_bytes} bytes", job_id=job_id)
        write(chunk)
    return size_bytes


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
    kwargs: dict[str, Any] = {
        "job_id": job_id,
        "status": status,
        "code": code,
        "rate_limit": rate_limit_headers(response.headers),
    }
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
