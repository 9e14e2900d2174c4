"""The retry policy with an injected sleep: which errors are retried, and how long the waits
are (how Retry-After headers are read is in test_headers)."""

from __future__ import annotations

import random

import pytest

from runner.core.retry import RetryAfterTooLong, RetryConfig, backoff_s, make_retrying
from runner.errors import (
    AmbiguousError,
    ApiError,
    JobFailedError,
    NotSentError,
    RunStoppedError,
    ServerError,
)


async def run_with(errors: list[ApiError], config: RetryConfig) -> tuple[int, list[float]]:
    """Run an operation that raises ``errors`` in turn, then succeeds; return calls and sleeps."""
    slept: list[float] = []
    calls = 0

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async def operation() -> None:
        nonlocal calls
        calls += 1
        if calls <= len(errors):
            raise errors[calls - 1]

    retrying = make_retrying(config, sleep=sleep, keep_going=lambda: True, rng=random.Random(0))
    await retrying(operation)
    return calls, slept


async def test_retryable_errors_back_off_exponentially() -> None:
    errors: list[ApiError] = [ServerError("503"), NotSentError("refused"), AmbiguousError("rst")]
    calls, slept = await run_with(errors, RetryConfig(max_attempts=5))
    assert calls == 4
    for attempt, delay in enumerate(slept, start=1):
        base = min(0.5 * 2 ** (attempt - 1), 8.0)
        assert 0.75 * base <= delay <= base


async def test_retry_after_wins_when_longer() -> None:
    calls, slept = await run_with([ServerError("429", retry_after_s=3.5)], RetryConfig())
    assert calls == 2 and slept == [3.5]


async def test_retry_after_over_the_maximum_is_not_slept_through() -> None:
    with pytest.raises(RetryAfterTooLong):
        await run_with([ServerError("429", retry_after_s=600)], RetryConfig(max_retry_after_s=60))


@pytest.mark.parametrize("error", [JobFailedError("400"), RunStoppedError("401")])
async def test_final_errors_are_not_retried(error: ApiError) -> None:
    with pytest.raises(type(error)):
        await run_with([error], RetryConfig())


async def test_ambiguous_is_final_under_on_ambiguous_fail() -> None:
    with pytest.raises(AmbiguousError):
        await run_with([AmbiguousError("reset")], RetryConfig(on_ambiguous="fail"))


async def test_attempts_are_capped() -> None:
    with pytest.raises(ServerError):
        await run_with([ServerError("503")] * 5, RetryConfig(max_attempts=3))


def test_backoff_is_capped() -> None:
    config = RetryConfig(backoff_initial_s=0.5, backoff_max_s=8.0)
    assert backoff_s(config, 20, random.Random(1)) <= 8.0


async def test_a_long_retry_after_on_the_last_attempt_fails_the_job_only() -> None:
    errors: list[ApiError] = [
        ServerError("429", retry_after_s=1),
        ServerError("429", retry_after_s=600),
    ]
    with pytest.raises(ServerError):  # not RetryAfterTooLong: no attempt would follow anyway
        await run_with(errors, RetryConfig(max_attempts=2, max_retry_after_s=60))
