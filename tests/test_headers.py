"""Reading the provider's headers: Retry-After in its three forms, OpenAI's rate-limit headers
and their Go-style durations; anything that does not parse counts as absent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from runner.http.headers import parse_duration, rate_limit_headers, retry_after_from
from runner.provider import RateLimitHeaders


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("250ms", 0.25),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("20", 20.0),
        ("", None),
        ("soon", None),
        ("1s later", None),
        ("-1", None),
        ("nan", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_rate_limit_headers() -> None:
    assert rate_limit_headers(CIMultiDict({"content-type": "application/json"})) is None
    headers = CIMultiDict(
        {
            "X-RateLimit-Limit-Requests": "300",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1.5s",
        }
    )
    assert rate_limit_headers(headers) == RateLimitHeaders(300.0, 0, 1.5)
    junk = CIMultiDict({"x-ratelimit-limit-requests": "lots", "x-ratelimit-reset-requests": "?"})
    assert rate_limit_headers(junk) == RateLimitHeaders(None, None, None)


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_retry_after_header_forms() -> None:
    assert retry_after_from(headers(retry_after_ms="1500", retry_after="9")) == 1.5
    assert retry_after_from(headers(retry_after="2.5")) == 2.5
    when = datetime.now(UTC) + timedelta(seconds=30)
    parsed = retry_after_from(headers(retry_after=format_datetime(when, usegmt=True)))
    assert parsed is not None and 25 <= parsed <= 30
    assert retry_after_from(headers(retry_after="soon")) is None
    assert retry_after_from(headers()) is None
    assert retry_after_from(headers(retry_after="-3")) is None
