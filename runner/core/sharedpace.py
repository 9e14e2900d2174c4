"""One rate limit for all workers: the adaptive pacer of :mod:`runner.core.pacer`, its state
shared through the database by every worker that sends to the same API (the rate group).

Workers on several machines share the provider's one limit, so pacing each alone would let
each of them find the whole limit for itself. :class:`SharedRateLimiter` has the interface of
:class:`~runner.core.limiter.RateLimiter` (``acquire``, ``observe``, ``lanes``), so that
:class:`~runner.core.admission.Admission` takes either; its lanes are rows of
:mod:`runner.store.postgres.pacing`:

- **A grant per request**: one statement takes the lane's next start time on the grid of
  ``1 / rate`` on the database's clock (after any pause, ``--rpm`` as the ceiling) and numbers
  the request in the lane's one grant sequence. The worker sleeps until that time. Each worker
  holds at most one grant per lane at a time (its requests queue for the lane, as with
  ``RateLimiter``), so a pace that changes holds back every worker at once.
- **Learning, shared**: the phases of :class:`~runner.core.pacer.Lane` (free with its slow
  start, measure, cruise, announced) and its telling of the limit's 429s from scattered ones
  run on the row, by :class:`Learning`. Where a lane remembers its own send times,
  the row counts grants: "requests accepted between two 429s" is the difference of their
  grant numbers less the 429s between them, whichever worker sent each; "a 429 of a request
  sent before the pace changed" is one whose grant number is at most the change's. A 429 seen
  by any worker slows all of them, and a ``Retry-After`` pauses the whole group.
- **Joining**: a worker that starts late paces at the group's learned rate from its first
  request; a lane idle for long starts over (:data:`~runner.store.postgres.pacing.IDLE_RESET_S`).
- **Nothing to clean up**: a grant is one statement and a change one short transaction, so a
  worker that dies holds no lock; a grant it never used is a slot left empty.

The database work runs in a thread of its own: the event loop never waits on the network but
in ``await``. ``observe`` (synchronous, as the pool calls it) hands its change to that thread;
a failure there is raised by the next ``acquire``.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from runner.core.pacer import PacerConfig, RoundTrip, pace_cap
from runner.provider import RateLimitHeaders
from runner.store.postgres.pacing import PaceRow, PaceTable

T = TypeVar("T")

_GRANTS_KEPT = 4096  # grants awaiting their answer; one admitted but never sent is dropped
_KEPT_429S = 64  # outside measuring, the 429s of the last this many grants are kept


def _pause(row: PaceRow, now: float, retry_after_s: float | None) -> None:
    if retry_after_s is not None:
        row.paused_until_s = max(row.paused_until_s, now + retry_after_s)


class Learning:
    """The adaptive pacer's phases over a lane's shared row (see :mod:`runner.core.pacer` for
    the reasoning). Each method changes the row in place, under its lock, and says whether it
    changed anything; ``now`` is the database's clock."""

    def __init__(self, config: PacerConfig) -> None:
        self.config = config
        self._trip = RoundTrip(config.round_trip_s)  # as this worker saw it

    @property
    def start_per_s(self) -> float | None:
        """The pace a new lane starts at (slow start), or None: unpaced."""
        return self.config.start_rpm / 60 if self.config.adaptive else None

    def answered_after(self, seconds: float) -> None:
        """An answer came back ``seconds`` after its request went (this worker's clock)."""
        self._trip.answered(seconds)

    def connected(self, seconds: float) -> None:
        """A connection took ``seconds`` to set up."""
        self._trip.connected(seconds)

    def observe(
        self,
        row: PaceRow,
        now: float,
        *,
        grant: tuple[int, float] | None,
        limited: bool,
        retry_after_s: float | None,
        headers: RateLimitHeaders | None,
    ) -> bool:
        """The answer to the request of ``grant`` (its number and start time; None if this
        worker does not know it); ``limited``: a 429."""
        if headers is not None:
            self._announce(row, now, headers)
        if not limited:
            return True
        row.limited_count += 1
        c = self.config
        if grant is None or not c.adaptive:
            _pause(row, now, retry_after_s)
            return True
        seq, sent_at = grant
        if seq > row.last_limited_seq:
            row.last_limited_seq, row.last_limited_at_s = seq, sent_at
        if row.phase != "measure":  # the recent 429s, for the evidence
            row.limited_seqs = [s for s in row.limited_seqs if s > row.grant_seq - _KEPT_429S]
        if row.phase != "measure" or seq > row.anchor_seq:
            row.limited_seqs.append(seq)
        since = seq - c.evidence_window
        if row.phase in ("cruise", "announced"):  # only 429s at the current pace count
            since = max(since, row.last_change_seq)
        evidence = sum(1 for s in row.limited_seqs if since < s <= seq)
        limit = evidence >= c.evidence_429s or (retry_after_s or 0.0) > c.long_retry_after_s
        if row.phase == "free":
            if limit:
                _pause(row, now, retry_after_s)
                self._start_measuring(row, now, seq, sent_at)
            elif row.rate_per_s is not None and seq > row.last_change_seq:
                # Maybe the limit's first: half the pace until the next requests tell.
                row.rate_per_s = max(self._floor(), row.rate_per_s / 2)
                row.last_change_at_s, row.last_change_seq = now, row.grant_seq
        elif seq <= row.last_change_seq:
            # Granted before the pace last changed: says nothing about the new pace.
            _pause(row, now, retry_after_s)
        elif row.phase == "measure":
            _pause(row, now, retry_after_s)
            self._measure(row, now, seq, sent_at)
        elif limit or row.proven_per_s is None or self._current(row) > row.proven_per_s:
            # Cruise or announced: the group went over (or the limit came down).
            _pause(row, now, retry_after_s)
            over = self._current(row)
            self._set_rate(row, now, over * c.decrease)
            if row.proven_per_s is not None:  # not good: proven stays under it
                row.proven_per_s = min(row.proven_per_s, self._current(row) if limit else over)
        return True

    def announces(self, row: PaceRow, headers: RateLimitHeaders | None) -> bool:
        """Whether these headers would change the row as last seen (most answers say what
        the row knows already: those cost no transaction)."""
        if headers is None:
            return False
        if headers.remaining == 0 and headers.reset_s is not None:
            return True
        return bool(headers.limit_rpm) and row.announced_per_s != self._announced(headers)

    def update(self, row: PaceRow, now: float) -> bool:
        """Time-driven changes: growing while measuring, probing upward while cruising."""
        c = self.config
        if row.phase == "free":
            return self._slow_start(row, now)
        if row.phase == "measure":
            if now - max(row.last_limited_at_s, row.anchor_at_s) > c.measure_give_up_s:
                self._cruise(row, now, self._current(row))  # the 429s stopped: no limit in sight
                return True
            if (
                not row.counting
                and row.waited
                and now - row.last_change_at_s >= c.measure_grow_every_s
                and row.last_limited_seq <= row.last_change_seq
            ):
                # Paced, and no 429 since the last change: the limit is further up.
                self._set_rate(row, now, self._current(row) * c.measure_grow)
                row.grown = True
                return True
        elif row.phase in ("cruise", "announced") and now >= row.next_probe_at_s:
            if row.last_limited_at_s < row.next_probe_at_s - c.probe_every_s:  # no 429 since
                row.proven_per_s = max(row.proven_per_s or 0.0, self._current(row))
            if row.waited:
                row.rate_per_s = min(self._current(row) * c.probe_step, self._cap(row))
            row.next_probe_at_s = now + c.probe_every_s
            row.waited = False
            return True
        return False

    def _slow_start(self, row: PaceRow, now: float) -> bool:
        """``free``: double the pace every round trip while it holds requests back and no 429
        is among the last requests granted; start over after a long idle time."""
        c = self.config
        if row.rate_per_s is None or not c.adaptive:
            return False
        start = c.start_rpm / 60
        if now - row.slot_at_s > c.restart_idle_s and row.rate_per_s > start:
            row.rate_per_s = start
            return True
        suspect = any(s > row.grant_seq - c.evidence_window for s in row.limited_seqs)
        grow = row.waited and now - row.last_change_at_s >= self._trip.seconds
        if grow and row.rate_per_s < self._cap(row) and not suspect:
            row.rate_per_s = min(2 * row.rate_per_s, self._cap(row))
            row.last_change_at_s = now
            row.waited = False
            return True
        return False

    def due(self, row: PaceRow, now: float) -> bool:
        """Whether :meth:`update` would change the row (checked on a copy, without its lock)."""
        return self.update(copy.copy(row), now)

    def _start_measuring(self, row: PaceRow, now: float, seq: int, sent_at: float) -> None:
        row.phase = "measure"
        row.anchor_seq, row.anchor_at_s = seq, sent_at
        row.grown = row.counting = False
        # A third of the rate accepted before these 429s, over the last one or two seconds
        # (the marks the grants keep): that includes the burst allowance, which a slow start
        # spends in a fraction of a second, so it is likely under the limit.
        mark_seq, mark_at = row.prev_mark_seq, row.prev_mark_at_s
        if sent_at - mark_at > 2.0:
            mark_seq, mark_at = row.mark_seq, row.mark_at_s
        window = max(0.25, sent_at - mark_at)
        refused = sum(1 for s in row.limited_seqs if mark_seq < s <= seq)
        accepted = max(0, seq - mark_seq - refused)
        row.limited_seqs = []
        self._set_rate(row, now, self.config.measure_start * accepted / window)

    def _measure(self, row: PaceRow, now: float, seq: int, sent_at: float) -> None:
        """A 429 while measuring: re-anchor, conclude, or slow down."""
        c = self.config
        if row.grown:
            # The pace grew since the anchor because no 429 came: the bucket may have
            # overflowed meanwhile, which spoils the count. Count from this 429 instead, at
            # this pace (over the limit, as this 429 says), and grow no more.
            row.anchor_seq, row.anchor_at_s = seq, sent_at
            row.grown, row.counting = False, True
            row.limited_seqs = [s for s in row.limited_seqs if s > seq]
            return
        limited = sum(1 for s in row.limited_seqs if row.anchor_seq < s <= seq)
        accepted = seq - row.anchor_seq - limited
        span = sent_at - row.anchor_at_s
        if accepted >= c.measure_min_accepted and span >= c.measure_min_s:
            self._cruise(row, now, accepted / span)
        elif limited >= accepted:
            # Far over (half the requests or more get 429): slow down. Still over: the count
            # holds.
            self._set_rate(row, now, self._current(row) * c.measure_slow)

    def _cruise(self, row: PaceRow, now: float, estimate: float) -> None:
        row.phase = "cruise"
        row.limited_seqs = []
        self._set_rate(row, now, estimate * self.config.cruise_gain)
        row.proven_per_s = row.rate_per_s  # what the count found: a lone 429 under it is scattered

    def _cap(self, row: PaceRow) -> float:
        """This worker's ``--rpm`` ceiling (the run's, or lower) and an announced limit."""
        return pace_cap(self.config, row.announced_per_s)

    def _set_rate(self, row: PaceRow, now: float, rate: float) -> None:
        row.rate_per_s = max(self._floor(), min(rate, self._cap(row)))
        row.last_change_at_s = now
        row.last_change_seq = row.grant_seq
        row.next_probe_at_s = now + self.config.probe_every_s
        row.waited = False

    def _announce(self, row: PaceRow, now: float, headers: RateLimitHeaders) -> None:
        if headers.limit_rpm:
            announced = self._announced(headers)
            if row.announced_per_s != announced:
                row.announced_per_s = announced
                row.phase = "announced"
                self._set_rate(row, now, announced)
        if headers.remaining == 0 and headers.reset_s is not None:
            row.paused_until_s = max(row.paused_until_s, now + headers.reset_s)

    def _announced(self, headers: RateLimitHeaders) -> float:
        return (headers.limit_rpm or 0.0) / 60 * self.config.announced_gain

    def _current(self, row: PaceRow) -> float:
        return row.rate_per_s if row.rate_per_s is not None else self._floor()

    def _floor(self) -> float:
        return self.config.min_rpm / 60


