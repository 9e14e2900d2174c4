"""The HTTP client: one aiohttp session, requests for both endpoints, images streamed to disk.

``ImagesClient.create(job, folder)`` sends one request and streams the image into a temp file
in ``folder`` (see :mod:`runner.http.b64stream`: the body is never held whole, so memory stays
bounded per request in flight), or raises one of the :mod:`runner.errors` classes. What an
answer means is for :mod:`runner.http.answers` to say; this module sends, reads and writes:

- nothing reached the server (connect failed or timed out, or the URL is not one aiohttp can
  send to): :class:`NotSentError`, saying where it could not connect (``connection refused to
  HOST:PORT``);
- the server answered with an error: the error body is read whole (bounded) before it is
  sorted, however many chunks it comes in: a quota error cut after its first chunk would pass
  for a rate limit;
- the request was sent but the answer is unknown or unusable (read timeout, reset, truncated or
  malformed body, a 200 with no image in it): :class:`AmbiguousError`, possibly billed;
- a 200 with a ``url`` was billed: the download is retried on its own (bounded attempts with
  backoff, well within the url's lifetime), never by a new generation; if it still fails,
  :class:`UnfetchedImageError`, a confirmed charge.

Only the client's own writes of the image to disk raise :class:`ImageWriteError`: an ``OSError``
of the network (a reset during the upload, say) is never mistaken for a full disk.

The API key goes only to the API's host: ``url`` images are fetched from the CDN without it,
with no redirects followed and bounded in bytes and time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp

from runner.errors import (
    AmbiguousError,
    ApiError,
    ImageWriteError,
    JobFailedError,
    NotSentError,
    UnfetchedImageError,
)
from runner.http.answers import (
    Usage,
    describe,
    error_from_answer,
    image_url,
    not_sent,
    usage_from,
)
from runner.http.b64stream import B64JsonScanner, B64StreamError
from runner.http.headers import rate_limit_headers
from runner.images.files import temp_path_for
from runner.jobs import Job
from runner.provider import MIME_TYPES, RateLimitHeaders, sniff_format
from runner.redact import register_secret

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.apiyi.com/v1"
ERROR_BODY_MAX_BYTES = 1 << 20
CHUNK_BYTES = 1 << 18  # what one request in flight holds of its body at a time
# URLs aiohttp refuses before it connects: nothing went out. Their redirect kin come from a
# server's answer to a request that did go out: those stay ambiguous.
NOT_SENDABLE = (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)  # never in a repr, a log or a traceback
    timeout_s: float = 300.0
    connect_timeout_s: float = 30.0
    download_timeout_s: float = 120.0
    max_response_bytes: int = 256 * 1024 * 1024  # a 4K image as base64 JSON is tens of MB
    max_download_bytes: int = 128 * 1024 * 1024
    # A url answer was billed: its download is retried on its own, this many times in all,
    # waiting download_backoff_s, doubled each time (capped at 8 s), all well within the url's
    # lifetime (OpenAI's last about an hour).
    download_attempts: int = 4
    download_backoff_s: float = 0.5


@dataclass(frozen=True)
class ImageResult:
    """An image that came back: a temp file (``.tmp-*-<job id>.part``) the caller now owns."""

    path: Path
    size_bytes: int
    usage: Usage | None
    rate_limit: RateLimitHeaders | None = None  # the answer's x-ratelimit-* headers


class ImagesClient:
    """One session for the whole run; use as ``async with ImagesClient(config) as client``."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        max_connections: int = 16,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_connect: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.max_connections = max(1, max_connections)
        register_secret(config.api_key)
        self._sleep = sleep  # between download attempts
        # Told how long each new connection took to set up (a round trip or a few): the
        # pacer's slow start doubles its pace every round trip.
        self._on_connect = on_connect
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ImagesClient:
        traces = []
        if self._on_connect is not None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_start.append(_connect_started)
            trace.on_connection_create_end.append(self._connect_ended)
            traces.append(trace)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            timeout=aiohttp.ClientTimeout(
                total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s
            ),
            raise_for_status=False,
            trace_configs=traces,
        )
        return self

    async def _connect_ended(
        self, _session: aiohttp.ClientSession, context: SimpleNamespace, _params: object
    ) -> None:
        started = getattr(context, "connect_started", None)
        if started is not None and self._on_connect is not None:
            self._on_connect(time.monotonic() - started)

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
        tmp = temp_path_for(folder / f"{job.id}.part")
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
            payload, scanner, sink, limits = await self._send(request, url, job, tmp, files)
            usage = usage_from(payload.get("usage"))
            if scanner.found:  # data[0].b64_json, already decoded into the sink
                await _close(sink)  # flushing may wait on the disk
                return ImageResult(tmp, scanner.image_bytes, usage, limits)
            url = image_url(payload, job.id)
            size_bytes = await self._download(url, job.id, sink)
            await _close(sink)
            return ImageResult(tmp, size_bytes, usage, limits)

    async def _send(
        self, request: Any, url: str, job: Job, tmp: Path, files: ExitStack
    ) -> tuple[dict[str, Any], B64JsonScanner, BinaryIO, RateLimitHeaders | None]:
        """Send ``request``; stream a 200's image into ``tmp``, return the rest of its JSON."""
        try:
            async with request as response:
                if 200 < response.status < 300:  # not what the API answers: maybe billed
                    message = f"unexpected HTTP {response.status} to an image request"
                    raise AmbiguousError(message, job_id=job.id, status=response.status)
                if response.status != 200:
                    body = await _read_error_body(response)
                    raise error_from_answer(response.status, body, response.headers, job.id)
                limits = rate_limit_headers(response.headers)
                # Only now: an image is coming back, so a disk error from here on is an
                # ImageWriteError the pool books as a charge. Creating the file may wait on the
                # folder (other threads fsync it), so not on the event loop; the writes are a
                # chunk at a time and local: they stay on it.
                with _disk(tmp):
                    file = await asyncio.to_thread(open, tmp, "xb")
                sink = files.enter_context(file)
                scanner = B64JsonScanner(_DiskSink(sink))
                limit = self.config.max_response_bytes
                await _stream_capped(response, limit, job.id, scanner.feed)
            payload = scanner.finish()
        except (ApiError, ImageWriteError):
            raise
        except B64StreamError as exc:
            raise AmbiguousError(f"{exc} in a 200 response", job_id=job.id) from None
        except aiohttp.RedirectClientError as exc:  # the server answered: the request went
            raise AmbiguousError(f"sent, then {describe(exc)}", job_id=job.id) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, *NOT_SENDABLE) as exc:
            raise NotSentError(not_sent(exc, url), job_id=job.id) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # OSError: a reset the HTTP library did not wrap (aiohttp before 3.10.6 let a
            # ConnectionResetError out of an upload); the disk's errors are ImageWriteError.
            raise AmbiguousError(f"sent, then {describe(exc)}", job_id=job.id) from None
        if not isinstance(payload, dict):
            raise AmbiguousError("a 200 response that is not a JSON object", job_id=job.id)
        return payload, scanner, sink, limits

    async def _download(self, url: str, job_id: str, sink: BinaryIO) -> int:
        """Fetch a billed generation's image from its url into ``sink``, retrying the download
        alone; raise :class:`UnfetchedImageError` (a confirmed charge) if it cannot be had."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise UnfetchedImageError(f"image url is not http(s): {url[:80]!r}", job_id=job_id)
        attempts = max(1, self.config.download_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return await self._download_once(url, job_id, _DiskSink(sink))
            except _DownloadFailed as exc:
                if not exc.retryable or attempt == attempts:
                    message = f"image download failed ({attempt} tries): {exc}"
                    raise UnfetchedImageError(message, job_id=job_id) from None
                delay_s = min(self.config.download_backoff_s * 2 ** (attempt - 1), 8.0)
                log.info(
                    "job %s: image download failed (%s); retrying it in %.2f s",
                    job_id,
                    exc,
                    delay_s,
                    extra={"job_id": job_id, "cause": "download", "delay_s": delay_s},
                )
                await _truncate(sink)
                await self._sleep(delay_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _download_once(self, url: str, job_id: str, sink: _DiskSink) -> int:
        try:
            async with self.session.get(
                url,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.download_timeout_s),
            ) as response:
                if response.status != 200:
                    raise _DownloadFailed(f"the image url answered HTTP {response.status}")
                limit = self.config.max_download_bytes
                try:
                    size_bytes = await _stream_capped(response, limit, job_id, sink.write)
                except AmbiguousError as exc:  # over the cap: another try would be too
                    raise _DownloadFailed(exc.message, retryable=False) from None
                if sniff_format(sink.head) is None:  # an error page served with a 200, say
                    raise _DownloadFailed("the image url served something that is not an image")
                return size_bytes
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _DownloadFailed(describe(exc)) from None


class _DownloadFailed(Exception):
    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@contextmanager
def _disk(path: object) -> Iterator[None]:
    """Errors inside are the disk's refusing the image's temp file at ``path``, never the
    network's: :class:`ImageWriteError`."""
    try:
        yield
    except OSError as exc:
        raise ImageWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


