"""What an answer of the images API means: the image it points to, or the error that says what
to do next.

The client (:mod:`runner.http.client`) sends and reads; this module only judges, from the
status, the headers and the body the client read. The errors are the :mod:`runner.errors`
classes, sorted by what the outcome means for billing and retrying:

- an error answer is sorted by its status and its code (:func:`error_from_answer`): 401 and 403
  stop the run, and so does a 429 whose code says the money ran out (no wait clears that); 408,
  409, other 429s and 5xx are retried, unbilled; the rest fail the job. ``x-should-retry``, the
  header the OpenAI SDK obeys, overrides the status either way;
- an error object inside a 200 (some gateways send one) is sorted by its code as if it had come
  with its own status (:func:`error_in_200`): it is not an unknown outcome, and a content
  refusal in a 200 is as final as one in a 400;
- a 200 without an image is a possible charge, saying what it lacked (:func:`image_url`);
- a request that never reached the server says where it could not connect (:func:`not_sent`).

Messages pass through :func:`runner.redact.redact`: a provider that echoes the key in an error
must not put it into the checkpoint or the logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from runner.errors import AmbiguousError, ApiError, JobFailedError, RunStoppedError, ServerError
from runner.http.headers import rate_limit_headers, retry_after_from
from runner.provider import SPEND_LIMIT_CODES, RateLimitHeaders
from runner.redact import redact

# What an error object's code or type says its status would have been, for an error that came
# inside a 200: the class follows from the status, as for any error answer. A request error
# names its fault (400, final for the job); an error that names nothing known is taken for the
# provider's (500: retried, unbilled).
_STATUS_OF_CODE = {
    "invalid_request_error": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_denied": 403,
    "permission_error": 403,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "requests": 429,
    "tokens": 429,
    "server_error": 500,
    "api_error": 500,
    "overloaded_error": 503,
    "service_unavailable": 503,
    "timeout": 408,
    "content_policy_violation": 400,
    "model_not_found": 404,
}


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None


def usage_from(raw: object) -> Usage | None:
    """The token counts of a 200's ``usage`` object; a count that is not a sane integer is
    None, never a reason to lose the image."""
    if not isinstance(raw, dict):
        return None

    def number(key: str) -> int | None:
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
            return value
        return None

    return Usage(number("input_tokens"), number("output_tokens"), number("total_tokens"))


def image_url(payload: dict[str, Any], job_id: str) -> str:
    """The ``data[0].url`` of a 200 whose body carried no ``b64_json`` image; raise the error
    the body means if it has none."""
    error = payload.get("error")
    if isinstance(error, dict):
        raise error_in_200(error, job_id)
    data = payload.get("data")
    if isinstance(data, list) and not data:
        message = "a 200 response with an empty data list: no image, maybe billed"
        raise AmbiguousError(message, job_id=job_id)
    item = data[0] if isinstance(data, list) else None
    if not isinstance(item, dict):
        raise AmbiguousError("a 200 response without data[0]", job_id=job_id)
    url = item.get("url")
    if not isinstance(url, str):
        raise AmbiguousError("data[0] has neither b64_json nor url", job_id=job_id)
    return url


def error_from_answer(
    status: int, body: bytes, headers: Mapping[str, str], job_id: str
) -> ApiError:
    """Sort a non-200 answer (its body as far as it could be read) into the error class that
    says what to do next."""
    message, code, error_type = f"HTTP {status}", None, ""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code, error_type = _code(error), str(error.get("type") or "")
    except (ValueError, AttributeError, RecursionError):
        pass
    return _classify(
        status,
        message,
        code,
        job_id=job_id,
        error_type=error_type,
        retry_after_s=retry_after_from(headers),
        should_retry=headers.get("x-should-retry", "").lower(),
        rate_limit=rate_limit_headers(headers),
    )


def error_in_200(error: dict[str, Any], job_id: str) -> ApiError:
    """Sort an error object that came inside a 200 by its code or type, as if it had come with
    the status they go with (a numeric code is that status). One that names nothing known is
    taken for a server error: retried, unbilled, never a job failed for good on a guess."""
    code, kind = _code(error), str(error.get("type") or "")
    raw = error.get("code")
    if isinstance(raw, int | str) and str(raw).isdigit() and 400 <= int(raw) <= 599:
        status = int(raw)
    elif _spend_limit(code, kind):
        status = 429
    else:
        status = _STATUS_OF_CODE.get(code or "") or _STATUS_OF_CODE.get(kind) or 500
    message = f"{error.get('message') or 'an error'} (an error object inside a 200 response)"
    return _classify(status, message, code, job_id=job_id, error_type=kind)


def not_sent(exc: aiohttp.ClientError, url: str) -> str:
    """What a user needs to fix a request that never reached the server: where it went."""
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return redact(f"cannot send to {url}: not an http(s) URL with a host")
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return redact(f"cannot resolve the host {parts.hostname}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return redact(f"connection refused to {where}")
        return redact(f"cannot connect to {where}: {os_error.strerror or os_error}")
    return redact(f"connecting to {where} timed out")


def describe(exc: BaseException) -> str:
    """A failure of the network once the request went (or of an image download), in words for
    the error's message: its class and text, the key redacted."""
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}" if str(exc) else text)


def _code(error: dict[str, Any]) -> str | None:
    return str(error.get("code") or error.get("type") or "") or None


def _spend_limit(code: str | None, error_type: str) -> bool:
    return code in SPEND_LIMIT_CODES or error_type in SPEND_LIMIT_CODES


def _classify(
    status: int,
    message: str,
    code: str | None,
    *,
    job_id: str,
    error_type: str = "",
    retry_after_s: float | None = None,
    should_retry: str = "",
    rate_limit: RateLimitHeaders | None = None,
) -> ApiError:
    kwargs: dict[str, Any] = {
        "job_id": job_id,
        "status": status,
        "code": code,
        "rate_limit": rate_limit,
    }
    message = redact(message)
    if status in (401, 403):
        return RunStoppedError(message, **kwargs)
    if status == 429 and _spend_limit(code, error_type):
        return RunStoppedError(message, **kwargs)
    if should_retry == "true" or (
        should_retry != "false" and (status in (408, 409, 429) or status >= 500)
    ):
        return ServerError(message, retry_after_s=retry_after_s, **kwargs)
    return JobFailedError(message, **kwargs)
