"""The bounded async worker pool: takes jobs one at a time, runs each under the retry policy,
verifies and saves its image, and records every step in the checkpoint.

``concurrency`` workers pull from one iterator, so memory grows with the number of workers, not
with the manifest; and only by a few chunks per worker, as images are streamed to temp files
and verified from there. Every attempt follows the crash-safe order: intent committed, request
sent, image verified and written atomically, outcome committed. The pool never prints: it reports
through ``on_progress``, at most a few times a second (:mod:`runner.core.progress`).

Admission: before each attempt the circuit breaker must let it through, the pacer must let it
go and the budget must hold its price (:mod:`runner.core.admission`). Saving: an image is
verified, tagged and written durably (:mod:`runner.images.saving`) before its success is
recorded.

Failing: an attempt's outcome and, when it ends the job (an error final for the job, or the
last attempt of this run), the job's failed status are committed in one transaction, so a crash
can never leave a billed, failed job pending (and paid for again by the next run).

Stopping: :meth:`Pool.stop` (a signal, an error final for the run such as a 401, the budget, a
long outage, an API that answers 404 to every request of a fresh run) stops admitting jobs and
retries at once; attempts in flight finish and are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from runner.core.admission import Admission, BreakerConfig, CircuitBreaker, Halt, Ticket
from runner.core.limiter import Limiter, RateLimiter
from runner.core.pacer import PacerConfig
from runner.core.progress import Progress, ProgressReporter
from runner.core.retry import RetryAfterTooLong, RetryConfig, is_retryable, make_retrying
from runner.core.sinks import FolderSink, ImageSink, LocationSink
from runner.errors import (
    AmbiguousError,
    ApiError,
    BudgetReached,
    ClaimLost,
    ConfirmedJobFailedError,
    ImageWriteError,
    RetryableError,
    RunStoppedError,
    ServerError,
    StoreError,
    UnfetchedImageError,
)
from runner.http.client import ImageResult
from runner.images.verify import ImageInvalid, WrongSize
from runner.jobs import Job
from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD
from runner.stages import timed
from runner.store.base import Budget, Outcome, Store

log = logging.getLogger(__name__)

# url answers in a row whose image could not be fetched, none fetched between them, that stop
# the run: one is a CDN's bad moment (its job is made again), three are a CDN out of reach.
UNFETCHED_IN_A_ROW_STOP = 3


class ImageSource(Protocol):
    async def create(self, job: Job, folder: Path) -> ImageResult:
        """The image for ``job`` as a new temp file in ``folder`` (named by
        :func:`runner.images.files.temp_path_for`), which the pool then owns."""


@dataclass
class PoolResult:
    progress: Progress
    stop_reason: str | None = None  # why the run stopped early, if it did
    stop_error: ApiError | None = None
    # The stop holds for every worker of the run (the key refused, no quota, the budget, the
    # provider down, a Retry-After too long), not only for this one (its disk, its database
    # connection): a shared run's other workers are told (see runner.core.lifecycle).
    for_run: bool = False
    failures: dict[str, int] = field(default_factory=dict)  # cause -> count
    failure_messages: dict[str, str] = field(default_factory=dict)  # cause -> latest message
    # endpoint -> (429s seen, the pace it ended at in requests/min), for endpoints that met one
    rate_limits: dict[str, tuple[int, float | None]] = field(default_factory=dict)


class _Slot:
    """A request slot, given back at most once."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = False

    async def take(self) -> None:
        await self._semaphore.acquire()
        self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


@dataclass
class _JobTries:
    """One job's attempts in this run, as its attempts and its retry loop share them."""

    count: int = 0
    failed: bool = False  # recorded as failed, with its last attempt's outcome


