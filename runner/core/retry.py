"""The retry policy: what is retried, how long to wait, when to give up.

Built from tenacity's small pieces. Only :class:`~runner.errors.RetryableError` is retried (and
an :class:`~runner.errors.AmbiguousError` only under ``on_ambiguous="retry"``); waits grow
exponentially with jitter like the official OpenAI SDK's (``min(0.5 * 2**n, 8) * (1 - 0.25 *
random())``), and a server's Retry-After wins when it asks for longer. A Retry-After above
``max_retry_after_s`` is not slept through: the pool stops the run instead (see
:class:`RetryAfterTooLong`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from runner.errors import AmbiguousError, ApiError, RetryableError, UnfetchedImageError

log = logging.getLogger(__name__)

OnAmbiguous = Literal["retry", "fail"]


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    on_ambiguous: OnAmbiguous = "retry"
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 120.0


class RetryAfterTooLong(Exception):
    """The server asked for a wait longer than we are willing to hold a worker for."""

    def __init__(self, error: ApiError) -> None:
        self.error = error
        super().__init__(f"asked to retry after {error.retry_after_s:.0f} s")


def is_retryable(error: BaseException, on_ambiguous: OnAmbiguous) -> bool:
    if isinstance(error, AmbiguousError | UnfetchedImageError):  # billed, or maybe, no image
        return on_ambiguous == "retry"
    return isinstance(error, RetryableError)


def backoff_s(config: RetryConfig, attempt: int, rng: random.Random) -> float:
    """The wait after failed attempt number ``attempt`` (1-based), without Retry-After."""
    base = min(config.backoff_initial_s * 2.0 ** (attempt - 1), config.backoff_max_s)
    return base * (1 - 0.25 * rng.random())


def make_retrying(
    config: RetryConfig,
    *,
    sleep: Callable[[float], Awaitable[None]],
    keep_going: Callable[[], bool],
    rng: random.Random | None = None,
) -> AsyncRetrying:
    """An ``AsyncRetrying`` for one job. ``keep_going`` is asked before every retry, so a
    stopping pool does not start new attempts."""
    chance = rng or random.Random()

    def wait(state: RetryCallState) -> float:
        if state.attempt_number >= config.max_attempts:
            return 0.0  # tenacity asks for the wait before it checks stop: no attempt follows
        error = state.outcome.exception() if state.outcome else None
        delay = backoff_s(config, state.attempt_number, chance)
        if isinstance(error, ApiError) and error.retry_after_s is not None:
            if error.retry_after_s > config.max_retry_after_s:
                raise RetryAfterTooLong(error)
            delay = max(delay, error.retry_after_s)
        return delay

    return AsyncRetrying(
        stop=stop_after_attempt(config.max_attempts),
        wait=wait,
        retry=retry_if_exception(
            lambda error: keep_going() and is_retryable(error, config.on_ambiguous)
        ),
        sleep=sleep,
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    if not isinstance(error, ApiError):
        return
    delay_s = state.next_action.sleep if state.next_action else 0.0
    log.info(
        "job %s: attempt %d of this run failed (%s: %s); retrying in %.2f s",
        error.job_id,
        state.attempt_number,
        error.cause,
        error.message,
        delay_s,
        extra={
            "job_id": error.job_id,
            "attempt_of_run": state.attempt_number,
            "cause": error.cause,
            "billing": error.billing,
            "delay_s": round(delay_s, 3),
        },
    )
