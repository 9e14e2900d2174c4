"""The emulator's request-rate limit: a token bucket, and the OpenAI-style headers announcing it.

A bucket holds at most ``burst`` tokens and gains ``rate_per_min / 60`` a second; a request that
finds a whole token takes it, one that does not is answered 429. Only the server decides whether
the client hears about it: :meth:`Admission.headers` gives OpenAI's ``x-ratelimit-*-requests``
headers (and the ``retry-after`` pair on a refusal) for a server that announces its limits.
The clock is injectable, so tests of the arithmetic take no time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Admission:
    """What the bucket said to one request, and the state it left behind."""

    admitted: bool
    limit_per_min: float
    remaining: int  # whole tokens left after this request
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until the next whole token; 0 when admitted

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers; on a refusal also ``retry-after-ms`` and ``retry-after``."""
        limit = self.limit_per_min
        headers = {
            "x-ratelimit-limit-requests": str(int(limit)) if limit.is_integer() else f"{limit}",
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": format_duration(self.reset_s),
        }
        if not self.admitted:
            headers["retry-after-ms"] = str(math.ceil(self.retry_after_s * 1000))
            headers["retry-after"] = str(math.ceil(self.retry_after_s))
        return headers


class TokenBucket:
    """``burst`` tokens at most, refilled continuously at ``rate_per_min``; starts full."""

    def __init__(
        self, rate_per_min: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_min <= 0 or burst < 1:
            raise ValueError(f"need rate_per_min > 0 and burst >= 1, got {rate_per_min}, {burst}")
        self.rate_per_min, self.burst, self._clock = float(rate_per_min), burst, clock
        self.tokens = float(burst)
        self._updated_s = clock()

    def __repr__(self) -> str:
        return (
            f"<TokenBucket {self.rate_per_min:g}/min burst={self.burst} tokens={self.tokens:.2f}>"
        )

    def take(self) -> Admission:
        """Take one token if a whole one is there; say what happened either way."""
        now_s = self._clock()
        rate_per_s = self.rate_per_min / 60
        self.tokens = min(self.burst, self.tokens + (now_s - self._updated_s) * rate_per_s)
        self._updated_s = now_s
        admitted = self.tokens >= 1
        if admitted:
            self.tokens -= 1
        return Admission(
            admitted=admitted,
            limit_per_min=self.rate_per_min,
            remaining=math.floor(self.tokens),
            reset_s=(self.burst - self.tokens) / rate_per_s,
            retry_after_s=0.0 if admitted else (1 - self.tokens) / rate_per_s,
        )


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's style).

    ``0.25`` -> ``"250ms"``, ``1`` -> ``"1s"``, ``8.64`` -> ``"8.64s"``, ``360`` -> ``"6m0s"``,
    ``3725.5`` -> ``"1h2m5.5s"``. Rounded up to the millisecond, so a wait is never understated.
    """
    total_ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
