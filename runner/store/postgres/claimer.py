"""A worker's claimer: the run's queued jobs handed to the pool one at a time, claimed from the
database a small batch at a time in a thread of its own (on its own connection), so that the
pool never waits on the network mid-batch.

The next batch is claimed while the pool takes the last quarter of this one. The claimer ends
when no job is left to claim and none is held by another live worker (if one dies, its jobs
come back to the queue), or when the run is stopped (then the store's ``stop_requested`` says
why). A job is yielded once at most, even if its claim was cleared and it came back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from runner.jobs import Job
from runner.store.postgres import claims
from runner.store.postgres.connect import store_error

# Jobs a claim takes.
CLAIM_BATCH = 32


class Claimer:
    """Claims for worker ``worker_id`` on ``conn`` (its own); close when done."""

    def __init__(self, conn: psycopg.Connection[Any], state_url: str, worker_id: int) -> None:
        self.worker_id = worker_id
        self._conn = conn
        self._state_url = state_url
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pg-claims")
        self._yielded: set[str] = set()

    def __repr__(self) -> str:
        return f"<Claimer worker={self.worker_id} yielded={len(self._yielded)}>"

    def close(self) -> None:
        """Wait for a claim under way, then close the connection."""
        try:
            self._thread.shutdown()
        finally:
            self._conn.close()

    async def jobs(self, stop_requested: Callable[[], str | None]) -> AsyncIterator[Job]:
        """The jobs this worker claims, until none is left or ``stop_requested()`` says why."""
        loop = asyncio.get_running_loop()

        def fetch() -> asyncio.Future[list[Job]]:
            return loop.run_in_executor(self._thread, self._claim_batch)

        pending: asyncio.Future[list[Job]] | None = fetch()
        while pending is not None:
            batch = await pending
            pending = None
            if not batch:
                if stop_requested() is not None:
                    return
                if not await loop.run_in_executor(self._thread, self._others_hold_work):
                    return
                await asyncio.sleep(claims.lease_s() / 3)
                pending = fetch()
                continue
            for taken, job in enumerate(batch, start=1):
                if pending is None and taken >= len(batch) * 3 // 4:
                    pending = fetch()
                if job.id not in self._yielded:
                    self._yielded.add(job.id)
                    yield job
            if stop_requested() is not None:
                return

    def _claim_batch(self) -> list[Job]:
        try:
            return claims.claim_batch(self._conn, self.worker_id, CLAIM_BATCH)
        except psycopg.Error as exc:
            raise store_error(exc, self._state_url, "cannot claim jobs") from None

    def _others_hold_work(self) -> bool:
        try:
            return claims.others_hold_work(self._conn, self.worker_id)
        except psycopg.Error as exc:
            raise store_error(exc, self._state_url, "cannot read the run's queue") from None
