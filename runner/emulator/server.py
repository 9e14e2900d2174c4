"""The emulator's HTTP server: validation, the handlers, the books, the CDN and the stats.

It owns :class:`Emulator` (the aiohttp app that answers both endpoints, decides each request's
fault, records it in ``requests`` and bills it in ``bills``), its configuration
(:class:`EmulatorConfig`), :class:`EmulatorThread` for tests that need the server on its own
thread, and :func:`serve` behind ``image-runner emulate``.
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
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Final

from aiohttp import BodyPartReader, web

from runner.api import (
    AUTO_SIZE,
    DEFAULT_RESPONSE_FORMAT,
    MODELS,
    PRICE_PER_IMAGE_USD,
    REJECTED_FIELDS,
    RESPONSE_FORMATS,
    SIZE_SET,
    Endpoint,
    parse_size,
)
from runner.emulator.errors import _ApiError
from runner.emulator.faults import (
    _ERROR_FAULTS,
    DEFAULT_FAULT_MIX,
    FAULT_KINDS,
    NO_FAULT,
    _ErrorFault,
    _parse_directive,
)
from runner.emulator.render import (
    _closest_size,
    _colour,
    _edit_target,
    _image_dimensions,
    _render_png,
    _size_label,
    _usage,
)

logger = logging.getLogger(__name__)

DEFAULT_GENERATION_SIZE: Final = "1280x1280"
_IMAGE_PART_NAMES: Final = ("image", "image[]")
_B64_PREFIX: Final = "data:image/png;base64,"
_BAD_B64: Final = "iVBORw0KGgo*not*base64*"
_BAD_CDN_BYTES: Final = b"<html><body>this is not an image</body></html>"
_CDN_MAX_ENTRIES: Final = 1024
_CLIENT_MAX_SIZE_BYTES: Final = 128 * 1024 * 1024


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

    def __post_init__(self) -> None:
        unknown = [k for k in self.fault_kinds if k not in FAULT_KINDS]
        unknown += [k for k in self.script if k not in FAULT_KINDS and k != NO_FAULT]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")


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
    """One request to an API endpoint, as received; ``status`` 0 means no response was sent."""

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


@dataclass
class _Incoming:
    """A request body, parsed but not yet validated."""

    fields: dict[str, object] = field(default_factory=dict)
    images: list[tuple[str, bytes]] = field(default_factory=list)
    error: _ApiError | None = None


@dataclass(frozen=True)
class _Job:
    model: str
    prompt: str
    width: int
    height: int
    response_format: str
    image_count: int
    directive: tuple[str, ...] | None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


async def _read_body(request: web.Request, endpoint: Endpoint) -> _Incoming:
    incoming = _Incoming()
    try:
        if endpoint == "generations":
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise _ApiError(400, "The body must be a JSON object.", None, "invalid_json")
            incoming.fields = body
            return incoming
        if not request.content_type.startswith("multipart/"):
            raise _ApiError(400, "Edits take multipart/form-data.", None, "invalid_content_type")
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name in _IMAGE_PART_NAMES:
                incoming.images.append((part.name, bytes(await part.read(decode=True))))
            else:
                incoming.fields[part.name] = await part.text()
    except _ApiError as exc:
        incoming.error = exc
    except ValueError as exc:  # bad JSON, bad UTF-8, a broken multipart boundary
        incoming.error = _ApiError(400, f"Could not parse the body: {exc}", None, "invalid_body")
    return incoming


def _check_auth(request: web.Request, api_key: str | None) -> None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _ApiError(401, "You didn't provide an API key.", None, "invalid_api_key")
    if api_key is not None and key.strip() != api_key:
        # Echoed in full, worse than OpenAI's partial mask, so redaction is tested hard.
        message = f"Incorrect API key provided: {key.strip()}."
        raise _ApiError(401, message, None, "invalid_api_key")


def _string_field(fields: Mapping[str, object], name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _ApiError(400, f"'{name}' must be a string.", name, "invalid_type")


def _validate(endpoint: Endpoint, incoming: _Incoming) -> _Job:
    fields = incoming.fields
    for name in REJECTED_FIELDS:
        if name in fields:
            raise _ApiError(400, f"'{name}' is not supported.", name, "unsupported_parameter")
    model = _string_field(fields, "model")
    if not model:
        raise _ApiError(400, "You must provide a model.", "model", "missing_required_parameter")
    if model not in MODELS:
        message = f"The model '{model}' does not exist or you do not have access to it."
        raise _ApiError(404, message, "model", "model_not_found")
    prompt = _string_field(fields, "prompt")
    if prompt is None or not prompt.strip():
        raise _ApiError(400, "You must provide a prompt.", "prompt", "missing_required_parameter")
    response_format = _string_field(fields, "response_format") or DEFAULT_RESPONSE_FORMAT[endpoint]
    if response_format not in RESPONSE_FORMATS:
        message = f"Invalid response_format '{response_format}'; use url or b64_json."
        raise _ApiError(400, message, "response_format", "invalid_value")
    dimensions = [_image_dimensions(data) for _, data in incoming.images]
    if endpoint == "edits" and not dimensions:
        message = "Edits need at least one image."
        raise _ApiError(400, message, "image", "missing_required_parameter")
    size = _string_field(fields, "size")
    if size is None:
        size = DEFAULT_GENERATION_SIZE if endpoint == "generations" else AUTO_SIZE
    if size == AUTO_SIZE and endpoint == "edits":
        size = _closest_size(*dimensions[_edit_target(prompt, len(dimensions))])
    if size not in SIZE_SET:
        message = f"Invalid size '{size}'; use one of the 30 sizes, e.g. 2048x2048."
        raise _ApiError(400, message, "size", "invalid_size")
    width, height = parse_size(size)
    directive = _parse_directive(prompt)
    return _Job(model, prompt, width, height, response_format, len(dimensions), directive)


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

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.requests: list[RequestRecord] = []
        self.bills: list[Bill] = []
        self._seq = 0
        self._valid_count = 0
        self._prompt_counts: defaultdict[str, int] = defaultdict(int)
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(self.config.seed)
        self._cdn: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
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
        seq = self._seq
        incoming = await _read_body(request, endpoint)
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
            self._record(seq, endpoint, incoming, None, exc.status)
            return exc.response()
        fault = self._decide_fault(job)
        error_fault = _ERROR_FAULTS.get(fault or NO_FAULT)
        if error_fault is not None:
            self._record(seq, endpoint, incoming, fault, error_fault.status)
            return self._error_fault_response(fault or NO_FAULT, error_fault)
        if fault == "drop":
            self._record(seq, endpoint, incoming, fault, 0)
            _close_connection(request, reset=False)
            raise asyncio.CancelledError
        status = 0 if fault == "reset" else 200
        self._record(seq, endpoint, incoming, fault, status)
        body = self._generate(request, seq, endpoint, job, fault)
        logger.debug("request %d %s: fault %s", seq, endpoint, fault)
        if fault == "reset":
            _close_connection(request, reset=True)
            raise asyncio.CancelledError
        if fault == "truncate":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            _close_connection(request, reset=False)
            return response
        if fault == "malformed":
            body = body[: len(body) // 2]
        elif fault == "slow":
            await asyncio.sleep(self.config.slow_s)
        return web.Response(body=body, content_type="application/json")

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
        self, seq: int, endpoint: str, incoming: _Incoming, fault: str | None, status: int
    ) -> None:
        def text(name: str) -> str | None:
            value = incoming.fields.get(name)
            return value if isinstance(value, str) else None

        names = tuple(name for name, _ in incoming.images)
        model, prompt = text("model") or "", text("prompt") or ""
        size, response_format = text("size"), text("response_format")
        record = RequestRecord(
            seq, endpoint, model, prompt, size, response_format, names, len(names), fault, status,
            tuple(_size_label(data) for _, data in incoming.images),
        )  # fmt: skip
        self.requests.append(record)

    def _generate(
        self, request: web.Request, seq: int, endpoint: Endpoint, job: _Job, fault: str | None
    ) -> bytes:
        """Render, store and bill the image; return the JSON body that carries it."""
        width = job.width + 16 if fault == "badsize" else job.width
        png = _render_png(width, job.height, _colour(job.prompt))
        item: dict[str, str]
        if job.response_format == "url":
            name = uuid.uuid4().hex
            self._store_cdn(name, _BAD_CDN_BYTES if fault == "badb64" else png)
            item = {"url": f"{request.scheme}://{request.host}/cdn/{name}.png"}
        else:
            b64 = _BAD_B64 if fault == "badb64" else base64.b64encode(png).decode("ascii")
            item = {"b64_json": (_B64_PREFIX if self.config.b64_prefix else "") + b64}
        payload: dict[str, object] = {"created": int(time.time()), "data": [item]}
        if endpoint == "edits":
            payload["usage"] = _usage(job.prompt, job.image_count, job.width, job.height)
        bill = Bill(
            seq, endpoint, job.model, job.size, job.prompt, PRICE_PER_IMAGE_USD, fault or "ok"
        )
        self.bills.append(bill)
        return json.dumps(payload).encode()

    def _error_fault_response(self, kind: str, fault: _ErrorFault) -> web.Response:
        headers: dict[str, str] = {}
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

    def _store_cdn(self, name: str, data: bytes) -> None:
        self._cdn[name] = (time.monotonic() + self.config.cdn_ttl_s, data)
        while len(self._cdn) > _CDN_MAX_ENTRIES:
            self._cdn.popitem(last=False)

    async def _handle_cdn(self, request: web.Request) -> web.Response:
        entry = self._cdn.get(request.match_info["name"])
        if entry is None or entry[0] < time.monotonic():
            return web.Response(status=404, text="not found or expired")
        return web.Response(body=entry[1], content_type="image/png")

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": len(self.requests),
                "bills": len(self.bills),
                "billed_usd": self.billed_usd,
                "bill_records": [asdict(bill) for bill in self.bills],
                "request_records": [asdict(record) for record in self.requests],
            }
        )


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
