"""What the provider's answers say in their headers about when to send again.

Two families, both read leniently (a value that does not parse is as good as absent: a header
is advice, never a reason to fail a job):

- ``retry-after-ms`` and ``retry-after`` (seconds or an HTTP date), on a 429 or a 503: how long
  to wait before this request's retry (:func:`retry_after_from`);
- OpenAI's ``x-ratelimit-limit-requests``, ``-remaining-requests`` and ``-reset-requests``
  (a Go-style duration such as ``6m0s``), on any answer: the request rate the account may use,
  which the pacer (:mod:`runner.core.pacer`) keeps under (:func:`rate_limit_headers`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from runner.provider import RateLimitHeaders

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations (``"1s"``, ``"6m0s"``, ``"250ms"``, ``"1h2m3.5s"``) or plain
    seconds (``"0.5"``), in seconds; None if it is neither."""
    text = text.strip()
    try:
        value = float(text)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders | None:
    """The request-rate headers of a response, if it carries any."""
    limit = headers.get("x-ratelimit-limit-requests")
    remaining = headers.get("x-ratelimit-remaining-requests")
    reset = headers.get("x-ratelimit-reset-requests")
    if limit is None and remaining is None and reset is None:
        return None

    def number(text: str | None) -> float | None:
        try:
            value = float(text) if text is not None else math.nan
        except ValueError:
            return None
        return value if math.isfinite(value) and value >= 0 else None

    limit_rpm = number(limit)
    left = number(remaining)
    return RateLimitHeaders(
        limit_rpm=limit_rpm if limit_rpm else None,
        remaining=int(left) if left is not None else None,
        reset_s=parse_duration(reset) if reset is not None else None,
    )


def retry_after_from(headers: Mapping[str, str]) -> float | None:
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
