"""One run of a manifest, start to finish: the single core entry point the CLI calls.

manifest jobs -> plan (resume) -> pool (client under retry) -> images + checkpoint -> ledger
and report. Results and ledger are written whatever happens: at the end, on a stop, on a
cancel; the HTML report too, except after an immediate stop (second Ctrl-C). A dry run plans
(resume's repairs included) and stops there: it sends nothing and leaves results, ledger and
report as they were, so that it stays quick on a manifest of a million jobs.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.api import MICRO
from runner.client import ClientConfig, ImagesClient
from runner.errors import ApiError
from runner.jobs import Job
from runner.ledger import LedgerFiles, write_ledger
from runner.limits import BreakerConfig, Budget
from runner.plan import IMAGES_DIR, Plan, make_plan
from runner.pool import Pool, PoolResult, Progress
from runner.ratelimit import PacerConfig
from runner.report import write_report
from runner.retry import RetryConfig
from runner.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    client: ClientConfig
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    pacer: PacerConfig = field(default_factory=PacerConfig)  # --rpm, adaptive rate limiting
    concurrency: int = 8
    max_cost_usd: float | None = None  # over the folder's whole history: see runner.limits
    dry_run: bool = False  # plan (and resume's repairs), send nothing
    retry_failed: bool = False  # also retry jobs that failed for good ...
    retry_only: frozenset[str] = frozenset()  # ... or only those with these causes


@dataclass
class RunReport:
    plan: Plan
    ledger: LedgerFiles | None  # None after a dry run, which writes none
    pool: PoolResult | None
    wall_s: float
    cancelled: bool = False

    @property
    def stop_reason(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        return self.pool.stop_reason if self.pool else None

    @property
    def stop_error(self) -> ApiError | None:
        return self.pool.stop_error if self.pool else None


class Run:
    """Use as: ``run = Run(jobs, options)``; ``report = await run.execute()``; ``run.stop()``
    from a signal handler stops it gracefully."""

    def __init__(
        self,
        jobs: Sequence[Job],  # a list, or a Manifest: walked again for the results
        options: RunOptions,
        *,
        on_plan: Callable[[Plan], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.options = options
        self._on_plan = on_plan or (lambda _: None)
        self._on_progress = on_progress
        self._pool: Pool | None = None
        self._stop_reason: str | None = None

    def stop(self, reason: str = "interrupted") -> None:
        self._stop_reason = reason
        if self._pool is not None:
            self._pool.stop(reason)

    async def execute(self) -> RunReport:
        started = time.monotonic()
        store = Store.open(self.options.out_dir)
        run_id = store.start_run()
        plan: Plan | None = None
        pool_result: PoolResult | None = None
        outcome = "cancelled"
        cancelled = False
        try:
            plan = make_plan(
                self.jobs,
                store,
                retry_failed=self.options.retry_failed,
                only=self.options.retry_only,
            )
            self._on_plan(plan)
            if plan.todo and self._stop_reason is None and not self.options.dry_run:
                # Twice the workers: url-mode downloads go to a second host.
                connections = 2 * self.options.concurrency
                async with ImagesClient(self.options.client, max_connections=connections) as client:
                    self._pool = Pool(
                        client,
                        store,
                        store.folder / IMAGES_DIR,
                        concurrency=self.options.concurrency,
                        retry=self.options.retry,
                        budget=Budget(
                            _micro(self.options.max_cost_usd), sum(store.spend_micro_usd())
                        ),
                        breaker=self.options.breaker,
                        pacer=self.options.pacer,
                        on_progress=self._on_progress,
                    )
                    pool_result = await self._pool.run(plan.todo)
            outcome = (pool_result.stop_reason if pool_result else None) or "finished"
        except asyncio.CancelledError:
            # Told to stop at once (a second Ctrl-C): requests in flight are dropped, and this
            # run ends here with its books written, rather than with a traceback.
            cancelled = True
            pool_result = self._pool.result() if self._pool else None
        finally:
            # Also on cancel: the writes handed to the group commit land first; then nothing
            # is in flight any more, so what was is a possible charge.
            await store.drain()
            store.settle_in_flight()
            ledger = None if self.options.dry_run else write_ledger(self.jobs, store)
            store.finish_run(run_id, outcome)
            # Thumbnails take time: not on a dry run, and not when told to stop at once.
            if outcome != "cancelled" and not self.options.dry_run:
                self._write_report(store)
            store.close()
        return RunReport(
            plan or Plan(todo=[]), ledger, pool_result, time.monotonic() - started, cancelled
        )

    @staticmethod
    def _write_report(store: Store) -> None:
        try:
            write_report(store)
        except (OSError, sqlite3.Error) as exc:  # the report is a view; the run's work is done
            log.warning("could not write the HTML report: %s", exc)


def _micro(usd: float | None) -> int | None:
    return None if usd is None else round(usd * MICRO)
