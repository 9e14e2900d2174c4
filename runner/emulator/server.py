"""The emulator's HTTP server: the handlers, the rate limit, the books, the CDN and the stats.

It owns :class:`Emulator` (the aiohttp app that answers both endpoints, applies the rate limit,
decides each request's fault, records it in ``requests`` and bills it in ``bills``), its
configuration (:class:`EmulatorConfig`), :class:`EmulatorThread` for tests that need the server
on its own thread, and :func:`serve` behind ``image-runner emulate``.

A success's body is sent as the chunks :meth:`Emulator._generate` returns: the JSON around the
image, and the image's base64, which for ``payload="noise"`` is the one cached copy of that
size's. Sixteen 33 MB answers in flight thus cost no 33 MB copy each, only the socket buffers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Final, Literal

from aiohttp import web

from runner.emulator.bucket import Admission, TokenBucket
from runner.emulator.errors import _ApiError
from runner.emulator.faults import (
    _ERROR_FAULTS,
    CDN_FLAKY_FAILURES,
    DEFAULT_FAULT_MIX,
    FAULT_KINDS,
    NO_FAULT,
    _ErrorFault,
)
from runner.emulator.incoming import _check_auth, _Incoming, _Job, _read_body, _validate
from runner.emulator.render import _colour, _noise_png_b64, _render_png, _size_label, _usage
from runner.provider import PRICE_PER_IMAGE_USD, Endpoint

logger = logging.getLogger(__name__)

_B64_PREFIX: Final = "data:image/png;base64,"
_BAD_B64: Final = "iVBORw0KGgo*not*base64*"
_BAD_CDN_BYTES: Final = b"<html><body>this is not an image</body></html>"
_CDN_MAX_ENTRIES: Final = 1024
_CDN_DEAD: Final = 1 << 30  # "cdn_dead": downloads that fail before one is served
_CHUNK_PAUSE_S: Final = 0.02  # between the chunks of a "*_chunked" error body
_CLIENT_MAX_SIZE_BYTES: Final = 128 * 1024 * 1024
_WRITE_SLICE_BYTES: Final = 1024 * 1024  # what one write hands the socket buffer, at most
_B64_PLACEHOLDER: Final = "@@b64@@"
RATE_LIMITED: Final = "rate_limited"  # the fault of a request the rate limit refused
_RATE_LIMITED_CODE: Final = ("rate_limit_exceeded", "requests")  # OpenAI's code and type


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves; the defaults answer every valid request at once, correctly."""

    latency_s: float = 0.0  # before every API response
    latency_jitter_s: float = 0.0  # plus uniform(0, jitter)
    fault_rate: float = 0.0  # share of requests that draw a random fault from fault_kinds
    fault_kinds: tuple[str, ...] = DEFAULT_FAULT_MIX
    seed: int | None = None  # makes the random faults and jitter reproducible
    retry_after_s: float = 0.05  # the Retry-After of injected 429 and 503
    slow_s: float = 2.0  # how long "slow" holds a billed answer back
    api_key: str | None = None  # None: any Bearer key is accepted
    b64_prefix: bool = True  # the provider's "data:image/png;base64,"; False: plain OpenAI
    cdn_ttl_s: float = 3600
    script: tuple[str, ...] = ()  # faults for the 1st, 2nd, ... valid request; "ok" for none
    payload: Literal["flat", "noise"] = "flat"  # noise: incompressible, ~25 MB at 3840x2160
    # A token bucket checked when a request arrives (before the latency); refusals are 429s.
    rate_limit_rpm: float | None = None  # None: no limit
    rate_limit_burst: int = 10  # the bucket's size
    rate_limit_headers: bool = False  # False: the 429 says nothing about when to come back
    rate_limit_scope: Literal["shared", "per_endpoint"] = "shared"  # one bucket, or one each

    def __post_init__(self) -> None:
        unknown = [k for k in self.fault_kinds if k not in FAULT_KINDS]
        unknown += [k for k in self.script if k not in FAULT_KINDS and k != NO_FAULT]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if self.payload not in ("flat", "noise"):
            raise ValueError(f"payload must be flat or noise, got {self.payload!r}")
        if self.rate_limit_rpm is not None and self.rate_limit_rpm <= 0:
            raise ValueError(f"rate_limit_rpm must be more than 0, got {self.rate_limit_rpm}")
        if self.rate_limit_burst < 1:
            raise ValueError(f"rate_limit_burst must be at least 1, got {self.rate_limit_burst}")
        if self.rate_limit_headers and self.rate_limit_rpm is None:
            raise ValueError("rate_limit_headers announces a limit: set rate_limit_rpm too")
        if self.rate_limit_scope not in ("shared", "per_endpoint"):
            raise ValueError(
                f"rate_limit_scope must be shared or per_endpoint, got {self.rate_limit_scope!r}"
            )