class _DiskSink:
    """The temp file an image streams into; it keeps the first bytes, to tell an image."""

    __slots__ = ("_file", "head")

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.head = b""

    def write(self, data: bytes, /) -> int:
        if len(self.head) < 16:
            self.head += data[: 16 - len(self.head)]
        with _disk(self._file.name):
            return self._file.write(data)


async def _close(file: BinaryIO) -> None:
    with _disk(file.name):
        await asyncio.to_thread(file.close)


async def _truncate(file: BinaryIO) -> None:
    """Empty the temp file for another download attempt."""
    with _disk(file.name):
        file.seek(0)
        file.truncate()


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


async def _read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """An error answer's whole body, however many chunks it comes in, up to
    :data:`ERROR_BODY_MAX_BYTES`; nothing if the connection failed meanwhile (a body cut
    short proves nothing: the status alone sorts the error)."""
    body = bytearray()
    try:
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk[: ERROR_BODY_MAX_BYTES - len(body)]
            if len(body) >= ERROR_BODY_MAX_BYTES:
                break
    except (aiohttp.ClientError, TimeoutError):
        return b""
    return bytes(body)


async def _connect_started(
    _session: aiohttp.ClientSession, context: SimpleNamespace, _params: object
) -> None:
    context.connect_started = time.monotonic()
