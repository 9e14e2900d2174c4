"""The PostgreSQL backend of :class:`~runner.store.base.Store`: the state of one run (one output
location) in a database that many runs and many workers share.

Design (the shared schema and the run's: :mod:`.schema`; workers and claims: :mod:`.claims`;
the writes and the budget: :mod:`.writes`):

- Connections, each with the run's ``search_path``: the main one (planning, the synchronous
  operations, reads), the group commit's writer (the pool's writes, in its thread, batched into
  one transaction a savepoint each: :mod:`runner.store.groupcommit`), the claimer's (claims off
  the event loop) and the heartbeat's. A connection is used by one thread at a time.
- The promises of one machine hold across workers: an attempt is recorded ``in_flight``, with
  its price reserved on the shared budget, before its request (:meth:`begin_attempt`); success
  only after the image is durable; an attempt nobody works on any more (this worker's at its
  start and end, a dead worker's within about a lease) becomes a possible charge.
- Every error is a :class:`~runner.errors.StoreError` without the ``--state`` password; a write
  the database refuses is a :class:`~runner.errors.StoreWriteError`, the first one kept as
  ``write_failure`` so the run stops on it.
- Opened as a worker (a run, ``work``) it registers in ``workers`` and keeps a lease; opened
  without (``image-runner stop``, the views, a dry run) it may not claim or send.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg

from runner.errors import ApiError, ClaimLost, StoreError, StoreWriteError
from runner.jobs import Job
from runner.store import versioning
from runner.store.base import (
    AttemptState,
    Budget,
    ImageStat,
    JobRecord,
    KeptVersion,
    Outcome,
    RetireReason,
    SavedImage,
)
from runner.store.groupcommit import GroupCommit, batch_transaction
from runner.store.postgres import claims, writes
from runner.store.postgres.claimer import Claimer
from runner.store.postgres.connect import Translated, id_chunks, store_error
from runner.store.postgres.views import PostgresViews
from runner.store.schema import REVIEW_OF_JOB, SPEND_SQL, now_iso

T = TypeVar("T")


class PostgresStore:
    """The run at ``out_url`` in the database of ``state_url``. Made by the factories of
    :mod:`runner.store.postgres`; close when done (after :meth:`drain`)."""

    def __init__(
        self,
        state_url: str,
        out_url: str,
        conn: psycopg.Connection[Any],
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        worker: bool,
        planner: bool,
    ) -> None:
        self.state_url = state_url
        self.out_url = out_url
        # Where images are stated for their success: None for object storage (its objects are
        # runner.storage's); ``folder`` is the Store protocol's name for the location.
        self.local = local_folder(out_url)
        self.folder = self.local or Path(out_url)
        self.conn = conn
        self.write_failure: StoreWriteError | None = None
        self.worker_id: int | None = None
        self.planner = planner  # the run that plans: it sets the budget's cap
        self._transacting = threading.Lock()  # held by the outermost batch() block
        self._thread = threading.local()  # .depth: this thread's nested batch() blocks
        self._heartbeat: claims.Heartbeat | None = None
        self._commits: GroupCommit[Translated] | None = None
        self._claimer: Claimer | None = None
        self._budget = ""
        self._rpm: float | None = None  # the planning run's --rpm: the run's ceiling
        # The content each job in flight was sent with (by begin_attempt): its outcome is
        # recorded on the job only if the job still has it.
        self._hashes: dict[str, str] = {}
        try:
            with self._reading("cannot read the run's control row"):
                row = conn.execute("SELECT budget, rpm FROM control").fetchone()
            self._budget = str(row[0]) if row else out_url
            self._rpm = None if row is None or row[1] is None else float(row[1])
            if worker:
                self._join(connect)
        except BaseException:
            self.close()
            raise

    def _join(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        """Register as a worker: the row and its lease, the heartbeat, the writer, the claimer."""
        lease = claims.lease_s()
        with self._reading("cannot register this worker"):
            self.worker_id = claims.register(self.conn, lease)
        self._heartbeat = claims.Heartbeat(connect, self.state_url, self.worker_id, lease)
        writer = Translated(connect())
        self._commits = GroupCommit(
            writer, lambda: batch_transaction(writer, "BEGIN", psycopg.Error), optimistic=True
        )
        self._claimer = Claimer(connect(), self.state_url, self.worker_id)

    def __repr__(self) -> str:
        return f"<PostgresStore {self.out_url} worker={self.worker_id}>"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads, give this worker's claims back, close every connection; each step
        tried whatever the one before raised. The first database error is a StoreError. A
        second close does nothing."""
        if self.conn.closed:
            return
        error: BaseException | None = None
        steps: list[Callable[[], object]] = []
        if self._commits is not None:
            steps += [self._commits.close, self._commits.db.conn.close]
        if self._claimer is not None:
            steps.append(self._claimer.close)  # waits for a claim under way
        if self._heartbeat is not None:
            steps.append(self._heartbeat.close)
        if self.worker_id is not None:
            worker_id = self.worker_id
            steps.append(lambda: claims.retire(self.conn, worker_id))
        steps.append(self.conn.close)
        for step in steps:
            try:
                step()
            except Exception as exc:
                error = error or exc
        self._commits = self._claimer = self._heartbeat = None
        if isinstance(error, psycopg.Error):
            raise store_error(error, self.state_url, "cannot close the run's state") from None
        if error is not None:
            raise error

    # --- transactions and errors ------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[Translated]:
        """One transaction around several writes: they commit together or not at all. Nested
        blocks of the same thread join it; another thread's block waits for it to end. A
        database error is a :class:`StoreWriteError`."""
        depth: int = getattr(self._thread, "depth", 0)
        if depth:
            self._thread.depth = depth + 1
            try:
                yield Translated(self.conn)
            finally:
                self._thread.depth = depth
            return
        with self._transacting:
            self._thread.depth = 1
            try:
                with self.conn.transaction():
                    yield Translated(self.conn)
            except psycopg.Error as exc:
                raise self._write_error(exc) from None
            finally:
                self._thread.depth = 0

    def _write_error(self, exc: BaseException) -> StoreWriteError:
        failure = store_error(exc, self.state_url, f"cannot write the run of {self.out_url}")
        assert isinstance(failure, StoreError)
        written = StoreWriteError(str(failure))
        self.write_failure = self.write_failure or written
        return written

    @contextmanager
    def _reading(self, doing: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise store_error(exc, self.state_url, doing) from None

    def _worker(self) -> int:
        if self.worker_id is None:
            raise StoreError(f"the run of {self.out_url} was opened without joining it as a worker")
        return self.worker_id

    # --- the pool's writes, grouped --------------------------------------------------------

    async def begin_attempt(self, job: Job) -> int:
        """Reserve the price on the run's budget and record the attempt in flight, together;
        :class:`~runner.errors.BudgetReached` when the budget cannot take it,
        :class:`~runner.errors.ClaimLost` when the job is no longer this worker's to send
        (claimed by another, succeeded, or changed by a new plan): nothing is recorded, and
        nothing may be sent for it."""
        worker = self._worker()
        attempt = await self._grouped(lambda db: writes.intent(db, job, worker, self._budget))
        self._hashes[job.id] = job.content_hash
        return attempt

    async def record_outcome(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        await self._grouped(
            lambda db: writes.finish_attempt(db, self._budget, job_id, attempt, outcome)
        )

    async def record_success(
        self, job_id: str, attempt: int, outcome: Outcome, image: SavedImage
    ) -> None:
        """The attempt's outcome and the job's success. If the job moved on meanwhile (another
        worker holds it or made it, or a new plan changed it), the outcome alone is recorded
        and :class:`~runner.errors.ClaimLost` raised: ``image`` is a stray."""
        stat = image.stat or self._image_stat(image.path)
        held = (self._hashes.get(job_id), self._worker())

        def write(db: Translated) -> bool:
            ended = (*writes.success(image, stat), held)
            return writes.finish_attempt(db, self._budget, job_id, attempt, outcome, ended)

        self._settled(job_id, await self._grouped(write))

    async def record_failure(
        self, job_id: str, attempt: int, outcome: Outcome, error: ApiError, *, retry_later: bool
    ) -> None:
        """As :meth:`record_success`: a job that moved on is left as it is (ClaimLost)."""
        held = (self._hashes.get(job_id), self._worker())

        def write(db: Translated) -> bool:
            ended = (*writes.failure(error, retry_later=retry_later), held)
            return writes.finish_attempt(db, self._budget, job_id, attempt, outcome, ended)

        self._settled(job_id, await self._grouped(write))

    def _settled(self, job_id: str, recorded: bool) -> None:
        self._hashes.pop(job_id, None)
        if not recorded:
            raise ClaimLost(
                job_id,
                f"job {job_id} moved on while this worker sent it (another worker holds it, "
                "or a new plan changed it): its attempt is recorded, the job left as it is",
            )

    async def drain(self) -> None:
        if self._commits is not None:
            await self._commits.drain()

    async def _grouped(self, write: Callable[[Translated], T]) -> T:
        if self._commits is None:
            raise StoreError(f"the run of {self.out_url} was opened without joining it as a worker")
        try:
            return await self._commits.run(write)
        except psycopg.Error as exc:
            raise self._write_error(exc) from None

    def _image_stat(self, image_path: str) -> ImageStat | tuple[None, None, None]:
        if self.local is None:
            return None, None, None
        try:
            return ImageStat.of((self.local / image_path).stat())
        except OSError:  # then the next run hashes it, or finds it gone and makes it again
            return None, None, None

    # --- claiming ----------------------------------------------------------------------------

    async def claim(self, todo: Iterable[Job]) -> AsyncIterator[Job]:
        """The run's queued jobs (``todo``, when this process planned them, was queued by
        :meth:`queue`), claimed from the database by this worker's :class:`Claimer`. Ends when
        none is left, or the run is stopped (then :meth:`stop_requested` says why)."""
        self._worker()
        assert self._claimer is not None  # made with the worker
        async for job in self._claimer.jobs(self.stop_requested):
            yield job

    def queue(self, job_ids: Sequence[str]) -> None:
        """This run's plan: its to-do becomes the queue workers claim from, a chunk of ids a
        transaction (no long transaction holding the rows others claim), then, last and alone,
        the run marked planned (:meth:`planned`) and a stop an earlier run was given lifted. A
        job another worker finished since it was planned stays out: a succeeded job left
        queued would be counted as to do (:meth:`queue_counts`) forever."""
        for chunk in id_chunks(job_ids):
            with self.batch() as db:
                db.execute(
                    "UPDATE jobs SET queued = true FROM unnest(?::text[]) AS todo(id) "
                    "WHERE jobs.job_id = todo.id AND NOT jobs.queued "
                    "AND jobs.status <> 'succeeded'",
                    (chunk,),
                )
        with self.batch() as db:
            db.execute(
                "UPDATE control SET stop_reason = NULL, stopped_at = NULL, planned_at = now()"
            )
        if self._heartbeat is not None:
            self._heartbeat.set_stop(None)

    def planned(self) -> bool:
        """Whether a run planned this one (its queue is made): a worker that joins earlier has
        nothing to claim yet."""
        with self._reading("cannot read the run's control row"):
            row = self.conn.execute("SELECT planned_at IS NOT NULL FROM control").fetchone()
        return bool(row and row[0])

    def stop_requested(self) -> str | None:
        """The run's stop as the heartbeat last read it (a worker), else as the database says."""
        if self._heartbeat is not None:
            return self._heartbeat.stop_reason
        with self._reading("cannot read the run's stop"):
            row = self.conn.execute("SELECT stop_reason FROM control").fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def request_stop(self, reason: str) -> None:
        """Stop the run for every worker (the first reason given stays)."""
        with self.batch() as db:
            db.execute(
                "UPDATE control SET stop_reason = ?, stopped_at = now() WHERE stop_reason IS NULL",
                (reason,),
            )
        if self._heartbeat is not None:
            self._heartbeat.set_stop(reason)

    # --- settling and the budget -----------------------------------------------------------

    def settle_in_flight(self) -> int:
        """This worker's attempts in flight, and dead workers', become possible charges (their
        price stays reserved); dead workers' claims are cleared."""
        with self.batch() as db:
            return claims.settle(db.conn, self.worker_id)

    def in_flight_count(self) -> int:
        """Attempts :meth:`settle_in_flight` would make possible charges."""
        with self._reading("cannot count the attempts in flight"):
            row = self.conn.execute(
                f"SELECT COUNT(*) FROM attempts WHERE {claims.SETTLEABLE}", {"me": self.worker_id}
            ).fetchone()
        return int(row[0]) if row else 0

    def budget(self, cap_micro_usd: int | None) -> Budget:
        """The pool's budget has no cap of its own: the database is the cap, reserved by
        :meth:`begin_attempt` across all workers (so no spend needs reading here). Opened by
        the planning run, ``cap_micro_usd`` (its ``--max-cost``) becomes the cap of the run's
        budget row, shared with every run naming it. None (a run without ``--max-cost``, a
        joining worker) keeps the row's cap as it is: a run that does not name a cap must not
        lift the one another run, or an earlier night, set on a shared budget."""
        if self.planner and cap_micro_usd is not None:
            self.set_budget_cap(cap_micro_usd)
        return Budget(None, 0)

    def ceiling_rpm(self, own_rpm: float | None) -> float | None:
        """The ceiling this worker paces under: the planning run's ``--rpm``, for every worker
        of the run, lowered by a worker's own (``own_rpm``, never raised by it)."""
        if self._rpm is None or own_rpm is None:
            return own_rpm if self._rpm is None else self._rpm
        return min(self._rpm, own_rpm)

    def set_budget_cap(self, cap_micro_usd: int | None) -> None:
        """Cap the run's budget row (shared with every run naming it) at ``cap_micro_usd``."""
        with self.batch() as db:
            db.execute(
                "UPDATE budgets SET cap_micro_usd = ? WHERE name = ?",
                (cap_micro_usd, self._budget),
            )

    def spend_micro_usd(self) -> tuple[int, int]:
        """(confirmed, possible) spend recorded for this run, in micro-dollars."""
        with self._reading("cannot read the spend"):
            row = self.conn.execute(SPEND_SQL).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # --- the run ------------------------------------------------------------------------

    def start_run(self) -> int:
        """The run's row names its worker (whose ``workers`` row has its host and OS pid); its
        pid stays NULL: no pid tells another host whether a process lives (:meth:`live_workers`
        does)."""
        with self.batch() as db:
            row = db.execute(
                "INSERT INTO runs (started_at, worker_id) VALUES (?, ?) RETURNING run_id",
                (now_iso(), self.worker_id),
            ).fetchone()
        return int(row[0]) if row else 0

    def live_workers(self) -> int:
        """How many workers hold a valid lease on the run and have not finished (for
        ``status``: the run is live while this is above zero)."""
        with self._reading("cannot read the run's workers"):
            return claims.live_workers(self.conn)

    def queue_counts(self) -> claims.QueueCounts:
        """The queue's progress (:class:`~.claims.QueueCounts`), cheap enough to poll."""
        with self._reading("cannot read the run's queue"):
            return claims.queue_counts(self.conn, self._budget)

    def end_workers(self, processes: Sequence[tuple[str, int]]) -> int:
        """The workers of these ``(host, pid)`` processes, ended from outside (Ray actors their
        driver killed), finish now, not when their leases expire: their claims go back to the
        queue and their attempts in flight become possible charges (returns how many)."""
        with self.batch() as db:
            claims.end_processes(db.conn, processes)
            return claims.settle(db.conn, None)

    def finish_run(self, run_id: int, outcome: str) -> None:
        with self.batch() as db:
            db.execute(
                "UPDATE runs SET finished_at = ?, outcome = ? WHERE run_id = ?",
                (now_iso(), outcome, run_id),
            )

    # --- planning ---------------------------------------------------------------------------

    def job_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        rows = self._by_ids(
            "SELECT job_id, content_hash, status, image_path, sha256, retryable, error_cause, "
            f"image_size_bytes, image_mtime_ns, image_ctime_ns, version, {REVIEW_OF_JOB}, "
            "edited_at, vars IS NOT NULL FROM jobs j WHERE job_id = ANY(%s)",
            job_ids,
        )
        make = JobRecord._make
        return {row[0]: make(row) for row in rows}

    def finished_images(self, job_ids: Sequence[str]) -> set[str]:
        rows = self._by_ids(
            "SELECT image_path FROM jobs WHERE status = 'succeeded' AND image_path IS NOT NULL "
            "AND job_id = ANY(%s)",
            job_ids,
        )
        return {row[0] for row in rows}

    def _by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        with self._reading("cannot read the jobs"), self.conn.cursor() as cursor:
            for chunk in id_chunks(job_ids):
                rows += cursor.execute(sql, (chunk,)).fetchall()
        return rows

    def plan_jobs(self, jobs: Iterable[Job]) -> None:
        with self.batch() as db:
            writes.plan(db, jobs)

    def record_metadata(self, jobs: Iterable[Job]) -> None:
        with self.batch() as db:
            writes.record_metadata(db, jobs)

    def retire_image(
        self,
        job_id: str,
        reason: RetireReason,
        moved_to: str | None,
        found_sha256: str | None = None,
    ) -> None:
        with self.batch() as db:
            versioning.retire(db, job_id, reason, moved_to, now_iso(), found_sha256)

    def record_edit(self, job_id: str, sha256: str, stat: ImageStat, size: tuple[int, int]) -> None:
        with self.batch() as db:
            versioning.record_edit(db, job_id, sha256, stat, size, now_iso())

    def unmoved_versions(self) -> list[KeptVersion]:
        with self._reading("cannot read the versions"):
            return versioning.unmoved_versions(Translated(self.conn))

    def mark_moved(self, versions: Sequence[tuple[str, int]]) -> None:
        with self.batch() as db:
            versioning.mark_moved(db, versions)

    def record_image_stat(self, job_id: str, stat: ImageStat) -> None:
        with self.batch() as db:
            db.execute(
                "UPDATE jobs SET image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ? "
                "WHERE job_id = ?",
                (*stat, job_id),
            )

    def adopt(self, job_id: str, image: SavedImage) -> None:
        """An image found in place without its success recorded: the job is done, and the
        attempt that made it was billed (its reservation stays spent)."""
        stat = image.stat or self._image_stat(image.path)
        with self.batch() as db:
            writes.adopt(db, job_id, image, stat)

    def adoption_charge(self, job_id: str) -> tuple[AttemptState, int] | None:
        with self._reading("cannot read the attempts"):
            row = self.conn.execute(
                "SELECT state, cost_micro_usd FROM attempts WHERE job_id = %s "
                "AND state IN ('in_flight', 'possible') ORDER BY attempt DESC LIMIT 1",
                (job_id,),
            ).fetchone()
        return None if row is None else (row[0], int(row[1]))

    def views(self) -> PostgresViews:
        return PostgresViews(self.conn, self.state_url, self.out_url)


def local_folder(out_url: str) -> Path | None:
    """The local folder of a ``file://`` output location; None for object storage."""
    parts = urlsplit(out_url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None
