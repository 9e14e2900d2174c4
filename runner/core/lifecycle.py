"""One run of a manifest, start to finish: the core's entry point, which the CLI and the Python
API (:mod:`runner.library`) both call.

manifest jobs -> plan (resume) -> pool (client under retry) -> images + checkpoint -> ledger
and report. Results and ledger are written whatever happens: at the end, on a stop, on a
cancel; the HTML report too, except after an immediate stop (second Ctrl-C). A dry run only
plans, and changes nothing: no request, no lock, no run recorded, no repair of the folder (see
:mod:`runner.core.plan`), no results, ledger or report; a folder that does not exist is not created.

A run's life is owned here; the CLI only wires signals to :meth:`Run.stop`.

- First the folder is locked, and it, its ``images/`` and its checkpoint are checked writable:
  a read-only folder fails here with a :class:`~runner.errors.StoreError`, before any request.
- Planning runs in a worker thread, so that a stop is heard while a large manifest is planned:
  it ends between two of planning's batches (those done stay recorded; planning again redoes
  nothing they did).
- The first stop is graceful: no new request goes out, and those in flight get ``grace_s`` to
  finish. A second stop, or the end of the grace period, stops at once: requests in flight are
  dropped, each a possible charge.
- However the work ended (done, stopped, an error final for the run, a database error), the
  books follow: the writes handed over land, attempts left in flight become possible charges,
  results and ledger are written (in a thread: a stop is still heard, and one heard then skips
  the report), the run is recorded, the report is made, the lock released. Each step is tried
  even if one before failed: on a full disk the checkpoint may refuse what the results files
  still take.
- Errors: :meth:`Run.execute` raises a :class:`~runner.errors.RunnerError` only while nothing
  has been sent (exit 2 in the CLI). After the first request, one (a database error above all)
  ends the run like a stop, its message the stop reason (exit 3).

With a shared state (``state_url``: PostgreSQL; see :mod:`runner.core.shared`) the run is one of
several workers: no folder lock; the plan's to-do is queued for all of them and the pool claims
from that queue; a stop final for the run (the key refused, the budget, an outage) is told to
every worker, and one told to every worker is heard within a second; the planning run writes
the books once the queue is empty, and a worker that joined (``join``: ``image-runner work``)
writes none. With ``ray_address`` the planning run sends nothing itself: a fleet of worker
actors does (:mod:`runner.workers.ray`). An output in object storage
(:mod:`runner.core.remote_out`) needs a shared state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from runner.core.admission import BreakerConfig
from runner.core.pacer import PacerConfig
from runner.core.plan import IMAGES_DIR, Plan
from runner.core.pool import Pool, PoolResult
from runner.core.progress import Progress
from runner.core.remote_out import RemoteOut
from runner.core.retry import RetryConfig
from runner.core.shared import plan_and_queue, shared_limiter
from runner.core.sinks import LocationSink
from runner.core.stopping import PlanningStopped, UntilStopped, to_the_end
from runner.errors import ApiError, OptionsError, RunnerError, StorageError, StoreError
from runner.http.client import ClientConfig, ImagesClient
from runner.images.files import remove_temp_files
from runner.jobs import Job
from runner.outputs.ledger import LedgerFiles, write_ledger
from runner.outputs.report import write_report
from runner.provider import MICRO
from runner.storage import LocalLocation, is_remote
from runner.store import Store, check_writable, open_for_dry_run, open_store
from runner.workers.ray import RayFleet

log = logging.getLogger(__name__)

STOP_POLL_S = 1.0  # how often a worker looks whether the run was stopped for every worker


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path | str  # a local folder, or an object store's URL (needs state_url)
    client: ClientConfig
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    pacer: PacerConfig = field(default_factory=PacerConfig)  # --rpm, adaptive rate limiting
    concurrency: int = 8
    # Over the folder's whole history (see runner.core.admission); with a shared state, the
    # cap of the run's budget in the database, for all its workers (None: the cap it has).
    max_cost_usd: float | None = None
    # With a shared state: the budget, by name, the run spends from, shared with every run
    # naming it; None: the run's own.
    budget: str | None = None
    dry_run: bool = False  # plan only: send nothing, change nothing
    retry_failed: bool = False  # also retry jobs that failed for good ...
    retry_only: frozenset[str] = frozenset()  # ... or only those with these causes
    redo_edited: bool = False  # make again the images edited by hand (else kept)
    grace_s: float = 60.0  # after a first stop, how long requests in flight get to finish
    # The run's shared state (a PostgreSQL URL), or None: the SQLite checkpoint in out_dir.
    state_url: str | None = field(default=None, repr=False)
    # Join a run planned by `run` as one more worker (`image-runner work`): no manifest, no
    # plan; jobs are claimed from the run's queue, and the planning run writes the books.
    join: bool = False
    # Worker actors on Ray doing the sending instead of this process (runner.workers.ray):
    # the cluster's address ("": Ray's default), or None: no Ray.
    ray_address: str | None = None
    workers: int = 0


@dataclass
class RunReport:
    plan: Plan
    ledger: LedgerFiles | None  # None after a dry run, or when they could not be written
    pool: PoolResult | None
    wall_s: float
    stop_reason: str | None = None  # why the run ended before its end, if it did
    cancelled: bool = False  # stopped at once: requests in flight were dropped, no report
    books_error: str | None = None  # why results and ledger could not be written, if so

    @property
    def stop_error(self) -> ApiError | None:
        return self.pool.stop_error if self.pool else None


class Run:
    """Use as: ``run = Run(jobs, options)``; ``report = await run.execute()``; ``run.stop()``,
    from a signal handler say, stops it: gracefully the first time, at once the next."""

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
        self._plan: Plan | None = None
        self._pool: Pool | RayFleet | None = None
        self._stop_reason: str | None = None  # what stop() was told
        self._fatal: str | None = None  # an error that ended the run after requests were sent
        self._at_once = False
        self._stopping = threading.Event()  # what the planning thread sees of a stop
        self._work: asyncio.Task[None] | None = None  # planning and requests, not the books
        self._remote: RemoteOut | None = None  # an object store's out: see open_remote()
        self._grace: asyncio.TimerHandle | None = None

    def stop(self, reason: str = "interrupted") -> None:
        """Stop the run; call on the event loop's thread (a signal handler of the loop), at any
        moment. The first call is graceful: planning ends after its current batch, no new
        request goes out, and requests in flight get ``grace_s`` to finish. A second call, or
        the end of the grace period, stops at once: requests in flight are dropped (possible
        charges) and no report is made. Either way :meth:`execute` returns normally, with the
        checkpoint settled and results and ledger written."""
        if self._stop_reason is not None:
            self._stop_at_once()
            return
        self._stop_reason = reason
        self._stopping.set()
        if self._pool is not None:
            self._pool.stop(reason)
        if self._work is not None and not self._work.done():
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(self.options.grace_s, self._stop_at_once)

    def _stop_at_once(self, reason: str = "cancelled") -> None:
        self._stop_reason = self._stop_reason or reason
        self._at_once = True
        self._stopping.set()
        if self._work is not None and not self._work.done():
            self._work.cancel()

    async def execute(self) -> RunReport:
        """Run to the end or to a stop, write the books, release the folder. Raises only while
        nothing has been sent (:class:`~runner.errors.OutputLockedError`,
        :class:`~runner.errors.StoreError`, a bug). Cancelling it stops the run at once; the
        cancel is passed on once the books are written."""
        self._remote = _open_remote(self.options)
        try:
            if self.options.dry_run:
                return await self._plan_only()
            o = self.options
            store = open_store(
                o.out_dir, o.state_url, join=o.join, budget=o.budget, rpm=o.pacer.ceiling_rpm
            )
            ending = asyncio.ensure_future(self._run_and_book(store))
            return await to_the_end(ending, on_cancel=self._stop_at_once)
        finally:
            if self._remote is not None:
                self._remote.close()

    async def _run_and_book(self, store: Store) -> RunReport:
        started = time.monotonic()
        try:
            if self._remote is None:
                check_writable(store.folder / IMAGES_DIR)
            run_id = store.start_run()
            work = self._work = asyncio.ensure_future(self._plan_and_send(store))
            await asyncio.wait([work])  # this task is never cancelled: execute() shields it
            if self._grace is not None:
                self._grace.cancel()  # the work is over: the timer must not cut into the books
            failure = None if work.cancelled() else work.exception()
            self._tell_other_workers(store)
            # A refused write ends the run, whether the pool raised it or stopped on it.
            failure = failure or store.write_failure
            if isinstance(failure, RunnerError) and self._requests_sent():
                # Too late for "nothing was sent": the run ends here, as on a stop.
                self._fatal, failure = str(failure), None
            # A run that broke before sending anything is recorded with its error, not as
            # finished: `status` must not report a clean night.
            outcome = self._ending_reason() or (str(failure) if failure else "finished")
            ledger, books_error = await self._write_books(store, run_id, outcome)
        finally:
            _close(store)
        if failure is not None:
            raise failure
        return RunReport(
            self._plan or Plan(todo=[]),
            ledger,
            self._pool.result() if self._pool else None,
            time.monotonic() - started,
            stop_reason=self._ending_reason(),  # also a stop heard while the books were written
            cancelled=self._at_once,
            books_error=books_error,
        )

    async def _plan_and_send(self, store: Store) -> None:
        if self.options.join:  # the planning run made the queue this worker claims from
            plan: Plan | None = Plan(todo=[])
            await asyncio.to_thread(store.settle_in_flight)
            # Started with (or before) the planning run: its plan is queued once it has read
            # the manifest; claiming earlier would find nothing and end as if the run were done.
            await self._wait_for_plan(store)
            if (reason := store.stop_requested()) is not None:
                self.stop(reason)  # a stopped run: nothing is claimed until it is planned again
        else:
            plan = await self._plan_in_thread(store)
        if plan is None:
            return
        self._plan = plan
        self._on_plan(plan)
        if (not plan.todo and not self.options.join) or self._stop_reason is not None:
            return
        # A shared backend: the run's cap, for every worker (also those on Ray).
        budget = store.budget(_micro(self.options.max_cost_usd))
        if self.options.workers:  # worker actors on Ray send; this process watches them
            self._pool = RayFleet(store, self.options, on_progress=self._on_progress)
            await self._send(store, plan.todo)
            return
        # Twice the workers: url-mode downloads go to a second host.
        connections = 2 * self.options.concurrency
        remote = self._remote
        o = self.options
        # With a shared state, the planning run's --rpm is every worker's ceiling.
        pacer = dataclasses.replace(o.pacer, ceiling_rpm=store.ceiling_rpm(o.pacer.ceiling_rpm))
        location = remote.location if remote is not None else None
        if location is None and o.state_url is not None:  # other workers write there too
            location = LocalLocation(store.folder)
        client_opened = ImagesClient(
            o.client, max_connections=connections, on_connect=self._connected
        )
        async with client_opened as client:
            self._pool = Pool(
                client,
                store,
                store.folder / IMAGES_DIR if remote is None else remote.spool,
                concurrency=self.options.concurrency,
                retry=self.options.retry,
                budget=budget,
                breaker=self.options.breaker,
                pacer=pacer,
                on_progress=self._on_progress,
                sink=None if location is None else LocationSink(location),
                limiter=shared_limiter(self.options.state_url, self.options.client, pacer),
            )
            await self._send(store, plan.todo)

    def _connected(self, seconds: float) -> None:
        """A connection took ``seconds`` to set up: the pacer's round trip sample."""
        if isinstance(self._pool, Pool):
            self._pool.admission.limiter.connected(seconds)

    async def _send(self, store: Store, todo: Sequence[Job]) -> None:
        """Run the pool (or the fleet) over ``todo``, stopping it on the run's stop."""
        assert self._pool is not None
        if self._stop_reason is None:  # else stopped while the client opened
            watching = asyncio.create_task(self._watch_for_stop(store))
            try:
                await self._pool.run(todo)
            finally:
                watching.cancel()
            # The run stopped while nothing was in flight: the claims ended before the watch
            # heard it, and this worker must not end as if the run were done.
            if self._stop_reason is None and (reason := store.stop_requested()) is not None:
                self.stop(reason)

    async def _wait_for_plan(self, store: Store) -> None:
        """Until the run's plan is queued, or this worker is stopped."""
        while True:
            if store.planned() or self._stop_reason is not None:
                return
            await asyncio.sleep(STOP_POLL_S)

    async def _watch_for_stop(self, store: Store) -> None:
        """Stop this worker (gracefully) when the run is stopped for every worker: an
        operator's ``image-runner stop``, or an error final for the run met by another."""
        while True:
            await asyncio.sleep(STOP_POLL_S)
            reason = store.stop_requested()
            if reason is not None:
                self.stop(reason)
                return

    def _tell_other_workers(self, store: Store) -> None:
        """An error final for the run (a refused key, no quota, the budget, an outage) stops
        every worker of it, not only this one; a stop this worker was told of (a signal, the
        run's stop) is its own or already theirs."""
        result = self._pool.result() if self._pool else None
        if result is None or result.stop_reason is None or not result.for_run:
            return  # this worker's own trouble (its disk, its connection) stops it alone
        if self._stop_reason is not None:
            return
        reason = result.stop_reason
        try:
            store.request_stop(reason)
        except StoreError as exc:
            log.warning("could not tell the run's other workers to stop: %s", exc)

    async def _plan_in_thread(self, store: Store, *, dry_run: bool = False) -> Plan | None:
        """The plan, made in a worker thread so that the event loop, and a stop with it, is
        heard while a large manifest is planned; None if a stop came first. The thread uses
        the store: a cancel waits for it to end (at its next job) before it is passed on."""
        plan = functools.partial(
            plan_and_queue,
            UntilStopped(self.jobs, self._stopping),
            store,
            retry_failed=self.options.retry_failed,
            only=self.options.retry_only,
            redo_edited=self.options.redo_edited,
            dry_run=dry_run,
            location=None if self._remote is None else self._remote.location,
            shared=self.options.state_url is not None,
        )
        planning = asyncio.get_running_loop().run_in_executor(None, plan)
        try:
            return await to_the_end(planning, on_cancel=self._stopping.set)
        except PlanningStopped:
            return None

    def _all_done(self) -> bool:
        """The run's queue was worked to its end: not stopped, not broken."""
        return self._work is not None and self._work.done() and not self._ending_reason()

    def _requests_sent(self) -> bool:
        return self._pool is not None and self._pool.result().progress.requests > 0

    def _ending_reason(self) -> str | None:
        """Why the run ended early: an error that broke it (a database error), else what
        stopped the pool (an error final for the run, the budget, an outage), else what
        stopped the run (a signal)."""
        pool_reason = self._pool.result().stop_reason if self._pool else None
        return self._fatal or pool_reason or self._stop_reason

    async def _write_books(
        self, store: Store, run_id: int, outcome: str
    ) -> tuple[LedgerFiles | None, str | None]:
        """Settle the checkpoint, write results and ledger, record the run's end, make the
        report: each step tried even if one before it failed. Returns the ledger's files, or
        why they could not be written."""
        # The writes handed to the group commit land first; then nothing is in flight any
        # more, so what was is a possible charge.
        await store.drain()
        try:
            store.settle_in_flight()
        except StoreError as exc:  # the next run settles them
            log.warning("could not count the requests left in flight as possible: %s", exc)
        ledger, books_error = None, None
        if self.options.join:  # no manifest here: the planning run writes the books
            self._finish_run(store, run_id, outcome)
            return None, None
        if self.options.state_url is not None and self._remote is None and self._all_done():
            # Every worker is done with the queue (the claims waited for them): the temp files
            # of one killed mid-answer are orphans now, none a live worker's.
            images = store.folder / IMAGES_DIR
            await asyncio.to_thread(remove_temp_files, images)
        write = write_ledger if self._remote is None else self._remote.write_ledger
        try:  # a million rows take seconds: in a thread, so that signals are still heard
            ledger = await asyncio.to_thread(write, self.jobs, store)
        except (OSError, StoreError, StorageError) as exc:
            books_error = f"could not write the results and ledger: {exc}"
            log.warning("%s", books_error)
        self._finish_run(store, run_id, outcome)
        # Thumbnails take time: not when told to stop at once.
        if not self._at_once:
            await asyncio.to_thread(self._write_report, store)
        return ledger, books_error

    async def _plan_only(self) -> RunReport:
        """A dry run: the plan, read without the folder's lock (a live run goes on) and
        without writing anything, a ``runs`` row included: the folder's history is of runs.
        Planned in a thread as a run's plan is, so that a stop (or a cancel: Ctrl-C) ends a
        large one at once."""
        started = time.monotonic()
        with closing(open_for_dry_run(self.options.out_dir, self.options.state_url)) as store:
            plan = await self._plan_in_thread(store, dry_run=True)
        if plan is None:
            return RunReport(Plan(todo=[]), None, None, time.monotonic() - started, "stopped")
        self._on_plan(plan)
        return RunReport(plan, None, None, time.monotonic() - started)

    @staticmethod
    def _finish_run(store: Store, run_id: int, outcome: str) -> None:
        try:
            store.finish_run(run_id, outcome)
        except StoreError as exc:
            log.warning("could not record the end of the run: %s", exc)

    def _write_report(self, store: Store) -> None:
        try:
            if self._remote is None:
                write_report(store)
            else:
                self._remote.write_report(store)
        except (OSError, StoreError, StorageError) as exc:  # a view; the run's work is done
            log.warning("could not write the HTML report: %s", exc)


def _open_remote(options: RunOptions) -> RemoteOut | None:
    """The object store of a run whose ``out_dir`` is one (with its spool), else None. Only a
    shared state (``state_url``) can tell its workers and later runs what was done there."""
    if not is_remote(options.out_dir):
        return None
    if options.state_url is None:
        out = str(options.out_dir).replace("{", "{{").replace("}", "}}")
        raise OptionsError(
            f"{{0}} {out} is object storage: it needs a shared state; add {{1}} postgresql://...",
            "out",
            "state",
        )
    return RemoteOut.open(str(options.out_dir))


def _micro(usd: float | None) -> int | None:
    return None if usd is None else round(usd * MICRO)


def _close(store: Store) -> None:
    """Close the store at the end of a run (its lock is released whatever this raises)."""
    try:
        store.close()
    except StoreError as exc:
        log.warning("could not close the checkpoint cleanly: %s", exc)
