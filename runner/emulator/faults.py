"""The faults the emulator can inject: their kinds, the error replies, the prompt directive.

Error replies (:data:`_ERROR_FAULTS`, the ``*_chunked`` ones sent in several chunks with a
pause between them, ``"policy200"`` a content refusal inside a 200) and ``"drop"`` are never
billed; :data:`BILLED_FAULTS` strike after the server did the work. Some of those are not even
failures for a careful client: ``"escaped_b64"`` writes the base64 with JSON escapes (a plus as
a backslash-u escape, an escaped slash) and spaces, ``"cdn_flaky"`` serves a ``url`` image only
on the third try; ``"cdn_dead"`` never serves it, ``"empty200"`` answers ``"data": []``. A
``[[faults:K1,K2,...]]`` directive in a prompt scripts the faults of the requests that carry
that exact prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, NamedTuple

from runner.emulator.errors import _INVALID, _ApiError


class _ErrorFault(NamedTuple):
    status: int
    type: str
    code: str | None
    retry_after: bool  # sends retry-after and retry-after-ms
    should_retry: str | None  # the x-should-retry header the OpenAI SDK obeys
    chunked: bool = False  # the body in several chunks, a pause between them


_SERVER = "server_error"
_ERROR_FAULTS: Final[Mapping[str, _ErrorFault]] = {
    "429": _ErrorFault(429, "requests", "rate_limit_exceeded", True, None),
    "quota": _ErrorFault(429, "insufficient_quota", "insufficient_quota", False, None),
    "401": _ErrorFault(401, _INVALID, "invalid_api_key", False, None),
    "403": _ErrorFault(403, _INVALID, "permission_denied", False, None),
    "500": _ErrorFault(500, _SERVER, None, False, None),
    "502": _ErrorFault(502, _SERVER, None, False, None),  # with an HTML body, as gateways do
    "503": _ErrorFault(503, _SERVER, None, True, None),
    "504": _ErrorFault(504, _SERVER, None, False, None),
    "500_noretry": _ErrorFault(500, _SERVER, None, False, "false"),
    "400_retry": _ErrorFault(400, _INVALID, None, False, "true"),
    "policy": _ErrorFault(400, _INVALID, "content_policy_violation", False, None),
    "quota_chunked": _ErrorFault(
        429, "insufficient_quota", "insufficient_quota", False, None, chunked=True
    ),
    "policy_chunked": _ErrorFault(
        400, _INVALID, "content_policy_violation", False, None, chunked=True
    ),
    # A gateway's content refusal, wrapped in a 200.
    "policy200": _ErrorFault(200, _INVALID, "content_policy_violation", False, None),
}
BILLED_FAULTS: Final = (
    "reset", "truncate", "malformed", "badb64", "slow", "badsize",
    "empty200", "escaped_b64", "cdn_flaky", "cdn_dead",
)  # fmt: skip
CDN_FLAKY_FAILURES: Final = 2  # "cdn_flaky": the url fails this many downloads, then serves
FAULT_KINDS: Final = (*_ERROR_FAULTS, "drop", *BILLED_FAULTS)
DEFAULT_FAULT_MIX: Final = (
    "429", "500", "502", "503", "reset", "drop", "truncate", "malformed", "badb64", "slow",
)  # fmt: skip
NO_FAULT: Final = "ok"

_DIRECTIVE = re.compile(r"\[\[faults:([^\]]*)\]\]")


def _parse_directive(prompt: str) -> tuple[str, ...] | None:
    match = _DIRECTIVE.search(prompt)
    if match is None:
        return None
    kinds = tuple(kind.strip() for kind in match.group(1).split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS and kind != NO_FAULT]
    if unknown:
        raise _ApiError(400, f"Unknown fault kinds {unknown}.", "prompt", "invalid_fault_directive")
    return kinds
