"""Judging answers without a server: the status, headers and body of an error answer sorted into
the error class that says what to do next, and a 200 that carries no image. (The same answers,
sent over HTTP in chunks and inside 200s, are in test_client.)"""

from __future__ import annotations

import json
import re

import pytest
from multidict import CIMultiDict

from runner.errors import (
    AmbiguousError,
    ApiError,
    JobFailedError,
    RunStoppedError,
    ServerError,
)
from runner.http.answers import Usage, error_from_answer, image_url, usage_from
from runner.provider import RateLimitHeaders
from runner.redact import register_secret


def body(code: str | None = None, message: str = "no", type_: str = "") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "answer", "headers", "expected"),
    [
        (401, body("invalid_api_key"), {}, RunStoppedError),
        (403, b"", {}, RunStoppedError),
        (429, body("insufficient_quota"), {}, RunStoppedError),
        (429, body("x", type_="billing_hard_limit_reached"), {}, RunStoppedError),
        (429, body("rate_limit_exceeded"), {}, ServerError),
        (408, b"", {}, ServerError),
        (409, b"", {}, ServerError),
        (503, b"<html>busy</html>", {}, ServerError),
        (500, b"", {"x-should-retry": "false"}, JobFailedError),
        (400, body(), {"X-Should-Retry": "True"}, ServerError),
        (400, body("content_policy_violation"), {}, JobFailedError),
        (404, b"[" * 100_000, {}, JobFailedError),  # too deep to parse: the status decides
    ],
)
def test_error_answers_are_sorted_by_status_code_and_should_retry(
    status: int, answer: bytes, headers: dict[str, str], expected: type[ApiError]
) -> None:
    error = error_from_answer(status, answer, CIMultiDict(headers), "job-1")
    assert type(error) is expected
    assert error.job_id == "job-1" and error.status == status and error.billing == "none"


def test_an_error_answer_keeps_its_message_code_and_waits() -> None:
    headers = CIMultiDict(
        {
            "retry-after-ms": "1500",
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
        }
    )
    error = error_from_answer(429, body("rate_limit_exceeded", "slow down"), headers, "j")
    assert error.message == "slow down" and error.code == "rate_limit_exceeded"
    assert error.retry_after_s == 1.5
    assert error.rate_limit == RateLimitHeaders(60.0, 0, None)
    assert error_from_answer(502, b"", CIMultiDict(), "j").message == "HTTP 502"


def test_an_error_message_that_echoes_the_key_is_redacted() -> None:
    secret = "sk-answers-test-0123456789abcdef"
    register_secret(secret)
    error = error_from_answer(401, body("invalid_api_key", f"bad key {secret}"), {}, "j")
    assert secret not in error.message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"data": []}, "empty data list"),
        ({"data": "x"}, "without data[0]"),
        ({}, "without data[0]"),
        ({"data": [{"revised_prompt": "p"}]}, "neither b64_json nor url"),
        ({"data": [{"url": 7}]}, "neither b64_json nor url"),
    ],
)
def test_a_200_without_an_image_is_a_possible_charge(
    payload: dict[str, object], expected: str
) -> None:
    with pytest.raises(AmbiguousError, match=re.escape(expected)) as info:
        image_url(payload, "j")
    assert info.value.billing == "possible"


def test_a_200_with_an_error_object_raises_that_error() -> None:
    with pytest.raises(RunStoppedError, match="inside a 200"):
        image_url({"error": {"code": "insufficient_quota", "message": "pay up"}}, "j")
    assert image_url({"data": [{"url": "https://cdn/x.png"}]}, "j") == "https://cdn/x.png"


def test_usage_keeps_only_sane_counts() -> None:
    assert usage_from(None) is None
    assert usage_from({"input_tokens": 7, "output_tokens": True, "total_tokens": -1}) == Usage(
        7, None, None
    )
