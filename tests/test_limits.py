"""The budget cap and the circuit breaker: unit tests with a fake clock, then runs against the
emulator with faults."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from runner.core.admission import (
    Admission,
    BreakerConfig,
    Budget,
    BudgetExhausted,
    CircuitBreaker,
    Halt,
    OutageTooLong,
)
from runner.core.lifecycle import Run
from runner.core.limiter import RateLimiter
from runner.manifest.load import load_manifest
from tests.conftest import MakeEmulator, options, write_manifest


def test_budget_reserves_at_admission() -> None:
    budget = Budget(cap_micro_usd=100_000, spent_micro_usd=10_000)
    budget.reserve(30_000)
    budget.reserve(30_000)
    budget.reserve(30_000)
    with pytest.raises(BudgetExhausted):
        budget.reserve(30_000)  # 10 + 3 x 30 in flight = 100: the fourth does not fit
    budget.settle(30_000, 0)  # one answered unbilled: its reservation comes back
    budget.reserve(30_000)
    budget.settle(30_000, 30_000)
    assert budget.spent_micro_usd == 40_000
    assert budget.left_micro_usd == 0


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.now += delay_s
        await asyncio.sleep(0)


async def test_breaker_opens_probes_one_at_a_time_and_closes() -> None:
    t = FakeTime()
    config = BreakerConfig(window=4, failure_ratio=1.0, probe_initial_s=1.0, max_outage_s=100)
    breaker = CircuitBreaker(config, clock=t.clock, sleep=t.sleep)
    for _ in range(3):
        breaker.record(provider_up=False)
    assert not breaker.is_open
    breaker.record(provider_up=False)
    assert breaker.is_open

    assert await breaker.admit() is True  # the first probe, after the initial delay
    assert t.now >= 1.0
    waiting = asyncio.create_task(breaker.admit())  # a second caller waits for the probe
    await asyncio.sleep(0)
    assert not waiting.done()
    breaker.record(provider_up=False, probe=True)  # the probe failed: the next comes later
    assert await waiting is True
    assert t.now >= 3.0  # 1 s, then the doubled delay of 2 s
    breaker.record(provider_up=True, probe=True)
    assert not breaker.is_open
    await breaker.admit()  # closed: no wait


async def test_breaker_gives_up_after_max_outage() -> None:
    t = FakeTime()
    config = BreakerConfig(window=2, failure_ratio=1.0, probe_initial_s=1, max_outage_s=10)
    breaker = CircuitBreaker(config, clock=t.clock, sleep=t.sleep)
    breaker.record(provider_up=False)
    breaker.record(provider_up=False)
    with pytest.raises(OutageTooLong):
        while True:
            probe = await breaker.admit()
            breaker.record(provider_up=False, probe=bool(probe))


def jobs_manifest(tmp_path: Path, count: int) -> Path:
    jobs = [{"id": f"j{i:02d}", "prompt": f"p {i}", "size": "1280x544"} for i in range(count)]
    return write_manifest(tmp_path, jobs)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_max_cost_is_never_exceeded_even_with_faults(
    tmp_path: Path, make_emulator: MakeEmulator, seed: int
) -> None:
    emulator = await make_emulator(fault_rate=0.4, seed=seed, slow_s=1.0)
    out = tmp_path / "out"
    report = await Run(
        load_manifest(jobs_manifest(tmp_path, 40)),
        dataclasses.replace(
            options(out, emulator.base_url, concurrency=6, timeout_s=0.3), max_cost_usd=0.5
        ),
    ).execute()
    totals = report.ledger.totals
    assert report.stop_reason == "the budget of $0.50 is reached"
    assert totals.confirmed_usd + totals.possible_usd <= 0.5
    assert emulator.billed_usd <= 0.5
    assert totals.confirmed_usd <= emulator.billed_usd <= totals.confirmed_usd + totals.possible_usd
    assert totals.pending > 0

    # A rerun under the same cap stays under it: the cap covers the folder's history.
    again = await Run(
        load_manifest(jobs_manifest(tmp_path, 40)),
        dataclasses.replace(options(out, emulator.base_url), max_cost_usd=0.5),
    ).execute()
    assert again.stop_reason == "the budget of $0.50 is reached"
    totals = again.ledger.totals
    assert totals.confirmed_usd + totals.possible_usd <= 0.5
    assert emulator.billed_usd <= 0.5


async def test_provider_down_stops_the_run_without_burning_attempts(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(fault_rate=1.0, fault_kinds=("503",))
    out = tmp_path / "out"
    breaker = BreakerConfig(
        window=5, failure_ratio=0.9, probe_initial_s=0.02, probe_max_s=0.05, max_outage_s=0.5
    )
    report = await Run(
        load_manifest(jobs_manifest(tmp_path, 30)),
        dataclasses.replace(
            options(out, emulator.base_url, concurrency=4, max_attempts=5), breaker=breaker
        ),
    ).execute()
    assert report.stop_reason is not None and "provider seems down" in report.stop_reason
    # Without the breaker: 30 jobs x 5 attempts = 150 requests and 30 failed jobs.
    assert len(emulator.requests) < 50
    assert report.ledger.totals.failed < 5
    assert report.ledger.totals.pending > 25


async def test_breaker_closes_when_the_provider_recovers(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(fault_rate=1.0, fault_kinds=("503",))
    out = tmp_path / "out"
    breaker = BreakerConfig(window=4, failure_ratio=1.0, probe_initial_s=0.02, probe_max_s=0.05)

    async def recover() -> None:
        while len(emulator.requests) < 12:  # noqa: ASYNC110 - polling the server's books
            await asyncio.sleep(0.01)
        emulator.config = dataclasses.replace(emulator.config, fault_rate=0.0)

    healer = asyncio.create_task(recover())
    report = await Run(
        load_manifest(jobs_manifest(tmp_path, 20)),
        dataclasses.replace(
            options(out, emulator.base_url, concurrency=4, max_attempts=6), breaker=breaker
        ),
    ).execute()
    await healer
    assert report.stop_reason is None
    assert report.ledger.totals.succeeded == 20
    failures = [r for r in emulator.requests if r.status == 503]
    assert 12 <= len(failures) < 20  # paused while down: probes only, one at a time
    assert pd.read_csv(out / "ledger.csv")["billing"].eq("confirmed").all()


async def test_only_the_probe_decides_while_open() -> None:
    t = FakeTime()
    config = BreakerConfig(window=2, failure_ratio=1.0, probe_initial_s=1.0)
    breaker = CircuitBreaker(config, clock=t.clock, sleep=t.sleep)
    breaker.record(provider_up=False)
    breaker.record(provider_up=False)
    probe = await breaker.admit()
    assert probe is True
    breaker.record(provider_up=True)  # a straggler sent before the breaker opened
    assert breaker.is_open
    second = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0)
    assert not second.done()  # still one probe at a time
    breaker.record(provider_up=True, probe=True)
    assert not breaker.is_open
    assert await second is False


async def test_a_stop_wakes_callers_waiting_on_an_open_breaker() -> None:
    t = FakeTime()
    config = BreakerConfig(window=1, failure_ratio=1.0, probe_initial_s=1000.0)
    breaker = CircuitBreaker(config, clock=t.clock, sleep=t.sleep)
    breaker.record(provider_up=False)
    stopping = False

    async def stop_soon() -> None:
        nonlocal stopping
        await asyncio.sleep(0)
        stopping = True

    stopper = asyncio.create_task(stop_soon())
    assert await breaker.admit(keep_going=lambda: not stopping) is None
    await stopper
    assert t.now < 1000.0


async def test_admission_holds_the_price_of_each_attempt_until_it_settles() -> None:
    """With room for one image under the cap, a second attempt waits while the first is in
    flight; the first ending unbilled lets it in, and one billed ends the run's admissions."""
    stopping = False
    admission = Admission(
        Budget(30_000, 0), CircuitBreaker(), RateLimiter(), keep_going=lambda: not stopping
    )
    first = await admission.admit("generations")
    second = asyncio.ensure_future(admission.admit("generations"))
    await asyncio.sleep(0.01)
    assert not second.done()  # the first attempt's reservation fills the budget
    admission.settle(0)  # the first ended unbilled: its price is free again
    ticket = await asyncio.wait_for(second, 1)
    assert (first.probe, ticket.probe) == (False, False)
    admission.settle(30_000)  # the second was billed: the cap is reached
    with pytest.raises(Halt, match=r"the budget of \$0.03 is reached"):
        await admission.admit("edits")


async def test_an_admission_waiting_for_budget_ends_when_the_run_stops() -> None:
    stopping = False
    admission = Admission(
        Budget(30_000, 0), CircuitBreaker(), RateLimiter(), keep_going=lambda: not stopping
    )
    ticket = await admission.admit("generations")
    waiting = asyncio.ensure_future(admission.admit("generations"))
    await asyncio.sleep(0.01)
    stopping = True
    admission.wake()
    with pytest.raises(Halt) as halt:
        await asyncio.wait_for(waiting, 1)
    assert halt.value.reason is None  # a stop, not a reason of its own
    admission.release(ticket)  # never sent: the reservation is given back
    assert admission.budget.reserved_micro_usd == 0
