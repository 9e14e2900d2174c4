"""The gate every attempt passes before it is sent: the circuit breaker, the pacer, the budget.

:class:`Admission` is what the pool asks; it composes the three limits below (the pacer, which
paces each endpoint to the provider's rate limit, is :mod:`runner.core.pacer`).

**Budget** (:class:`~runner.store.base.Budget`, kept by the store). ``--max-cost`` caps the
spend recorded in the output folder, confirmed plus
possible, over all its runs (so a resumed run goes on under the same cap). Each attempt
reserves its price when it is admitted and releases the reservation when its outcome is known,
so even with requests in flight, retries and ambiguous outcomes, confirmed + possible can never
pass the cap: an attempt whose price does not fit is never sent. A shared budget (PostgreSQL)
is reserved by the store as it records the attempt, and waited for the same way
(:meth:`Admission.intent`).

**Circuit breaker.** When nearly every recent request failed in a way that says the provider is
down (5xx, 429, timeouts, resets), sending every job's remaining attempts into the outage would
only burn them. The breaker opens: no attempt is admitted except one probe at a time, spaced with
exponential backoff; the first probe that gets an answer closes it. If the outage lasts longer
than ``max_outage_s`` the run stops, resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from runner.core.limiter import Limiter
from runner.errors import BudgetReached
from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD, Endpoint
from runner.store.base import Budget, BudgetExhausted

T = TypeVar("T")

# How often an attempt waiting for a full shared budget looks whether other workers' attempts
# in flight gave a price back.
SHARED_BUDGET_POLL_S = 0.5


class OutageTooLong(Exception):
    def __init__(self, outage_s: float) -> None:
        self.outage_s = outage_s
        super().__init__(f"the API has been failing for {outage_s:.0f} s")


@dataclass(frozen=True)
class BreakerConfig:
    window: int = 20  # the last N outcomes
    failure_ratio: float = 0.9  # open when at least this share of them failed
    probe_initial_s: float = 1.0
    probe_max_s: float = 60.0
    max_outage_s: float = 600.0


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._sleep = sleep
        self._outcomes: deque[bool] = deque(maxlen=self.config.window)
        self._opened_at: float | None = None
        self._probe_delay_s = self.config.probe_initial_s
        self._next_probe_at = 0.0
        self._probing = False

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return (
            f"<CircuitBreaker {state} failures={self._outcomes.count(False)}/{len(self._outcomes)}>"
        )

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    async def admit(self, keep_going: Callable[[], bool] = lambda: True) -> bool | None:
        """Wait until an attempt may be sent. Return True if it is the breaker's probe (pass
        that back to :meth:`record`), False if the breaker is closed, None if ``keep_going``
        turned false while waiting; raise :class:`OutageTooLong` past the limit."""
        while self._opened_at is not None:
            if not keep_going():
                return None
            now = self._clock()
            if now - self._opened_at > self.config.max_outage_s:
                raise OutageTooLong(now - self._opened_at)
            if not self._probing and now >= self._next_probe_at:
                self._probing = True
                return True
            await self._sleep(min(0.25, max(0.01, self._next_probe_at - now)))
        return False

    def record(self, provider_up: bool, *, probe: bool = False) -> None:
        """Record an outcome: ``provider_up`` is False for an outage-shaped failure. While the
        breaker is open only the probe's outcome counts: requests sent before it opened are
        stragglers, whatever they bring."""
        if self._opened_at is not None:
            if not probe:
                return
            self._probing = False
            if provider_up:
                self._close()
            else:
                self._probe_delay_s = min(self._probe_delay_s * 2, self.config.probe_max_s)
                self._next_probe_at = self._clock() + self._probe_delay_s
            return
        self._outcomes.append(provider_up)
        failures = self._outcomes.count(False)
        if (
            len(self._outcomes) == self.config.window
            and failures >= self.config.failure_ratio * self.config.window
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_delay_s = self.config.probe_initial_s
        self._next_probe_at = self._opened_at + self._probe_delay_s

    def _close(self) -> None:
        self._opened_at = None
        self._outcomes.clear()
        self._probing = False

    def release_probe(self, probe: bool | None) -> None:
        """An admitted attempt was never sent (stopped, or over budget): free the probe slot
        if it held it."""
        if probe:
            self._probing = False


class Halt(Exception):
    """No attempt may be sent: the run is stopping (``reason`` None) or must stop now, for
    ``reason``; ``for_run``: a reason that holds for every worker of the run (the provider
    down, the budget), not only this one (its disk refusing images)."""

    def __init__(self, reason: str | None = None, *, for_run: bool = False) -> None:
        self.reason = reason
        self.for_run = for_run


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted attempt: whether it is the circuit breaker's probe, and when the pacer let
    it go (the pacer learns from the answer with it)."""

    probe: bool
    sent_at: float