class SharedLane:
    """What this worker knows of a lane, for its summary: the 429s it saw itself, and the
    group's pace as its last grant found it."""

    def __init__(self, name: str, ceiling_per_s: float | None) -> None:
        self.name = name
        self.limited_count = 0
        self.row: PaceRow | None = None
        self._ceiling_per_s = ceiling_per_s

    def __repr__(self) -> str:
        rate = f"{self.rate * 60:.1f}/min" if self.rate else "unpaced"
        return f"<SharedLane {self.name} {self.phase} {rate} 429s={self.limited_count}>"

    @property
    def phase(self) -> str:
        return self.row.phase if self.row else "free"

    @property
    def limit_rate(self) -> float | None:
        """The pace of a limit the group found, or the ceiling; None: none found."""
        return self._ceiling_per_s if self.phase == "free" else self.rate

    @property
    def rate(self) -> float | None:
        """The pace in requests per second, ceiling included; None: unpaced."""
        learned = self.row.rate_per_s if self.row else None
        if learned is None or self._ceiling_per_s is None:
            return learned if learned is not None else self._ceiling_per_s
        return min(learned, self._ceiling_per_s)


class SharedRateLimiter:
    """The lanes of a rate group, shared by every worker through the database.
    ``sent_at = await acquire(lane)`` before each request (None: told to stop while waiting),
    ``observe(lane, sent_at, ...)`` with its answer; :meth:`close` at the end."""

    def __init__(
        self,
        conninfo: str,
        group: str,
        config: PacerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or PacerConfig()
        self.group = group
        self.lanes: dict[str, SharedLane] = {}
        self._conninfo = conninfo
        self._learning = Learning(self.config)
        self._clock = clock
        self._sleep = sleep
        self._ceiling_per_s = self.config.ceiling_rpm / 60 if self.config.ceiling_rpm else None
        self._db = ThreadPoolExecutor(1, "shared-pace")
        self._table: PaceTable | None = None
        self._opening = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._grants: OrderedDict[tuple[str, float], tuple[int, float]] = OrderedDict()
        self._changes: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"<SharedRateLimiter {self.group} {list(self.lanes.values())}>"

    async def acquire(
        self, name: str, keep_going: Callable[[], bool] = lambda: True
    ) -> float | None:
        lane = await self._lane(name)
        async with self._locks[name]:  # one grant at a time per worker and lane, FIFO
            if self._failure is not None:
                raise self._failure
            if not keep_going():
                return None
            table = await self._open()
            grant = await self._run(table.grant, name, self._ceiling_per_s)
            sent_at = self._clock() + (grant.start_at_s - grant.now_s)
            lane.row = grant.row
            if self._learning.due(grant.row, grant.now_s):
                lane.row = await self._run(table.change, name, self._learning.update)
            while (wait_s := sent_at - self._clock()) > 0:
                if not keep_going():
                    return None  # the grant's slot stays empty
                await self._sleep(min(wait_s, 0.5))
            while (name, sent_at) in self._grants:  # two grants a clock tick apart
                sent_at = math.nextafter(sent_at, math.inf)
            self._grants[(name, sent_at)] = (grant.seq, grant.start_at_s)
            if len(self._grants) > _GRANTS_KEPT:
                self._grants.popitem(last=False)
            return sent_at

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
        lane = self.lanes.get(name)
        grant = self._grants.pop((name, sent_at), None)
        if lane is None or lane.row is None:
            return  # no grant of this lane went out from here
        if answered:  # the provider's answer: its time bounds the round trip
            self._learning.answered_after(self._clock() - sent_at)
        if limited:
            lane.limited_count += 1
        elif not self._learning.announces(lane.row, headers):
            return
        decide = functools.partial(
            self._learning.observe,
            grant=grant,
            limited=limited,
            retry_after_s=retry_after_s,
            headers=headers,
        )
        task = asyncio.get_running_loop().create_task(self._change(lane, decide))
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    def connected(self, seconds: float) -> None:
        self._learning.connected(seconds)

    async def close(self) -> None:
        """Wait for the changes under way, then close the connection."""
        if self._changes:
            await asyncio.gather(*self._changes, return_exceptions=True)
        if self._table is not None:
            await self._run(self._table.close)
        self._db.shutdown(wait=True)

    async def _lane(self, name: str) -> SharedLane:
        if name not in self.lanes:
            self._locks.setdefault(name, asyncio.Lock())
            async with self._locks[name]:
                if name not in self.lanes:
                    table = await self._open()
                    await self._run(table.join, name, self._learning.start_per_s)
                    self.lanes[name] = SharedLane(name, self._ceiling_per_s)
        return self.lanes[name]

    async def _open(self) -> PaceTable:
        async with self._opening:
            if self._table is None:
                self._table = await self._run(PaceTable, self._conninfo, self.group)
            return self._table

    async def _change(self, lane: SharedLane, decide: Callable[[PaceRow, float], bool]) -> None:
        try:
            table = await self._open()
            lane.row = await self._run(table.change, lane.name, decide)
        except Exception as exc:  # raised by the next acquire: observe cannot raise it
            self._failure = self._failure or exc

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)