@dataclass(frozen=True)
class Bill:
    """One billed image: a success, or a fault that struck after the server did the work."""

    seq: int
    endpoint: str
    model: str
    size: str  # the size rendered (``auto`` resolved), not the field as sent
    prompt: str
    cost_usd: float
    outcome: str  # "ok" or the fault kind


@dataclass(frozen=True)
class RequestRecord:
    """One request to an API endpoint, as received; ``status`` 0 means no response was sent.

    ``received_at`` and ``answered_at`` are ``time.time()`` (so another process can compare
    them): when the request arrived, and when its answer was decided, after the latency but
    before a ``slow`` fault's delay and before the body was sent.
    """

    seq: int
    endpoint: str
    model: str
    prompt: str
    size: str | None  # as sent; None when the field was absent
    response_format: str | None
    image_part_names: tuple[str, ...]
    image_count: int
    fault: str | None
    status: int
    image_sizes: tuple[str, ...] = ()  # "WxH" of each reference in upload order, or "invalid"
    received_at: float = 0.0
    answered_at: float = 0.0


async def _send(
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
        _close_connection(request, reset=False)
    return response


def _close_connection(request: web.Request, *, reset: bool) -> None:
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


class Emulator:
    """The images API on a loopback port, with its books (``requests``, ``bills``)."""

    def __init__(
        self, config: EmulatorConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or EmulatorConfig()
        self._clock = clock  # of the rate limit's buckets
        self.requests: list[RequestRecord] = []
        self.bills: list[Bill] = []
        self._seq = 0
        self._valid_count = 0
        self._prompt_counts: defaultdict[str, int] = defaultdict(int)
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(self.config.seed)
        # name -> (expires at, the image, downloads left to fail)
        self._cdn: OrderedDict[str, list[Any]] = OrderedDict()
        self._buckets: dict[str, TokenBucket] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Emulator {self._base_url or 'stopped'} requests={len(self.requests)}"
            f" bills={len(self.bills)} billed_usd={self.billed_usd}>"
        )

    @property
    def billed_usd(self) -> float:
        return round(sum(bill.cost_usd for bill in self.bills), 2)

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the emulator is not running")
        return self._base_url

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE_BYTES)
        app.router.add_post("/v1/images/generations", self._handle_generations)
        app.router.add_post("/v1/images/edits", self._handle_edits)
        app.router.add_get("/cdn/{name}.png", self._handle_cdn)
        app.router.add_get("/_emulator/stats", self._handle_stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port) and return the base URL, ``.../v1``."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        url_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self._base_url = f"http://{url_host}:{bound_port}/v1"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._base_url = None

    async def _handle_generations(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "generations")

    async def _handle_edits(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "edits")

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        self._seq += 1
        seq, received_at = self._seq, time.time()
        admission = self._admit(endpoint)
        headers: dict[str, str] = {}  # what the answer tells of the rate limit, if anything
        if admission is not None and self.config.rate_limit_headers:
            headers = admission.headers()
        incoming = await _read_body(request, endpoint)
        if admission is not None and not admission.admitted:
            self._record(seq, endpoint, incoming, RATE_LIMITED, 429, received_at)
            error = _ApiError(429, "Rate limit reached for requests.", None, *_RATE_LIMITED_CODE)
            return error.response(headers)
        latency_s = self.config.latency_s
        latency_s += self._latency_rng.uniform(0, self.config.latency_jitter_s)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        # From here to the response (or to "slow"'s sleep) nothing awaits: decide, record, bill.
        try:
            _check_auth(request, self.config.api_key)
            if incoming.error is not None:
                raise incoming.error
            job = _validate(endpoint, incoming)
        except _ApiError as exc:
            self._record(seq, endpoint, incoming, None, exc.status, received_at)
            return exc.response(headers)
        fault = self._decide_fault(job)
        error_fault = _ERROR_FAULTS.get(fault or NO_FAULT)
        if error_fault is not None:
            self._record(seq, endpoint, incoming, fault, error_fault.status, received_at)
            if error_fault.chunked:
                return await self._chunked_error(request, fault or NO_FAULT, error_fault, headers)
            return self._error_fault_response(fault or NO_FAULT, error_fault, headers)
        if fault == "drop":
            self._record(seq, endpoint, incoming, fault, 0, received_at)
            _close_connection(request, reset=False)
            raise asyncio.CancelledError
        status = 0 if fault == "reset" else 200
        self._record(seq, endpoint, incoming, fault, status, received_at)
        chunks = self._generate(request, seq, endpoint, job, fault)
        logger.debug("request %d %s: fault %s", seq, endpoint, fault)
        if fault == "reset":
            _close_connection(request, reset=True)
            raise asyncio.CancelledError
        half_bytes = sum(map(len, chunks)) // 2
        if fault == "truncate":
            return await _send(request, chunks, headers, cut_after_bytes=half_bytes)
        if fault == "malformed":
            chunks = (b"".join(chunks)[:half_bytes],)
        elif fault == "slow":
            await asyncio.sleep(self.config.slow_s)
        return await _send(request, chunks, headers)

    def _admit(self, endpoint: Endpoint) -> Admission | None:
        """Take a token from the endpoint's bucket; None when there is no rate limit."""
        if self.config.rate_limit_rpm is None:
            return None
        scope = endpoint if self.config.rate_limit_scope == "per_endpoint" else "shared"
        bucket = self._buckets.get(scope)
        if bucket is None:
            rpm, burst = self.config.rate_limit_rpm, self.config.rate_limit_burst
            bucket = self._buckets[scope] = TokenBucket(rpm, burst, self._clock)
        return bucket.take()

    def _decide_fault(self, job: _Job) -> str | None:
        self._valid_count += 1
        kind: str | None = None
        if job.directive is not None:
            self._prompt_counts[job.prompt] += 1
            nth = self._prompt_counts[job.prompt]
            kind = job.directive[nth - 1] if nth <= len(job.directive) else NO_FAULT
        elif self._valid_count <= len(self.config.script):
            kind = self.config.script[self._valid_count - 1]
        elif self.config.fault_rate > 0 and self._fault_rng.random() < self.config.fault_rate:
            kind = self._fault_rng.choice(self.config.fault_kinds)
        return None if kind == NO_FAULT else kind

    def _record(
        self,
        seq: int,
        endpoint: str,
        incoming: _Incoming,
        fault: str | None,
        status: int,
        received_at: float,
    ) -> None:
        def text(name: str) -> str | None:
            value = incoming.fields.get(name)
            return value if isinstance(value, str) else None

        names = tuple(name for name, _ in incoming.images)
        model, prompt = text("model") or "", text("prompt") or ""
        size, response_format = text("size"), text("response_format")
        record = RequestRecord(
            seq, endpoint, model, prompt, size, response_format, names, len(names), fault, status,
            tuple(_size_label(data) for _, data in incoming.images), received_at, time.time(),
        )  # fmt: skip
        self.requests.append(record)

    def _generate(
        self, request: web.Request, seq: int, endpoint: Endpoint, job: _Job, fault: str | None
    ) -> tuple[bytes, ...]:
        """Render, store and bill the image; return the JSON body that carries it, in chunks."""
        width = job.width + 16 if fault == "badsize" else job.width
        if self.config.payload == "noise":
            png, b64 = _noise_png_b64(width, job.height)
        else:
            png = _render_png(width, job.height, _colour(job.prompt))
            b64 = base64.b64encode(png)
        item: dict[str, str]
        if job.response_format == "url":
            name = uuid.uuid4().hex
            failures = {"cdn_flaky": CDN_FLAKY_FAILURES, "cdn_dead": _CDN_DEAD}.get(fault or "", 0)
            self._store_cdn(name, _BAD_CDN_BYTES if fault == "badb64" else png, failures)
            item = {"url": f"{request.scheme}://{request.host}/cdn/{name}.png"}
        else:
            item = {"b64_json": _B64_PLACEHOLDER}
        payload: dict[str, object] = {
            "created": int(time.time()),
            "data": [] if fault == "empty200" else [item],
        }
        if endpoint == "edits":
            payload["usage"] = _usage(job.prompt, job.image_count, job.width, job.height)
        bill = Bill(
            seq, endpoint, job.model, job.size, job.prompt, PRICE_PER_IMAGE_USD, fault or "ok"
        )
        self.bills.append(bill)
        text = json.dumps(payload)
        if job.response_format == "url" or fault == "empty200":
            return (text.encode(),)
        # Base64 needs no JSON escaping, so the image goes in as it is, never copied.
        head, tail = text.split(_B64_PLACEHOLDER)
        prefix = _B64_PREFIX if self.config.b64_prefix else ""
        if fault == "badb64":
            b64 = _BAD_B64.encode()
        elif fault == "escaped_b64":
            prefix, b64 = _escaped(prefix.encode()).decode(), _escaped(b64)
        return ((head + prefix).encode(), b64, tail.encode())

    def _error_fault_response(
        self, kind: str, fault: _ErrorFault, limit_headers: Mapping[str, str]
    ) -> web.Response:
        headers = dict(limit_headers)
        if fault.retry_after:
            headers["retry-after"] = f"{self.config.retry_after_s:g}"
            headers["retry-after-ms"] = f"{self.config.retry_after_s * 1000:g}"
        if fault.should_retry is not None:
            headers["x-should-retry"] = fault.should_retry
        if fault.status == 502:
            html = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, text=html, content_type="text/html", headers=headers)
        message = f"Emulated fault {kind!r}."
        return _ApiError(fault.status, message, None, fault.code, fault.type).response(headers)

    async def _chunked_error(
        self, request: web.Request, kind: str, fault: _ErrorFault, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """The error reply of ``fault``, its body in three chunks with a pause between them, as
        a gateway that streams its answers sends it: the code comes only in the last."""
        reply = _ApiError(fault.status, f"Emulated fault {kind!r}.", None, fault.code, fault.type)
        body = reply.response().body
        assert isinstance(body, bytes)
        response = web.StreamResponse(status=fault.status, headers=headers)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        third = len(body) // 3
        for piece in (body[:third], body[third : 2 * third], body[2 * third :]):
            await response.write(piece)
            await asyncio.sleep(_CHUNK_PAUSE_S)
        await response.write_eof()
        return response

    def _store_cdn(self, name: str, data: bytes, failures: int = 0) -> None:
        self._cdn[name] = [time.monotonic() + self.config.cdn_ttl_s, data, failures]
        while len(self._cdn) > _CDN_MAX_ENTRIES:
            self._cdn.popitem(last=False)

    async def _handle_cdn(self, request: web.Request) -> web.Response:
        entry = self._cdn.get(request.match_info["name"])
        if entry is None or entry[0] < time.monotonic():
            return web.Response(status=404, text="not found or expired")
        if entry[2] > 0:  # "cdn_flaky", "cdn_dead": this download fails
            entry[2] -= 1
            return web.Response(status=503, text="the CDN is having a moment")
        return web.Response(body=entry[1], content_type="image/png")

    async def _handle_stats(self, request: web.Request) -> web.Response:
        """The books; ``?since=SEQ`` lists only the records of requests that arrived after the
        SEQth (the totals still count all), so a long benchmark reads each run's alone."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be an integer"}, status=400)
        return web.json_response(
            {
                "requests": len(self.requests),
                "last_seq": self._seq,
                "bills": len(self.bills),
                "billed_usd": self.billed_usd,
                "bill_records": [asdict(bill) for bill in self.bills if bill.seq > since],
                "request_records": [asdict(r) for r in self.requests if r.seq > since],
            }
        )


def _escaped(b64: bytes) -> bytes:
    """The same base64 as a .NET serializer or a gateway may write it: ``+`` as ``\\u002B``,
    ``/`` as ``\\/`` or ``\\u002F``, and a space every 76 characters. Valid JSON, and the same
    base64 to a decoder that follows JSON and the base64 spec."""
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    text = b" ".join(lines).replace(b"+", b"\\u002B").replace(b"/", b"\\/")
    return text.replace(b"\\/", b"\\u002F", 3)


class EmulatorThread:
    """An :class:`Emulator` on its own event loop in a daemon thread, for subprocess tests.

    ``with EmulatorThread(config) as server:`` returns once the server listens; pass
    ``server.base_url`` to the runner, then read ``server.emulator.bills`` after it finished.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.emulator = Emulator(config)
        self.base_url = ""
        self._address = (host, port)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(timeout=10.0)
        if not self.base_url:
            raise RuntimeError("the emulator thread did not start listening")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10.0)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.base_url = await self.emulator.start(*self._address)
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.emulator.stop()


async def serve(
    config: EmulatorConfig,
    host: str,
    port: int,
    on_ready: Callable[[str], object] | None = None,
) -> None:
    """Run the emulator on ``host:port`` until cancelled (``image-runner emulate``).

    ``on_ready`` receives the base URL (``http://host:port/v1``) once the server listens, so the
    caller can show it even when ``port`` was 0. Cancelling the task stops the server cleanly.
    """
    emulator = Emulator(config)
    base_url = await emulator.start(host, port)
    logger.info("emulator listening on %s", base_url)
    if on_ready is not None:
        on_ready(base_url)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
