"""A budget shared in PostgreSQL: runs naming one budget (``--budget``) spend from it together
and never pass its cap, which stays as set until a run sets it again; an attempt the full budget
refuses waits while attempts in flight (any worker's) may give their price back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.cli.main import main
from runner.core.options import Options
from runner.core.pool import Pool
from runner.core.retry import RetryConfig
from runner.emulator import Emulator, EmulatorConfig
from runner.errors import OptionsError, ServerError
from runner.http.client import ClientConfig, ImagesClient
from runner.store.base import Outcome
from runner.store.postgres import PostgresStore
from tests.chaos import ThreadedEmulator
from tests.conftest import TEST_KEY, planned_jobs, write_manifest

PRICE = 30_000


@pytest.fixture
def served() -> Iterator[ThreadedEmulator]:
    """An emulator on a thread of its own: the CLI runs its own event loop here."""
    emulator = ThreadedEmulator(EmulatorConfig())
    emulator.start()
    yield emulator
    emulator.stop()


def run_cli(tmp_path: Path, name: str, jobs: int, *extra: str) -> int:
    rows = [{"id": f"{name}{i}", "prompt": f"a kite {i}", "size": "1280x544"} for i in range(jobs)]
    (tmp_path / name).mkdir(exist_ok=True)
    manifest = write_manifest(tmp_path / name, rows)
    return main(["run", str(manifest), "--out", str(tmp_path / name / "out"), *extra])


def test_two_runs_naming_one_budget_never_pass_its_cap(
    tmp_path: Path, pg_url: str, served: ThreadedEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGE_RUNNER_API_KEY", TEST_KEY)
    common = ["--state", pg_url, "--base-url", served.url, "--budget", "team", "--no-progress"]
    assert run_cli(tmp_path, "a", 3, *common, "--max-cost", "0.15") == 0
    assert served.emulator.billed_usd == pytest.approx(0.09)
    # Another run on the team's budget, without --max-cost: the cap the first set holds.
    assert run_cli(tmp_path, "b", 4, *common) == 3
    assert served.emulator.billed_usd == pytest.approx(0.15)
    # A run that sets the cap again raises it for every run naming the budget.
    assert run_cli(tmp_path, "b", 4, *common, "--max-cost", "0.21") == 0
    assert served.emulator.billed_usd == pytest.approx(0.21)


def test_a_budget_by_name_needs_a_shared_state_and_a_fair_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(tmp_path, "c", 1, "--emulate", "--budget", "team") == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "--state" in err
    assert not (tmp_path / "c" / "out").exists()
    state = "postgresql://runner@127.0.0.1/db"
    for name in ("", "x" * 129, "team\nnight", " team"):
        with pytest.raises(OptionsError, match=r"^budget must be"):
            Options(budget=name, state=state)
    assert Options(budget="x" * 128, state=state).budget == "x" * 128


async def test_a_full_budget_waits_for_attempts_in_flight_to_give_back_their_price(
    open_worker: Callable[[], PostgresStore], emulator: Emulator, tmp_path: Path
) -> None:
    """Worker A holds the whole budget in flight; worker B, refused, waits instead of stopping
    the run; A's attempts fail unbilled (a 500), B sends in the room they free, and stops with
    the budget only when nothing in flight could free more."""
    a, b = open_worker(), open_worker()
    jobs = planned_jobs(a, 6)
    a.budget(2 * PRICE)
    held = [(job, await a.begin_attempt(job)) for job in jobs[:2]]
    config = ClientConfig(base_url=emulator.base_url, api_key=TEST_KEY)
    async with ImagesClient(config) as client:
        pool = Pool(
            client,
            b,
            tmp_path / "out" / "images",
            concurrency=2,
            retry=RetryConfig(backoff_initial_s=0.001),
            budget=b.budget(None),
        )
        working = asyncio.create_task(pool.run(jobs))
        await asyncio.sleep(1.5)  # three looks at the budget
        assert not working.done() and not emulator.requests
        for job, attempt in held:
            failure = ServerError("HTTP 500", job_id=job.id, status=500)
            unbilled = Outcome("none", 0, error="HTTP 500")
            await a.record_failure(job.id, attempt, unbilled, failure, retry_later=True)
        result = await asyncio.wait_for(working, 30)
    assert result.progress.succeeded == 2
    assert result.stop_reason == "the budget of $0.06 is reached" and result.for_run
    assert emulator.billed_usd == pytest.approx(0.06)
