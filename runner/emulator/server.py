"""The emulator's HTTP server: the handlers, the rate limit, fault choice, the books, the CDN
and the stats.

It owns :class:`Emulator`, the aiohttp app that answers both endpoints: it applies the rate
limit (:mod:`~runner.emulator.bucket`), reads and validates the request
(:mod:`~runner.emulator.incoming`), decides its fault (:mod:`~runner.emulator.faults`), records
it in ``requests`` (:class:`RequestRecord`), renders and bills the image in ``bills``
(:class:`Bill`), keeps ``url`` images for the CDN route, and sends the answer
(:mod:`~runner.emulator.wire`). Deciding, recording and billing happen without an ``await`` in
between, so the books are exact under any concurrency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

from aiohttp import web

from runner.emulator.bucket import Admission, TokenBucket
from runner.emulator.config import EmulatorConfig
from runner.emulator.errors import ErrorReply
from runner.emulator.faults import (
    CDN_FLAKY_FAILURES,
    ERROR_FAULTS,
    NO_FAULT,
    RATE_LIMITED,
    RATE_LIMITED_CODE,
    chunked_fault_reply,
    fault_reply,
)
from runner.emulator.incoming import Incoming, RenderJob, check_auth, read_body, validate
from runner.emulator.render import colour_of, edit_usage, noise_png_b64, render_png, size_label
from runner.emulator.wire import close_connection, escaped_b64, send_chunks
from runner.provider import PRICE_PER_IMAGE_USD, Endpoint

logger = logging.getLogger(__name__)

_B64_PREFIX: Final = "data:image/png;base64,"
_BAD_B64: Final = "iVBORw0KGgo*not*base64*"
_BAD_CDN_BYTES: Final = b"<html><body>this is not an image</body></html>"
_CDN_MAX_ENTRIES: Final = 1024
_CDN_DEAD: Final = 1 << 30  # "cdn_dead": downloads that fail before one is served
_CLIENT_MAX_SIZE_BYTES: Final = 128 * 1024 * 1024
_B64_PLACEHOLDER: Final = "@@b64@@"


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
        incoming = await read_body(request, endpoint)
        if admission is not None and not admission.admitted:
            self._record(seq, endpoint, incoming, RATE_LIMITED, 429, received_at)
            error = ErrorReply(429, "Rate limit reached for requests.", None, *RATE_LIMITED_CODE)
            return error.response(headers)
        latency_s = self.config.latency_s
        latency_s += self._latency_rng.uniform(0, self.config.latency_jitter_s)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        # From here to the response (or to "slow"'s sleep) nothing awaits: decide, record, bill.
        try:
            check_auth(request, self.config.api_key)
            if incoming.error is not None:
                raise incoming.error
            job = validate(endpoint, incoming)
        except ErrorReply as exc:
            self._record(seq, endpoint, incoming, None, exc.status, received_at)
            return exc.response(headers)
        fault = self._decide_fault(job)
        error_fault = ERROR_FAULTS.get(fault or NO_FAULT)
        if error_fault is not None:
            self._record(seq, endpoint, incoming, fault, error_fault.status, received_at)
            if error_fault.chunked:
                return await chunked_fault_reply(request, fault or NO_FAULT, error_fault, headers)
            retry_after_s = self.config.retry_after_s
            return fault_reply(fault or NO_FAULT, error_fault, headers, retry_after_s)
        if fault == "drop":
            self._record(seq, endpoint, incoming, fault, 0, received_at)
            close_connection(request, reset=False)
            raise asyncio.CancelledError
        status = 0 if fault == "reset" else 200
        self._record(seq, endpoint, incoming, fault, status, received_at)
        chunks = self._generate(request, seq, endpoint, job, fault)
        logger.debug("request %d %s: fault %s", seq, endpoint, fault)
        if fault == "reset":
            close_connection(request, reset=True)
            raise asyncio.CancelledError
        half_bytes = sum(map(len, chunks)) // 2
        if fault == "truncate":
            return await send_chunks(request, chunks, headers, cut_after_bytes=half_bytes)
        if fault == "malformed":
            chunks = (b"".join(chunks)[:half_bytes],)
        elif fault == "slow":
            await asyncio.sleep(self.config.slow_s)
        return await send_chunks(request, chunks, headers)

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

    def _decide_fault(self, job: RenderJob) -> str | None:
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
        incoming: Incoming,
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
            tuple(size_label(data) for _, data in incoming.images), received_at, time.time(),
        )  # fmt: skip
        self.requests.append(record)

    def _generate(
        self, request: web.Request, seq: int, endpoint: Endpoint, job: RenderJob, fault: str | None
    ) -> tuple[bytes, ...]:
        """Render, store and bill the image; return the JSON body that carries it, in chunks."""
        width = job.width + 16 if fault == "badsize" else job.width
        if self.config.payload == "noise":
            png, b64 = noise_png_b64(width, job.height)
        else:
            png = render_png(width, job.height, colour_of(job.prompt))
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
            payload["usage"] = edit_usage(job.prompt, job.image_count, job.width, job.height)
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
            prefix, b64 = escaped_b64(prefix.encode()).decode(), escaped_b64(b64)
        return ((head + prefix).encode(), b64, tail.encode())

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
