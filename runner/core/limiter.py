"""The pacer as the pool uses it: :class:`Limiter`, what
:class:`~runner.core.admission.Admission` asks of one, and :class:`RateLimiter`, the lanes of
:mod:`runner.core.pacer` for one process (the run's workers share
:class:`~runner.core.sharedpace.SharedRateLimiter` instead)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from runner.core.pacer import Lane, PacerConfig
from runner.provider import RateLimitHeaders


class PacedLane(Protocol):
    """What the run's summary reads of a lane: the 429s it saw, the pace of the limit it
    found (requests/s; None: none found)."""

    @property
    def limited_count(self) -> int: ...

    @property
    def limit_rate(self) -> float | None: ...


class Limiter(Protocol):
    """What :class:`~runner.core.admission.Admission` asks of a pacer: :class:`RateLimiter`
    on one machine, or one shared by every worker of a run
    (:class:`~runner.core.sharedpace.SharedRateLimiter`)."""

    @property
    def lanes(self) -> Mapping[str, PacedLane]: ...

    async def acquire(
        self, name: str, keep_going: Callable[[], bool] = lambda: True
    ) -> float | None: ...

    def observe(
        self,
        name: str,
        sent_at: float,
        *,
        limited: bool,
        retry_after_s: float | None = None,
        headers: RateLimitHeaders | None = None,
        answered: bool = True,
    ) -> None: ...

    def connected(self, seconds: float) -> None:
        """A connection to the provider took ``seconds`` to set up: a round trip sample."""

    async def close(self) -> None: ...


class RateLimiter:
    """The lanes of a run. ``sent_at = await acquire(lane)`` before each request (None: told
    to stop while waiting), ``observe(lane, sent_at, ...)`` with its answer."""

    def __init__(
        self,
        config: PacerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or PacerConfig()
        self.lanes: dict[str, Lane] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._clock = clock
        self._sleep = sleep
        self._connect_s = 0.0  # the slowest connection set-up seen

    def __repr__(self) -> str:
        return f"<RateLimiter {list(self.lanes.values())}>"

    async def close(self) -> None:  # nothing to let go: the lanes live in this process
        pass

    def lane(self, name: str) -> Lane:
        if name not in self.lanes:
            self.lanes[name] = lane = Lane(name, self.config)
            self._locks[name] = asyncio.Lock()
            lane.connected(self._connect_s)
        return self.lanes[name]

    def connected(self, seconds: float) -> None:
        self._connect_s = max(self._connect_s, seconds)
        for lane in self.lanes.values():
            lane.connected(seconds)

    async def acquire(
        self, name: str, keep_going: Callable[[], bool] = lambda: True
    ) -> float | None:
        lane = self.lane(name)
        async with self._locks[name]:  # FIFO: requests go in the order they asked
            while True:
                if not keep_going():
                    return None
                now = self._clock()
                at = lane.next_send_at(now)
                if at <= now:
                    break
                lane.waited = True
                await self._sleep(min(at - now, lane.recheck_s))  # the pace may change by then
            lane.take(now)
            return now

    def observe(
        self,
        name: str,
        sent_at: float,
        *,
        limited: bool,
        retry_after_s: float | None = None,
        headers: RateLimitHeaders | None = None,
        answered: bool = True,
    ) -> None:
        self.lane(name).observe(
            sent_at,
            self._clock(),
            limited=limited,
            retry_after_s=retry_after_s,
            headers=headers,
            answered=answered,
        )