class Pool:
    def __init__(
        self,
        source: ImageSource,
        store: Store,
        images_dir: Path,
        *,
        concurrency: int = 8,
        retry: RetryConfig | None = None,
        budget: Budget | None = None,
        breaker: BreakerConfig | None = None,
        pacer: PacerConfig | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        sink: ImageSink | None = None,
        limiter: Callable[[Callable[[float], Awaitable[None]]], Limiter] | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.images_dir = images_dir  # where the source writes its temp files
        # Where images go: the output folder's images/ unless told (an object store).
        self.sink = sink or FolderSink(images_dir, store.folder)
        self.concurrency = max(1, concurrency)
        self.retry = retry or RetryConfig()
        self.admission = Admission(
            budget or Budget(None, 0),
            CircuitBreaker(breaker, sleep=self._sleep_unless_stopped),
            # The pacer: this process's, or one shared by the run's workers (``limiter``).
            (limiter or (lambda sleep: RateLimiter(pacer, sleep=sleep)))(
                self._sleep_unless_stopped
            ),
            keep_going=lambda: not self.stopping,
            last_error=self._last_error,
        )
        # Saving an image mostly waits on fsync: a thread per worker, so that when answers
        # come back together none waits for another's fsync (full decodes are capped apart).
        self._savers = ThreadPoolExecutor(min(8, self.concurrency), "image-save")
        self._requests = asyncio.Semaphore(self.concurrency)
        self._rng = random.Random()  # backoff jitter; one for all jobs (seeding one costs)
        self._sleep = sleep or self._sleep_unless_stopped
        self._counters = Progress()
        self._progress = ProgressReporter(self._counters, on_progress or (lambda _: None))
        # Whether the API has answered anything but 404/405 in this run: until it has, a 404 is
        # taken for a wrong base URL, which stops the run instead of failing every job.
        self._endpoint_found = False
        self._unfetched_in_a_row = 0  # url answers whose image never came, since one did
        self._stop_event = asyncio.Event()
        self._result = PoolResult(Progress())

    def __repr__(self) -> str:
        c = self._counters
        return (
            f"<Pool succeeded={c.succeeded} failed={c.failed} retrying={c.retrying} "
            f"in_flight={c.in_flight} stopping={self.stopping}>"
        )

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def stop(self, reason: str = "interrupted", *, for_run: bool = False) -> None:
        """Stop admitting jobs and retries; attempts in flight finish and are recorded.
        ``for_run``: the reason holds for every worker of the run (see
        :attr:`PoolResult.for_run`)."""
        if not self.stopping:
            log.info("stopping: %s", reason, extra={"stop_reason": reason})
            self._result.stop_reason = reason
            self._result.for_run = for_run
            self._stop_event.set()
            self.admission.wake()

    async def run(self, jobs: Iterable[Job]) -> PoolResult:
        """Run ``jobs``, taken from the iterable one at a time as room frees up."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        # At most `concurrency` requests in flight; up to as many jobs again past their
        # request, verifying and saving their image, so that the next requests need not wait
        # for that (and memory stays bounded by the concurrency, not the manifest).
        live = asyncio.Semaphore(2 * self.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            live.release()

        try:
            with timed("event loop"), timed("pool run", whole_process=True):
                async for job in self.store.claim(jobs):
                    await live.acquire()
                    if self.stopping:
                        break
                    task = asyncio.create_task(self._run_job(job))
                    tasks.add(task)
                    task.add_done_callback(done)
                while tasks:
                    await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            # A save under way ends before the run's books are written and its lock released,
            # or its image could land after them, under another run; one not yet begun never
            # does (its attempt, left in flight, is a possible charge).
            await asyncio.to_thread(self._savers.shutdown, wait=True, cancel_futures=True)
            await self.admission.limiter.close()
            self._progress.flush()  # the last report is the final count
        return self.result()

    def result(self) -> PoolResult:
        """The outcome so far (also of a run cut short)."""
        self._result.progress = dataclasses.replace(self._counters)
        self._result.rate_limits = {
            name: (lane.limited_count, lane.limit_rate * 60 if lane.limit_rate else None)
            for name, lane in self.admission.limiter.lanes.items()
            if lane.limited_count
        }
        return self._result

    async def _run_job(self, job: Job) -> None:
        retrying = make_retrying(
            self.retry, sleep=self._sleep, keep_going=lambda: not self.stopping, rng=self._rng
        )
        c = self._counters
        sink = self.sink  # with a shared state: a dead worker's image may be in place
        if isinstance(sink, LocationSink) and await asyncio.to_thread(
            sink.adopt_existing, self.store, job
        ):
            c.succeeded += 1  # its image was there: a worker died before recording it
            self._progress.changed()
            return
        waiting = False  # between a failed attempt and the next: counted in c.retrying
        tries = _JobTries()

        async def attempt() -> None:
            nonlocal waiting
            if waiting:
                c.retrying, waiting = c.retrying - 1, False
            try:
                await self._attempt(job, tries)
            except ApiError as exc:
                if is_retryable(exc, self.retry.on_ambiguous):
                    c.retrying, waiting = c.retrying + 1, True
                    self._progress.changed()
                raise

        try:
            await retrying(attempt)
        except Halt as halt:
            if halt.reason:
                self.stop(halt.reason, for_run=halt.for_run)
            # the job stays pending for the next run
        except RetryAfterTooLong as exc:
            self._result.stop_error = exc.error
            waited = f"{exc.error.retry_after_s:.0f} s"
            allowed = f"{self.retry.max_retry_after_s:.0f} s"
            self.stop(
                f"the API asked to wait {waited} before retrying, more than the {allowed} allowed",
                for_run=True,
            )
        except RunStoppedError as exc:  # the key refused, no quota: so for every worker
            self._result.stop_error = exc
            self.stop(exc.describe(), for_run=True)
        except ClaimLost:  # another worker has the job now (a shared state): leave it to them
            log.info("job %s: no longer this worker's; left to the one that holds it", job.id)
        except StoreError as exc:  # the checkpoint refused a write: nothing more may be sent
            self.stop(str(exc), for_run=isinstance(exc, BudgetReached))
        except ApiError as exc:
            if not tries.failed:
                return  # stopped between attempts: the job stays pending
            c.failed += 1
            self._result.failures[exc.cause] = self._result.failures.get(exc.cause, 0) + 1
            self._result.failure_messages[exc.cause] = exc.message
        finally:
            if waiting:
                c.retrying -= 1
            self._progress.changed()

    async def _attempt(self, job: Job, tries: _JobTries) -> None:
        """One attempt: holds one of the ``concurrency`` request slots from admission until
        the answer is in, not while the image is verified and saved."""
        slot = _Slot(self._requests)
        await slot.take()
        try:
            await self._attempt_in_slot(job, slot, tries)
        finally:
            slot.give_back()

    async def _attempt_in_slot(self, job: Job, slot: _Slot, tries: _JobTries) -> None:
        ticket = await self.admission.admit(job.endpoint)
        try:
            attempt = await self.admission.intent(lambda: self.store.begin_attempt(job))
        except BaseException:
            self.admission.release(ticket)
            raise
        tries.count += 1
        c = self._counters
        c.requests += 1
        c.in_flight += 1
        self._progress.changed()
        answered = False
        try:
            result = await self._fetch(job)
            answered = self._endpoint_found = True
            if job.response_format == "url":
                self._unfetched_in_a_row = 0
            c.in_flight -= 1
            slot.give_back()  # the answer is in: the next request may go
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self._savers, self.sink.save, job, result.path)
        except ImageInvalid as exc:
            error: ApiError
            if isinstance(exc, WrongSize):
                error = ConfirmedJobFailedError(
                    f"the image {exc}", job_id=job.id, code="wrong_size"
                )
            elif job.response_format == "url":  # the API answered 200: it billed
                error = UnfetchedImageError(f"the downloaded image {exc}", job_id=job.id)
            else:
                error = AmbiguousError(f"the image {exc}", job_id=job.id)
            await self._record_failure(job, attempt, error, ticket, tries)
            raise error from None
        except ApiError as exc:
            error = self._setup_mistake(exc) or exc
            await self._record_failure(job, attempt, error, ticket, tries)
            if error is exc:
                raise
            raise error from None
        except ImageWriteError as exc:  # an image came back, but the disk refused it
            outcome = Outcome("confirmed", PRICE_PER_IMAGE_MICRO_USD, error=f"not saved: {exc}")
            self.admission.settle(PRICE_PER_IMAGE_MICRO_USD)
            self.admission.breaker.record(provider_up=True, probe=ticket.probe)
            # Counted before the write: a checkpoint that refuses it must not hide the charge.
            c.confirmed_micro_usd += PRICE_PER_IMAGE_MICRO_USD
            await self.store.record_outcome(job.id, attempt, outcome)
            raise Halt(f"cannot write images to {self.sink.where}: {exc}") from None
        finally:
            if not answered:
                c.in_flight -= 1
        self.admission.settle(PRICE_PER_IMAGE_MICRO_USD)
        self.admission.breaker.record(provider_up=True, probe=ticket.probe)
        self.admission.limiter.observe(
            job.endpoint, ticket.sent_at, limited=False, headers=result.rate_limit
        )
        usage = result.usage
        success = Outcome(
            "confirmed",
            PRICE_PER_IMAGE_MICRO_USD,
            usage.input_tokens if usage else None,
            usage.output_tokens if usage else None,
            usage.total_tokens if usage else None,
        )
        # The charge is counted before the write, the success after it: a checkpoint that
        # refuses the write must not hide a billed image from the run's summary, and a job is
        # done only once its success is recorded.
        c.confirmed_micro_usd += PRICE_PER_IMAGE_MICRO_USD
        await self.store.record_success(job.id, attempt, success, image)
        c.succeeded += 1
        self._progress.changed()

    async def _fetch(self, job: Job) -> ImageResult:
        """The source's answer; an error nobody foresaw becomes a possible charge for this one
        attempt (it may have been sent) instead of bringing the whole run down. Only an
        :class:`ImageWriteError` means the disk refused the image as it came in (handled as one
        from :func:`~runner.images.saving.save_image`): any other ``OSError`` is the network's,
        a possible charge."""
        try:
            return await self.source.create(job, self.images_dir)
        except (ApiError, ImageWriteError):
            raise
        except Exception as exc:
            log.exception("unexpected error in a request for %s", job.id)
            message = f"unexpected {type(exc).__name__}: {exc}"
            raise AmbiguousError(message, job_id=job.id) from None

    def _setup_mistake(self, error: ApiError) -> RunStoppedError | None:
        """A 404 or 405 before the API answered anything else in this run says the base URL is
        wrong (no ``/v1``, say), not that every job is: stop the run and fail no job. Any
        other answer shows the endpoint exists; after it, a 404 is the job's own failure."""
        if error.status is None:
            return None
        # A 404 that names its error (model_not_found) came from the API: the endpoint exists.
        if error.status not in (404, 405) or error.code is not None or self._endpoint_found:
            self._endpoint_found = True
            return None
        message = f"the API answered HTTP {error.status} ({error.message}): wrong base URL?"
        return RunStoppedError(
            message, job_id=error.job_id, status=error.status, code=error.code or "not_found"
        )

    def _failure_verdict(self, error: ApiError, tries: _JobTries) -> bool | None:
        """Whether this failed attempt ends the job: None if the job stays pending (retried
        now, or left to the next run as the run stops), else ``retry_later`` for the record."""
        if isinstance(error, RunStoppedError):
            return None
        retry_later = is_retryable(error, self.retry.on_ambiguous)
        if retry_later and (tries.count < self.retry.max_attempts or self.stopping):
            return None
        return retry_later

    async def _record_failure(
        self,
        job: Job,
        attempt: int,
        error: ApiError,
        ticket: Ticket,
        tries: _JobTries,
    ) -> None:
        cost = 0 if error.billing == "none" else PRICE_PER_IMAGE_MICRO_USD
        self.admission.settle(cost)
        limited = isinstance(error, ServerError) and error.status == 429
        self.admission.limiter.observe(
            job.endpoint,
            ticket.sent_at,
            limited=limited,
            retry_after_s=error.retry_after_s if limited else None,
            headers=error.rate_limit,
            answered=error.status is not None,  # a refused connection says nothing of the trip
        )
        # A rate limit is the limiter's business: the provider is up, only busy; and one that
        # billed (a url it served but the CDN did not) answered.
        provider_up = limited or error.billing == "confirmed"
        provider_up = provider_up or not isinstance(error, RetryableError)
        self.admission.breaker.record(provider_up=provider_up, probe=ticket.probe)
        self._watch_cdn(error)
        # Counted before the write: a checkpoint that refuses it must not hide a charge from
        # this run's summary.
        c = self._counters
        c.last_error = (error.cause, error.message)
        self._progress.failed()
        if error.billing == "confirmed":
            c.confirmed_micro_usd += cost
        elif error.billing == "possible":
            c.possible_micro_usd += cost
            log.info(
                "job %s attempt %d: possible charge of $%.2f (%s)",
                job.id,
                attempt,
                cost / MICRO,
                error.message,
                extra={"job_id": job.id, "attempt": attempt, "billing": "possible"},
            )
        outcome = Outcome(error.billing, cost, error=error.describe())
        retry_later = self._failure_verdict(error, tries)
        tries.failed = retry_later is not None
        if retry_later is None:
            await self.store.record_outcome(job.id, attempt, outcome)
        else:
            await self.store.record_failure(
                job.id, attempt, outcome, error, retry_later=retry_later
            )

    def _watch_cdn(self, error: ApiError) -> None:
        """Stop the run when url images keep failing to download: each failure was a billed
        generation, and a CDN this machine cannot reach (a firewall, a dead host) would have
        every job pay ``max_attempts`` times, run after run, for nothing."""
        if not isinstance(error, UnfetchedImageError):
            return
        self._unfetched_in_a_row += 1
        if self._unfetched_in_a_row >= UNFETCHED_IN_A_ROW_STOP and not self.stopping:
            self._result.stop_error = error
            self.stop(
                f"{self._unfetched_in_a_row} url images in a row could not be downloaded "
                f"(each a billed generation; last: {error.message}): is the image CDN "
                "reachable from here? (response_format: b64_json in the manifest avoids it)"
            )

    def _last_error(self) -> str | None:
        last = self._counters.last_error
        return last[1] if last else None

    async def _sleep_unless_stopped(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=delay_s)
