"""The faults the emulator can inject: their kinds, the error replies, the prompt directive.

Error replies (:data:`ERROR_FAULTS`, the ``*_chunked`` ones sent in several chunks with a
pause between them, ``"policy200"`` a content refusal inside a 200) and ``"drop"`` are never
billed; :data:`BILLED_FAULTS` strike after the server did the work. Some of those are not even
failures for a careful client: ``"escaped_b64"`` writes the base64 with JSON escapes (a plus as
a backslash-u escape, an escaped slash) and spaces, ``"cdn_flaky"`` serves a ``url`` image only
on the third try; ``"cdn_dead"`` never serves it, ``"empty200"`` answers ``"data": []``. A
``[[faults:K1,K2,...]]`` directive in a prompt scripts the faults of the requests that carry
that exact prompt. :data:`RATE_LIMITED` is not injected: it is what the books say of a request
the rate limit refused.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Final, NamedTuple

from aiohttp import web

from runner.emulator.errors import INVALID_REQUEST, ErrorReply


class ErrorFault(NamedTuple):
    status: int
    type: str
    code: str | None
    retry_after: bool  # sends retry-after and retry-after-ms
    should_retry: str | None  # the x-should-retry header the OpenAI SDK obeys
    chunked: bool = False  # the body in several chunks, a pause between them


_SERVER = "server_error"
ERROR_FAULTS: Final[Mapping[str, ErrorFault]] = {
    "429": ErrorFault(429, "requests", "rate_limit_exceeded", True, None),
    "quota": ErrorFault(429, "insufficient_quota", "insufficient_quota", False, None),
    "401": ErrorFault(401, INVALID_REQUEST, "invalid_api_key", False, None),
    "403": ErrorFault(403, INVALID_REQUEST, "permission_denied", False, None),
    "500": ErrorFault(500, _SERVER, None, False, None),
    "502": ErrorFault(502, _SERVER, None, False, None),  # with an HTML body, as gateways do
    "503": ErrorFault(503, _SERVER, None, True, None),
    "504": ErrorFault(504, _SERVER, None, False, None),
    "500_noretry": ErrorFault(500, _SERVER, None, False, "false"),
    "400_retry": ErrorFault(400, INVALID_REQUEST, None, False, "true"),
    "policy": ErrorFault(400, INVALID_REQUEST, "content_policy_violation", False, None),
    "quota_chunked": ErrorFault(
        429, "insufficient_quota", "insufficient_quota", False, None, chunked=True
    ),
    "policy_chunked": ErrorFault(
        400, INVALID_REQUEST, "content_policy_violation", False, None, chunked=True
    ),
    # A gateway's content refusal, wrapped in a 200.
    "policy200": ErrorFault(200, INVALID_REQUEST, "content_policy_violation", False, None),
}
BILLED_FAULTS: Final = (
    "reset", "truncate", "malformed", "badb64", "slow", "badsize",
    "empty200", "escaped_b64", "cdn_flaky", "cdn_dead",
)  # fmt: skip
CDN_FLAKY_FAILURES: Final = 2  # "cdn_flaky": the url fails this many downloads, then serves
FAULT_KINDS: Final = (*ERROR_FAULTS, "drop", *BILLED_FAULTS)
DEFAULT_FAULT_MIX: Final = (
    "429", "500", "502", "503", "reset", "drop", "truncate", "malformed", "badb64", "slow",
)  # fmt: skip
NO_FAULT: Final = "ok"
RATE_LIMITED: Final = "rate_limited"  # the fault of a request the rate limit refused
RATE_LIMITED_CODE: Final = ("rate_limit_exceeded", "requests")  # OpenAI's code and type
_CHUNK_PAUSE_S: Final = 0.02  # between the chunks of a "*_chunked" error body

_DIRECTIVE = re.compile(r"\[\[faults:([^\]]*)\]\]")


def parse_directive(prompt: str) -> tuple[str, ...] | None:
    match = _DIRECTIVE.search(prompt)
    if match is None:
        return None
    kinds = tuple(kind.strip() for kind in match.group(1).split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS and kind != NO_FAULT]
    if unknown:
        raise ErrorReply(
            400, f"Unknown fault kinds {unknown}.", "prompt", "invalid_fault_directive"
        )
    return kinds


def fault_reply(
    kind: str, fault: ErrorFault, limit_headers: Mapping[str, str], retry_after_s: float
) -> web.Response:
    """The error reply of ``fault``; ``retry_after_s`` is what it says when it says one."""
    headers = dict(limit_headers)
    if fault.retry_after:
        headers["retry-after"] = f"{retry_after_s:g}"
        headers["retry-after-ms"] = f"{retry_after_s * 1000:g}"
    if fault.should_retry is not None:
        headers["x-should-retry"] = fault.should_retry
    if fault.status == 502:
        html = "<html><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(status=502, text=html, content_type="text/html", headers=headers)
    message = f"Emulated fault {kind!r}."
    return ErrorReply(fault.status, message, None, fault.code, fault.type).response(headers)


async def chunked_fault_reply(
    request: web.Request, kind: str, fault: ErrorFault, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The error reply of ``fault``, its body in three chunks with a pause between them, as
    a gateway that streams its answers sends it: the code comes only in the last."""
    reply = ErrorReply(fault.status, f"Emulated fault {kind!r}.", None, fault.code, fault.type)
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
