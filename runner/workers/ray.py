"""Ray as the launcher: ``image-runner run MANIFEST --state URL --ray [ADDRESS] --workers N``.

The driver (the process that ran ``run``) plans the run and queues its to-do in the database as
any run does (:mod:`runner.core.lifecycle`); then, instead of sending from a pool of its own, it
hands the sending to a :class:`RayFleet`, which the lifecycle treats as it treats a pool
(``run``, ``stop``, ``result``), and writes the books when it is done.

- The fleet starts ``workers`` actors, spread over the cluster's nodes, each taking a CPU. A
  call of an actor's :meth:`_Worker.work` runs the worker loop of ``image-runner work`` in the
  actor's process, on an event loop of its own (:func:`runner.library.execute` with no jobs and
  ``join``): it claims from the run's queue until no job is left, records every attempt in the
  database, and returns its share (:class:`WorkerShare`).
- Ray restarts an actor whose process died (``max_restarts=-1``) but never runs its call again
  (``max_task_retries=0``): a retry of Ray's would re-send paid requests. Whether a request is
  sent again is the store's decision alone (an attempt a dead worker left in flight becomes a
  possible charge, then is retried or failed as ``--on-ambiguous`` says). The call that failed
  with its actor (:class:`ray.exceptions.RayActorError`) is made again by the driver, on the
  restarted actor, while the run's queue holds jobs and no stop was requested; restarts are
  counted and logged.
- An actor whose call returned found no job left: it is ended, freeing its CPU (an actor that
  waited for one, when ``workers`` exceeds the cluster's CPUs, then starts, finds nothing, ends).
- Progress is read from the store every :data:`PROGRESS_POLL_S` seconds from counts its
  partial indexes keep (:meth:`~runner.store.postgres.PostgresStore.queue_counts`: a poll
  costs the same at ten million jobs), less what they were when the actors started, and handed
  to ``on_progress`` as a pool's counters are: the jobs done and failed exactly; the spend as
  the run's budget row moved (its charges, confirmed and possible together, counted as
  confirmed: a budget shared with other runs counts theirs too). When the actors are done, the
  run's full status (one aggregation) gives the exact counters, spend split.
- A stop (Ctrl-C, SIGTERM) is recorded as the run's stop in the database, where every actor
  hears it within a few seconds and finishes what it has in flight. A stop at once (a second
  Ctrl-C, the end of the grace period) ends the actors' processes; then (and at any end) the
  workers of every actor process the fleet ended or saw die are marked finished, not left to
  their leases, and what they had in flight becomes possible charges
  (:meth:`~runner.store.postgres.PostgresStore.end_workers`) before the books are written. An
  actor tells the driver its process by host and pid, which is how its worker registered.
- Credentials: the API key (in the client's options) and the state URL reach an actor only as
  the argument of its call, which Ray neither logs nor shows; never in a runtime_env, an actor's
  name or options. In the actor, the store and the client register both with
  :mod:`runner.redact` as they open, and its log is masked, so nothing it writes shows them.

``ray`` is imported only when a fleet runs: it is an optional extra, ``pip install
"image-runner[ray]"``, whose presence :class:`~runner.core.options.Options` checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from runner.core.pool import PoolResult
from runner.core.progress import Progress
from runner.errors import RunnerError, StoreError
from runner.jobs import Job
from runner.logs import setup_logging
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.store import Store
from runner.store.views import StatusFacts

if TYPE_CHECKING:
    from runner.core import lifecycle
    from runner.core.lifecycle import RunOptions
    from runner.store.postgres.claims import QueueCounts

log = logging.getLogger(__name__)

PROGRESS_POLL_S: Final = 1.0  # how often the driver reads the run's progress from the store
KILLED_WAIT_S: Final = 10.0  # the longest the driver waits for killed actors' calls to end


@dataclass(frozen=True)
class WorkerShare:
    """What one call of a worker actor did: its pool's counters and failures, why it stopped
    early, or the error that kept it from starting (nothing sent then)."""

    progress: Progress = field(default_factory=Progress)
    stop_reason: str | None = None
    error: str | None = None
    failures: dict[str, int] = field(default_factory=dict)
    failure_messages: dict[str, str] = field(default_factory=dict)
    rate_limits: dict[str, tuple[int, float | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, outcome: lifecycle.RunReport) -> WorkerShare:
        """The share of a worker's run (its :class:`~runner.errors.ApiError`, whose pickling
        is not promised, stays in the actor: its message is the stop reason)."""
        pool = outcome.pool or PoolResult(Progress())
        return cls(
            pool.progress,
            outcome.stop_reason,
            failures=pool.failures,
            failure_messages=pool.failure_messages,
            rate_limits=pool.rate_limits,
        )


class _Worker:
    """A worker actor: its process runs the worker loop once per :meth:`work` call."""

    def __init__(self) -> None:
        # Warnings, masked, on the actor's stderr, which Ray shows on the driver's.
        setup_logging(0)

    def where(self) -> tuple[str, str, int]:
        """The node this actor runs on, its host's name and its process's id (the last two as
        its worker registers: :func:`runner.store.postgres.claims.register`)."""
        import ray

        return ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid()

    def work(self, options: RunOptions) -> WorkerShare:
        """Work as ``image-runner work`` does until no job is left or the run is stopped."""
        from runner.library import execute

        try:
            return WorkerShare.of(asyncio.run(execute([], options)))
        except RunnerError as exc:  # raised before this worker sent anything
            return WorkerShare(error=str(exc))


@functools.cache
def _worker_class() -> Any:
    import ray

    return ray.remote(max_restarts=-1, max_task_retries=0)(_Worker)


def _new_actor() -> Any:
    """A worker actor, placed by Ray on the least busy nodes first (spread, not packed)."""
    return _worker_class().options(scheduling_strategy="SPREAD").remote()


@dataclass
class _Actor:
    number: int  # 1..workers, as the log names it
    handle: Any
    placement: tuple[str, int] | None = None  # (node id, pid), once the actor told it


class RayFleet:
    """The worker actors of one run on Ray, supervised from the driver; see the module's
    docstring. ``placement`` maps each actor's number to its (node id, pid), as it told them."""

    def __init__(
        self,
        store: Store,
        options: RunOptions,
        *,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        from runner.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)  # Options requires --state for --ray
        self._store = store
        self._address = options.ray_address
        self._count = options.workers
        # What each actor runs: a worker's run, which must not launch a fleet of its own.
        self._worker_options = dataclasses.replace(options, join=True, ray_address=None, workers=0)
        self._on_progress = on_progress or (lambda _: None)
        self._progress = Progress()
        self._shares: list[WorkerShare] = []
        self._stop_reason: str | None = None  # what stop() was told
        self._stop_recorded = False
        self._run_stop: str | None = None  # the run's stop, as the store last said
        self._queued: int | None = None  # the run's jobs left, as the store last said
        self._processes: set[tuple[str, int]] = set()  # (host, pid) of every actor told
        self.restarts = 0
        self.placement: dict[int, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return (
            f"<RayFleet workers={self._count} restarts={self.restarts} "
            f"succeeded={self._progress.succeeded} failed={self._progress.failed}>"
        )

    def stop(self, reason: str) -> None:
        """Stop every actor gracefully: the stop is recorded in the store at the next poll."""
        self._stop_reason = self._stop_reason or reason

    def result(self) -> PoolResult:
        """The run's progress as the store last gave it, this fleet's requests (those of the
        calls that returned: a dead actor's are not known) and the actors' failures."""
        result = PoolResult(dataclasses.replace(self._progress, requests=self._requests()))
        for share in self._shares:
            for cause, count in share.failures.items():
                result.failures[cause] = result.failures.get(cause, 0) + count
            result.failure_messages.update(share.failure_messages)
            result.rate_limits.update(share.rate_limits)
        left = self._queued is None or self._queued > 0
        reasons = [self._run_stop, *(s.stop_reason for s in self._shares)]
        if left:  # an actor that could not start matters only if jobs were left for it
            reasons += [s.error for s in self._shares]
        result.stop_reason = next((r for r in reasons if r), None)
        return result

    async def run(self, todo: Iterable[Job]) -> PoolResult:
        """Start the actors and supervise them until each call has returned, the run's stop
        included. ``todo`` is not read: the planning queued it, and the actors claim it from
        the store. Raises :class:`~runner.errors.RunnerError` only before any actor started
        (Ray cannot be reached: nothing was sent)."""
        import ray

        connected_here = await asyncio.to_thread(_connect, self._address)
        actors: list[_Actor] = []
        calls: dict[asyncio.Future[WorkerShare], _Actor] = {}
        try:
            start = await asyncio.to_thread(self._store.views().status_facts)
            if start is None:
                raise StoreError("the run's state holds no plan: nothing to send")
            counts = await asyncio.to_thread(self._store.queue_counts)
            if self._stop_reason is not None:  # stopped while Ray was being reached
                return self.result()
            actors = [self._start(number) for number in range(1, self._count + 1)]
            calls = {self._call(actor): actor for actor in actors}
            while calls:
                done, _ = await asyncio.wait(calls, timeout=PROGRESS_POLL_S)
                await self._poll(counts)
                await self._record_stop()
                for call in done:
                    actor = calls.pop(call)
                    if self._goes_on(actor, call):
                        calls[self._call(actor)] = actor
                    else:
                        ray.kill(actor.handle, no_restart=True)
            await self._last_poll(start)
        finally:
            for actor in actors:
                ray.kill(actor.handle, no_restart=True)
            try:
                await _ended(calls)
            finally:
                self._end_workers()
                if connected_here:
                    ray.shutdown()
        return self.result()

    def _start(self, number: int) -> _Actor:
        actor = _Actor(number, _new_actor())
        self._ask_where(actor)
        return actor

    def _ask_where(self, actor: _Actor) -> None:
        """Log where the actor runs once it has started (it may wait for a CPU)."""

        def told(answer: asyncio.Future[tuple[str, str, int]]) -> None:
            if answer.cancelled() or answer.exception() is not None:
                return  # it died before it answered: its call says so
            node, host, pid = answer.result()
            self.placement[actor.number] = node, pid
            self._processes.add((host, pid))
            log.info("worker actor %d runs on node %s, pid %d", actor.number, node, pid)

        asyncio.wrap_future(actor.handle.where.remote().future()).add_done_callback(told)

    def _call(self, actor: _Actor) -> asyncio.Future[WorkerShare]:
        return asyncio.wrap_future(actor.handle.work.remote(self._worker_options).future())

    def _goes_on(self, actor: _Actor, call: asyncio.Future[WorkerShare]) -> bool:
        """Whether ``actor`` is called again: only when its process died (Ray restarted it)
        while jobs are left and nobody stopped the run."""
        import ray

        try:
            share = call.result()
        except ray.exceptions.RayActorError:
            if self._stop_reason or self._run_stop or self._queued == 0:
                return False
            self.restarts += 1
            if isinstance(call.exception(), ray.exceptions.ActorDiedError):
                # Ray gave up on it (its node is gone): a new actor takes its place.
                actor.handle = _new_actor()
            log.warning(
                "worker actor %d died (its process ended); Ray restarted it and it goes on with "
                "the run's queue (%d restarts so far); its requests in flight are possible "
                "charges once its lease expires",
                actor.number,
                self.restarts,
            )
            self._ask_where(actor)
            return True
        except ray.exceptions.RayError as exc:  # a bug in the worker: not to be called again
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            share = WorkerShare(error=f"worker actor {actor.number} failed: {first_line}")
        if share.error:
            log.warning("worker actor %d: %s", actor.number, share.error)
        self._shares.append(share)
        return False

    async def _poll(self, start: QueueCounts) -> None:
        """Read the run's queue and stop from the store; feed the progress since ``start``."""
        try:
            counts = await asyncio.to_thread(self._store.queue_counts)
        except StoreError as exc:  # the actors go on; the next poll may read it
            log.warning("could not read the run's progress: %s", exc)
            return
        self._run_stop = self._store.stop_requested()
        self._queued = counts.queued
        self._progress = moved(start, counts, self._requests())
        self._on_progress(dataclasses.replace(self._progress))

    async def _last_poll(self, start: StatusFacts) -> None:
        """The exact progress since ``start``, from the run's full status, once the actors
        are done."""
        try:
            facts = await asyncio.to_thread(self._store.views().status_facts)
        except StoreError as exc:  # the books, written next, are the run's account
            log.warning("could not read the run's progress: %s", exc)
            return
        if facts is not None:
            self._progress = _since(start, facts, self._requests())
            self._on_progress(dataclasses.replace(self._progress))

    def _end_workers(self) -> None:
        """The workers of the actor processes this fleet ended (or saw die) finish, and what
        they had in flight becomes possible charges, before the books are written: their leases
        would otherwise run on after the books. A worker whose call returned finished already.
        Blocking, and short: it must run even when the fleet is cancelled."""
        if not self._processes:
            return
        try:
            settled = self._store.end_workers(sorted(self._processes))
        except StoreError as exc:
            log.warning(
                "could not settle what the worker actors had in flight: %s; those requests "
                "become possible charges when their leases expire (the next run counts them)",
                exc,
            )
            return
        if settled:
            log.warning(
                "the worker actors were ended with %d requests in flight: counted as possible "
                "charges",
                settled,
            )

    async def _record_stop(self) -> None:
        """Record a stop this fleet was told of as the run's, once: every actor hears it."""
        if self._stop_reason is None or self._stop_recorded:
            return
        self._stop_recorded = True
        try:
            await asyncio.to_thread(self._store.request_stop, self._stop_reason)
        except StoreError as exc:
            log.warning("could not tell the worker actors to stop: %s", exc)

    def _requests(self) -> int:
        return sum(share.progress.requests for share in self._shares)


def _connect(address: str | None) -> bool:
    """Connect this process to Ray (``""``: Ray's default); True if this call did, and so must
    disconnect at the end. A process already connected (a notebook) keeps its connection."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or None, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f"at {address}" if address else "($RAY_ADDRESS, else a new local one)"
        raise RunnerError(
            f"cannot start or reach the Ray cluster {where}: {exc}; nothing was sent"
        ) from None
    return True


async def _ended(calls: Iterable[asyncio.Future[WorkerShare]]) -> None:
    """Until the calls of killed actors have failed (their processes are gone), at most
    :data:`KILLED_WAIT_S`; their errors are expected, and read so that none is reported."""
    pending = list(calls)
    if not pending:
        return
    await asyncio.wait(pending, timeout=KILLED_WAIT_S)
    for call in pending:
        if call.done() and not call.cancelled():
            call.exception()


def moved(start: QueueCounts, now: QueueCounts, requests: int) -> Progress:
    """The run's progress since ``start`` from its queue's counts: the jobs that left the queue,
    those of them that failed (see :class:`~runner.store.postgres.claims.QueueCounts`) and
    succeeded, the spend the budget row took beyond the reservations of attempts in flight."""
    finished = max(0, start.queued - now.queued)
    failed = (now.failed - start.failed) - (now.failed_queued - start.failed_queued)
    failed = min(finished, max(0, failed))
    reserved = (now.in_flight - start.in_flight) * PRICE_PER_IMAGE_MICRO_USD
    return Progress(
        succeeded=finished - failed,
        failed=failed,
        in_flight=now.in_flight,
        requests=requests,
        confirmed_micro_usd=now.committed_micro_usd - start.committed_micro_usd - reserved,
    )


def _since(start: StatusFacts, now: StatusFacts, requests: int) -> Progress:
    """The run's progress since ``start``, as a pool's counters: the jobs that left the queue
    (pending), those of them that succeeded, the spend recorded since."""
    succeeded = max(0, now.succeeded - start.succeeded)
    finished = max(0, start.pending - now.pending)
    return Progress(
        succeeded=succeeded,
        failed=max(0, finished - succeeded),
        in_flight=now.in_flight,
        requests=requests,
        confirmed_micro_usd=now.confirmed_micro_usd - start.confirmed_micro_usd,
        possible_micro_usd=now.possible_micro_usd - start.possible_micro_usd,
    )
