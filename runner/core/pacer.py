"""Pacing requests to the provider's rate limit: ``--rpm`` as a ceiling, adaptive by default.

A run is bounded by the provider's rate limit, not by our CPU, so the runner keeps sending just
as fast as the provider accepts: not the fixed 10-15 s pause after any 429 other tools take, and
not the sawtooth of a plain additive-increase, multiplicative-decrease pacer, which swings
between half the limit and the limit (about 0.75 of it on average).

One :class:`Lane` per endpoint: generations and edits keep separate state, so a limit on one
does not slow the other (a limit they share shows up in both, and each settles on its share).
A lane paces request *starts* on a grid of ``1 / rate`` seconds. Its phases:

``free``
    No 429 taken for the limit's yet. **Slow start**: a lane that knows nothing of the limit
    does not send its whole ``--concurrency`` at once (against a bucket of 10, a burst of 100
    is 90 429s before the first comes back). It starts at ``start_rpm`` and doubles its pace
    every round trip while the pace is what holds requests back, like TCP's slow start: a
    provider's 429 comes back within one network round trip (an image takes seconds), so a
    request out for a round trip without a 429 was let through. The round trip is the
    quickest of the provider's answers; until one comes, ``round_trip_s``, or the client's
    connection set-up if longer (a TCP handshake is one network round trip, TLS adds one or
    two; on loopback it is far quicker than a server's answer, so it only lengthens the
    guess). It grows until the ``--rpm`` ceiling, or until the pace outgrows what the workers
    send, or until the limit's 429s (below); after ``restart_idle_s`` without a request it
    starts over.
``measure``
    After the first 429. The estimator rests on one fact about a token bucket: a 429 means the
    bucket was empty when that request arrived, so between two 429'd requests sent at ``t0`` and
    ``t1`` the provider accepted exactly what it refilled, ``rate * (t1 - t0)``, give or take
    one request (as long as the bucket never overflowed meanwhile). The lane starts at half the
    rate accepted before the first 429. If most requests still get 429s it slows down
    (``measure_slow``); if none comes for a while it grows (``measure_grow``), and since the
    bucket may then have overflowed, the count starts over from the next 429, at that pace.
    Once ``measure_min_s`` have passed and ``measure_min_accepted`` requests went through,
    the next 429 closes the measurement: accepted requests sent between the two 429s, divided
    by the time between them.
``cruise``
    Paced at ``cruise_gain`` (0.97) of that estimate. Now and then, while the pacer is what
    holds requests back, the rate creeps up by ``probe_step``; a 429 takes it down by
    ``decrease``. Small steps around the estimate, not a halving: the provider's own burst
    allowance absorbs the small overshoots and undershoots, so nearly all of the limit is used.
``announced``
    The provider sends ``x-ratelimit-limit-requests`` (OpenAI's headers): paced just under the
    announced limit, never probing past it; ``x-ratelimit-remaining-requests: 0`` pauses the
    lane until ``x-ratelimit-reset-requests``. The client reads these headers
    (:func:`runner.http.headers.rate_limit_headers`); the lane sees only what they announce.

**Which 429s are the limit's.** A provider also answers 429 now and then when no limit is near
(a busy shard, a gateway's hiccup), and a run that took each for the limit would crawl: one
such 429 once halved the pace, and the cruise's decreases then held it far under the limit for
the rest of the run. Over a token bucket's limit, 429s come in runs: once the bucket is empty,
most requests sent faster than it refills are refused. So a 429 is the limit's when at least
``evidence_429s`` of the last ``evidence_window`` requests sent (up to it) were answered 429,
or, while cruising, when the pace is above the last one proven good (the measured one, or one
that ran a whole probe interval without a 429): that is how probing past the limit shows. A 429
asking to wait longer than ``long_retry_after_s`` is the limit's too. Any other 429 is
scattered: its job retries (after its ``Retry-After``, if any), and the pace is left as it is;
in ``free``, a 429 halves the pace (each time a request sent after the last change is refused),
and growth holds while a 429 is among the last ``evidence_window`` requests: cheap if it was
scattered (the pace is soon doubled back), and the overshoot is smaller if it was the limit's.

A ``Retry-After`` on a 429 of the limit's pauses its whole lane, not just the job that got it.
The pace after a pause is the lane's: a slow start again if it never met the limit, else the
grid of the pace it knew (which banks no credit while idle: no burst). Times here are
``time.monotonic()`` seconds; the lane is plain logic over an injected clock, so tests can drive
it without waiting.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from typing import Literal

from runner.provider import RateLimitHeaders

Phase = Literal["free", "measure", "cruise", "announced"]

_HISTORY_S = 120.0  # how far back sends are remembered for the estimator
MIN_ROUND_TRIP_S = 0.002  # loopback: a quicker answer says nothing more
MAX_RATE = 1e6  # requests/s: slow start stops doubling here (no pace at all, really)


@dataclass(frozen=True)
class PacerConfig:
    ceiling_rpm: float | None = None  # --rpm: never faster than this
    adaptive: bool = True  # slow down on 429s, find the limit, keep just under it
    start_rpm: float = 600.0  # slow start: the first pace of a lane that knows nothing
    round_trip_s: float = 0.05  # slow start's doubling period until a round trip is sampled
    restart_idle_s: float = 30.0  # a lane unused this long starts slow again
    evidence_window: int = 12  # 429s among this many requests sent ...
    evidence_429s: int = 4  # ... at least this many: the limit's, not scattered ones
    long_retry_after_s: float = 5.0  # a 429 asking for a longer wait is the limit's
    measure_min_accepted: int = 10  # the estimate is right to +-1 request
    measure_min_s: float = 1.5
    measure_start: float = 0.35  # of the rate accepted before the limit's 429s (burst included)
    measure_slow: float = 0.7
    measure_grow: float = 1.5
    measure_grow_every_s: float = 1.0
    measure_give_up_s: float = 30.0  # no 429 for this long while measuring: cruise instead
    cruise_gain: float = 0.97
    decrease: float = 0.9
    probe_step: float = 1.02
    probe_every_s: float = 5.0
    announced_gain: float = 0.98
    min_rpm: float = 1.0


class Lane:
    """The pacing state of one endpoint; all times in seconds of the injected clock."""

    def __init__(self, name: str, config: PacerConfig) -> None:
        self.name = name
        self.config = config
        self.phase: Phase = "free"
        self.limited_count = 0  # 429s seen
        self.waited = False  # the pacer held a request back since the last probe
        # Requests/s of the adaptive pacer (in ``free``, the slow start's); None: unpaced.
        self._rate: float | None = config.start_rpm / 60 if config.adaptive else None
        self._trip = RoundTrip(config.round_trip_s)
        self._next_double = -math.inf
        self._proven: float | None = None  # cruise: a pace known good (measured, or probed)
        self._probe_started = -math.inf  # cruise: when the current probe interval began
        self._slot = -math.inf  # when the last request was let through
        self._paused_until = -math.inf
        self._sends: list[float] = []  # send times, oldest first
        self._limited: list[float] = []  # send times of the requests answered 429, sorted
        self._anchor = 0.0  # measure: when the first 429'd request of the measurement went
        self._grown = False  # measure: the pace grew since the anchor
        self._counting = False  # measure: anchored after growing; the pace holds till the end
        self._last_change = -math.inf  # 429s of requests sent before this are stale
        self._next_probe = math.inf
        self._announced_rate: float | None = None

    def __repr__(self) -> str:
        rate = f"{self.rate * 60:.1f}/min" if self.rate else "unpaced"
        return f"<Lane {self.name} {self.phase} {rate} 429s={self.limited_count}>"

    @property
    def rate(self) -> float | None:
        """The pace in requests per second, ceiling included; None: unpaced."""
        ceiling = self.config.ceiling_rpm / 60 if self.config.ceiling_rpm else None
        if self._rate is None:
            return ceiling
        return min(self._rate, ceiling) if ceiling else self._rate

    @property
    def limit_rate(self) -> float | None:
        """The pace of a limit found (measured, announced) or the ceiling; None: none met."""
        if self.phase == "free":
            return self.config.ceiling_rpm / 60 if self.config.ceiling_rpm else None
        return self.rate

    @property
    def recheck_s(self) -> float:
        """How long a request held back may sleep before :meth:`next_send_at` is asked
        again: a round trip during slow start (the pace may double by then), else 0.5 s."""
        growing = self.phase == "free" and self._rate is not None and self._rate < self._cap()
        return self._trip.seconds if growing else 0.5

    def connected(self, seconds: float) -> None:
        """A connection to the provider took ``seconds`` to set up."""
        self._trip.connected(seconds)

    def next_send_at(self, now: float) -> float:
        """When the next request may go (``<= now``: at once)."""
        self._update(now)
        at = self._paused_until
        rate = self.rate
        if rate:
            at = max(at, self._slot + 1 / rate)
        return at

    def take(self, now: float) -> None:
        """A request goes now."""
        rate = self.rate
        if rate:
            grid = self._slot + 1 / rate
            # A little late keeps the grid (sleeps overshoot); idle for long does not bank credit.
            self._slot = grid if now - grid < 0.25 / rate else now
        else:
            self._slot = now
        self._sends.append(now)
        _trim(self._sends, now - _HISTORY_S)
        _trim(self._limited, now - _HISTORY_S)

    def observe(
        self,
        sent_at: float,
        now: float,
        *,
        limited: bool,
        retry_after_s: float | None = None,
        headers: RateLimitHeaders | None = None,
        answered: bool = True,
    ) -> None:
        """The answer to a request sent at ``sent_at``; ``limited``: a 429 rate limit;
        ``answered``: the provider answered (not a connection refused or a timeout), so the
        time it took bounds the round trip."""
        if headers is not None:
            self._announce(now, headers)
        if answered:
            self._trip.answered(now - sent_at)
        if not limited:
            return
        self.limited_count += 1
        insort(self._limited, sent_at)  # answers come back out of order
        if not self.config.adaptive:
            self._pause(now, retry_after_s)
            return
        evidence = self._evidence(sent_at)
        evidence = evidence or (retry_after_s or 0.0) > self.config.long_retry_after_s
        if self.phase == "free":
            if evidence:
                self._pause(now, retry_after_s)
                self._start_measuring(now, sent_at)
            elif self._rate is not None and sent_at >= self._last_change:
                # Maybe the limit's first: half the pace (as TCP halves its window on a loss)
                # until the next requests tell; slow start doubles it back if they pass.
                self._rate = max(self._floor(), self._rate / 2)
                self._last_change = now
        elif sent_at < self._last_change:
            self._pause(now, retry_after_s)  # sent before the pace last changed: stale
        elif self.phase == "measure":
            self._pause(now, retry_after_s)
            self._measure(now, sent_at)
        elif evidence or self._proven is None or self._current() > self._proven:
            # Cruise or announced: we went over (or the limit came down).
            self._pause(now, retry_after_s)
            over = self._current()
            self._set_rate(now, over * self.config.decrease)
            if self._proven is not None:  # not good: proven stays under it
                self._proven = min(self._proven, self._current() if evidence else over)

    def _pause(self, now: float, retry_after_s: float | None) -> None:
        self._paused_until = max(self._paused_until, now + (retry_after_s or -math.inf))

    def _evidence(self, sent_at: float) -> bool:
        """Whether the 429 of a request sent at ``sent_at`` is the limit's: enough of the
        requests sent up to it were refused too (see the module's docstring). While cruising,
        only requests sent at the current pace count: the measurement's 429s are over."""
        c = self.config
        end = bisect_right(self._sends, sent_at)
        start = self._sends[end - c.evidence_window] if end >= c.evidence_window else -math.inf
        if self.phase in ("cruise", "announced"):
            start = max(start, self._last_change)
        refused = bisect_right(self._limited, sent_at) - bisect_left(self._limited, start)
        return refused >= c.evidence_429s

    def _suspect(self) -> bool:
        """Whether a 429 is among the last ``evidence_window`` requests sent."""
        window = self.config.evidence_window
        start = self._sends[-window] if len(self._sends) >= window else -math.inf
        return bool(self._limited) and self._limited[-1] >= start

    def _start_measuring(self, now: float, sent_at: float) -> None:
        self.phase = "measure"
        self._anchor, self._grown, self._counting = sent_at, False, False
        # A third of the rate accepted before these 429s (over the last second at most):
        # that includes the burst allowance, which a slow start spends in a fraction of a
        # second, so it is likely under the limit, and the pace then grows to find it.
        window = min(1.0, max(0.25, sent_at - self._sends[0]))
        accepted = self._accepted(sent_at - window, sent_at) / window
        self._set_rate(now, self.config.measure_start * accepted)

    def _measure(self, now: float, sent_at: float) -> None:
        """A 429 while measuring: re-anchor, conclude, or slow down."""
        c = self.config
        if self._grown:
            # The pace grew since the anchor because no 429 came: the bucket may have
            # overflowed meanwhile, which spoils the count. Count from this 429 instead, at
            # this pace (over the limit, as this 429 says), and grow no more.
            self._anchor, self._grown, self._counting = sent_at, False, True
            return
        accepted = self._accepted(self._anchor, sent_at)
        span = sent_at - self._anchor
        if accepted >= c.measure_min_accepted and span >= c.measure_min_s:
            self._cruise(now, accepted / span)
        elif _count(self._limited, self._anchor, sent_at) >= accepted:
            # Far over (half the requests or more get 429): slow down. Still over: the count
            # holds.
            self._set_rate(now, self._current() * c.measure_slow)

    def _cruise(self, now: float, estimate: float) -> None:
        self.phase = "cruise"
        self._set_rate(now, estimate * self.config.cruise_gain)
        self._proven = self._rate  # what the count found: a 429 under it is a scattered one

    def _set_rate(self, now: float, rate: float) -> None:
        self._rate = max(self._floor(), min(rate, self._cap()))
        self._last_change = self._probe_started = now
        self._next_probe = now + self.config.probe_every_s
        self.waited = False

    def _cap(self) -> float:
        return pace_cap(self.config, self._announced_rate)

    def _announce(self, now: float, headers: RateLimitHeaders) -> None:
        if headers.limit_rpm:
            announced = headers.limit_rpm / 60 * self.config.announced_gain
            if self._announced_rate != announced:
                self._announced_rate = announced
                self.phase = "announced"
                self._set_rate(now, announced)
        if headers.remaining == 0 and headers.reset_s is not None:
            self._paused_until = max(self._paused_until, now + headers.reset_s)

    def _update(self, now: float) -> None:
        """Time-driven changes: growing while measuring, probing upward while cruising."""
        if self.phase == "free":
            self._slow_start(now)
        elif self.phase == "measure":
            if now - max(self._last_limited(), self._anchor) > self.config.measure_give_up_s:
                self._cruise(now, self._current())  # the 429s stopped: no limit in sight
            elif (
                not self._counting
                and self.waited
                and now - self._last_change >= self.config.measure_grow_every_s
                and self._last_limited() < self._last_change
            ):
                # Paced, and no 429 since the last change: the limit is further up.
                self._set_rate(now, self._current() * self.config.measure_grow)
                self._grown = True
        elif self.phase in ("cruise", "announced") and now >= self._next_probe:
            if self._last_limited() < self._probe_started:  # a whole interval without a 429
                self._proven = max(self._proven or 0.0, self._current())
            if self.waited:
                self._rate = min(self._current() * self.config.probe_step, self._cap())
            self._next_probe = now + self.config.probe_every_s
            self._probe_started = now
            self.waited = False

    def _slow_start(self, now: float) -> None:
        """``free``: double the pace every round trip while it holds requests back and no 429
        is among the last requests; start over after a long idle time."""
        c = self.config
        if self._rate is None or not c.adaptive:
            return
        if self._sends and now - self._sends[-1] > c.restart_idle_s:
            self._rate = min(self._rate, c.start_rpm / 60)
        grow = self.waited and now >= self._next_double and self._rate < self._cap()
        if grow and not self._suspect():
            self._rate = min(2 * self._rate, self._cap())
            self._next_double = now + self._trip.seconds
            self.waited = False

    def _current(self) -> float:
        return self._rate if self._rate is not None else self._floor()

    def _floor(self) -> float:
        return self.config.min_rpm / 60

    def _last_limited(self) -> float:
        return self._limited[-1] if self._limited else -math.inf

    def _accepted(self, start: float, end: float) -> int:
        """Requests sent in ``(start, end]`` not answered 429 (those still in flight count as
        accepted: a provider's 429 comes back at once)."""
        return _count(self._sends, start, end) - _count(self._limited, start, end)


class RoundTrip:
    """Slow start's doubling period: the quickest answer from the provider (its 429s come no
    quicker); until one came, the configured guess, or the slowest connection set-up if longer
    (a far provider). A set-up only lengthens the guess: it is the kernel's handshake, the
    network's part of a round trip, not the server's answer."""

    def __init__(self, guess_s: float) -> None:
        self._guess_s = guess_s
        self._answered_s: float | None = None
        self._connect_s = 0.0

    @property
    def seconds(self) -> float:
        if self._answered_s is None:
            return max(self._guess_s, self._connect_s)
        return self._answered_s

    def answered(self, seconds: float) -> None:
        """An answer from the provider came ``seconds`` after its request went."""
        sample = max(MIN_ROUND_TRIP_S, seconds)
        self._answered_s = sample if self._answered_s is None else min(self._answered_s, sample)

    def connected(self, seconds: float) -> None:
        """A connection to the provider took ``seconds`` to set up."""
        self._connect_s = max(self._connect_s, seconds)


def pace_cap(config: PacerConfig, announced_per_s: float | None) -> float:
    """What a pace may never exceed: the ``--rpm`` ceiling and an announced limit (growing
    past the ceiling would only have to be undone, 429 by 429, if a limit under it showed up
    later)."""
    caps = [MAX_RATE]
    if config.ceiling_rpm:
        caps.append(config.ceiling_rpm / 60)
    if announced_per_s:
        caps.append(announced_per_s)
    return min(caps)


def _count(times: list[float], start: float, end: float) -> int:
    """How many of the sorted ``times`` fall in ``(start, end]``."""
    return max(0, bisect_right(times, end) - bisect_right(times, start))


def _trim(times: list[float], horizon: float) -> None:
    """Forget the times before ``horizon`` (in bulk, so appends stay cheap)."""
    if times and times[0] < horizon and len(times) > 64:
        del times[: bisect_left(times, horizon)]