class Admission:
    """Before each attempt: the circuit breaker must let it through, then the pacer, then the
    budget must hold its price, reserved until :meth:`settle`. An attempt admitted but not
    sent after all gives its reservation and probe back with :meth:`release`.

    ``keep_going`` turns false when the run stops: waits end, and :class:`Halt` is raised.
    ``last_error`` says what failed last, for the message of an outage too long."""

    def __init__(
        self,
        budget: Budget,
        breaker: CircuitBreaker,
        limiter: Limiter,
        *,
        keep_going: Callable[[], bool],
        last_error: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.budget = budget
        self.breaker = breaker
        self.limiter = limiter
        self._keep_going = keep_going
        self._last_error = last_error
        self._budget_settled = asyncio.Event()

    async def admit(self, endpoint: Endpoint) -> Ticket:
        """Wait until an attempt to ``endpoint`` may be sent and reserve its price; or raise
        :class:`Halt`."""
        if not self._keep_going():
            raise Halt
        try:
            probe = await self.breaker.admit(keep_going=self._keep_going)
        except OutageTooLong as exc:
            last = self._last_error()
            seen = f" (last error: {last})" if last else ""
            raise Halt(f"{exc}{seen}; the provider seems down", for_run=True) from None
        try:
            if probe is None:
                raise Halt
            sent_at = await self.limiter.acquire(endpoint, self._keep_going)
            while True:
                if not self._keep_going() or sent_at is None:
                    raise Halt
                try:
                    self.budget.reserve(PRICE_PER_IMAGE_MICRO_USD)
                    return Ticket(probe, sent_at)
                except BudgetExhausted:
                    if not self.budget.reserved_micro_usd:
                        cap = (self.budget.cap_micro_usd or 0) / MICRO
                        raise Halt(f"the budget of ${cap:.2f} is reached", for_run=True) from None
                # Attempts in flight hold reservations; one that ends unbilled frees its price.
                self._budget_settled.clear()
                await self._budget_settled.wait()
        except Halt:
            self.breaker.release_probe(probe)
            raise

    async def intent(self, begin: Callable[[], Awaitable[T]]) -> T:
        """``begin()``: the store records the admitted attempt in flight, reserving its price
        on a shared budget (PostgreSQL) in the same transaction. A shared budget that is full
        while attempts of the run (any worker's) are in flight holding their prices is waited
        for, as one machine's is in :meth:`admit`: each outcome may give a price back (an
        unbilled one does), so ``begin()`` is tried again on this worker's own outcomes and
        every :data:`SHARED_BUDGET_POLL_S` for other workers'. Once nothing is in flight the
        budget is reached: :class:`~runner.errors.BudgetReached` is raised; :class:`Halt` if
        the run stops meanwhile."""
        while True:
            try:
                return await begin()
            except BudgetReached as exc:
                if not exc.in_flight:
                    raise
            self._budget_settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._budget_settled.wait(), SHARED_BUDGET_POLL_S)
            if not self._keep_going():
                raise Halt

    def release(self, ticket: Ticket) -> None:
        """An admitted attempt will not be sent after all: free its price and probe slot."""
        self.settle(0)
        self.breaker.release_probe(ticket.probe)

    def settle(self, charged_micro_usd: int) -> None:
        """An admitted attempt's outcome is known: its reservation becomes what it cost (0 if
        unbilled), and admissions waiting for budget look again."""
        self.budget.settle(PRICE_PER_IMAGE_MICRO_USD, charged_micro_usd)
        self._budget_settled.set()

    def wake(self) -> None:
        """Wake admissions waiting for budget (the run is stopping)."""
        self._budget_settled.set()
