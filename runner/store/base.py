"""The Store protocol: the run's state as the core sees it, in domain operations, not SQL.

The pool, the plan, the run and the views talk to a :class:`Store`; the SQLite backend
(:mod:`runner.store.sqlite`) is the one implementation today, and a networked database (the
scale-out issue: PostgreSQL) implements the same protocol with the same guarantees:

- **Intent before request.** :meth:`Store.begin_attempt` returns only once the attempt is
  durably recorded ``in_flight``; the pool sends nothing before. An attempt still ``in_flight``
  when nobody is working on it any more (a crash, a dead worker) becomes a *possible* charge:
  :meth:`Store.settle_in_flight`. On SQLite one process holds the folder, so at the start and
  the end of its run every attempt in flight is such a one; a shared backend settles only this
  worker's own and those of workers whose lease has expired.
- **Success after the image is durable.** :meth:`Store.record_success` is called only once the
  image is verified and durably in its final place (SQLite's: its bytes; its folder is fsynced
  by the group commit before the success commits, once a batch); it records the attempt
  ``confirmed`` and the job ``succeeded`` in one transaction.
- **A failure with its outcome.** :meth:`Store.record_failure` records the attempt's outcome
  and the job ``failed`` together, so a crash can never leave a billed, failed job pending.
- **Budget reserved at admission.** :meth:`Store.budget` gives the budget the pool reserves
  each attempt's price from before :meth:`Store.begin_attempt`, settled with the outcome, so
  that confirmed + possible spend never passes the cap. On one machine it is kept in memory
  (one process holds the folder's lock); a shared backend hands out reservations of the one
  budget in the database, so all workers together stay under it.
- **Claiming work.** :meth:`Store.claim` hands the pool the planned jobs it may send, as an
  async iterator. On one machine the folder's lock already gives this process all of them; a
  shared backend claims small batches with ``FOR UPDATE SKIP LOCKED`` and a lease it renews.
- **Errors.** Every operation raises :class:`~runner.errors.StoreError` (a refused write:
  :class:`~runner.errors.StoreWriteError`), never the database driver's own errors.

Planning's operations are synchronous (planning runs in a worker thread, a batch of thousands
of jobs per :meth:`Store.batch`); the pool's are ``async`` and may be grouped into one commit
with other workers' (SQLite's group commit), each returning once durable. Views read through
:meth:`Store.views` (:mod:`runner.store.views`), a consistent snapshot where a view needs one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from runner.errors import ApiError, Billing, StoreWriteError
from runner.jobs import Job, JobStatus

if TYPE_CHECKING:
    from runner.store.views import Views

AttemptState = Literal["in_flight", "confirmed", "possible", "unbilled"]
# A reviewer's verdict on a job's current image; "unreviewed" until one is given (or undone).
ReviewState = Literal["approved", "rejected", "unreviewed"]
REVIEW_STATES: tuple[ReviewState, ...] = ("approved", "rejected", "unreviewed")
# Why a job's image became an earlier version (see :meth:`Store.retire_image`).
RetireReason = Literal["rejected", "edited", "changed", "missing", "unreadable"]


class ImageStat(NamedTuple):
    """What ``stat`` says of a finished image. Any change of content changes the ctime, even
    when a tool puts the old mtime back; a change within the same clock tick as the image's
    own write, keeping its size, would go unseen (git's "racy" case), a risk taken for files
    nobody but the runner writes."""

    size_bytes: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> ImageStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class JobRecord(NamedTuple):
    """A job's row, as planning needs it (a named tuple: planning reads a million of them)."""

    job_id: str
    content_hash: str
    status: JobStatus
    image_path: str | None
    sha256: str | None
    retryable: int  # 0 or 1
    error_cause: str | None
    image_size_bytes: int | None = None
    image_mtime_ns: int | None = None
    image_ctime_ns: int | None = None
    version: int = 1  # of the image recorded (or, pending, of the one to make)
    review: ReviewState = "unreviewed"  # of that version
    edited_at: str | None = None  # when a run found its image edited by hand, and kept it
    has_metadata: bool = True  # False: planned before migration 4 recorded matrix variables

    @property
    def image_stat(self) -> ImageStat | None:
        """The finished image's stat recorded with its success; None if not recorded (by a
        version before migration 3): then only its sha256 tells."""
        if self.image_size_bytes is None or self.image_mtime_ns is None:
            return None
        return ImageStat(self.image_size_bytes, self.image_mtime_ns, self.image_ctime_ns or 0)


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended with, as the pool tells the store."""

    billing: Billing
    cost_micro_usd: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class SavedImage:
    """A finished image, durably in place: its path relative to the output folder, its size in
    pixels, its sha256, and (when known) its stat at that moment."""

    path: str
    width: int
    height: int
    sha256: str
    stat: ImageStat | None = None


class KeptVersion(NamedTuple):
    """An earlier image of a job recorded as going to ``image_path`` (relative to the output
    folder), with the sha256 of the file to move there."""

    job_id: str
    version: int
    image_path: str
    sha256: str | None


class Decision(NamedTuple):
    """A review decision to record: on ``version`` of the job, or its current one (None)."""

    job_id: str
    decision: ReviewState
    version: int | None = None


class Review(NamedTuple):
    """A recorded review decision: who decided what about which version of a job, and when."""

    job_id: str
    version: int
    decision: ReviewState
    reviewer: str
    decided_at: str  # ISO-8601 UTC with milliseconds


class ReviewLog(Protocol):
    """Where review decisions are written: the review app and ``review --approve/--reject``.

    It appends to the decision log and writes nothing else, so it needs no lock on the output
    location and may write while a run is going on; the run reads the decisions when it plans
    (a rejected image is regenerated by the next run, never by the one going on). Opening it
    upgrades a checkpoint of an older version only when no run holds the location. A decision
    is durable when :meth:`decide` returns; it may wait a few seconds for a run's write, so the
    review app calls it in a worker thread (any thread may)."""

    @property
    def folder(self) -> Path: ...

    def decide(self, decisions: Sequence[Decision], reviewer: str) -> list[Review]:
        """Record ``decisions``, all or none: each must name a job whose current image is
        finished, and, if it names a version, that one (a page showing an older version must
        not approve the newer image unseen). Raises :class:`~runner.errors.ReviewError`
        naming every job that fails these, recording nothing, and
        :class:`~runner.errors.StoreWriteError` when the write cannot be made (a run kept the
        checkpoint busy too long: try again)."""
        ...

    def views(self) -> Views: ...

    def close(self) -> None: ...


class BudgetExhausted(Exception):
    """The next attempt's price does not fit under the cap."""


class Budget:
    """Spend bookkeeping in integer micro-dollars: the cap, the spend recorded, and the prices
    reserved by attempts admitted and not yet settled (see :meth:`Store.budget`)."""

    def __init__(self, cap_micro_usd: int | None, spent_micro_usd: int) -> None:
        self.cap_micro_usd = cap_micro_usd
        self.spent_micro_usd = spent_micro_usd  # confirmed + possible, all runs of the folder
        self.reserved_micro_usd = 0

    def __repr__(self) -> str:
        return (
            f"<Budget cap={self.cap_micro_usd} spent={self.spent_micro_usd} "
            f"reserved={self.reserved_micro_usd}>"
        )

    def reserve(self, price_micro_usd: int) -> None:
        if self.cap_micro_usd is not None and (
            self.spent_micro_usd + self.reserved_micro_usd + price_micro_usd > self.cap_micro_usd
        ):
            raise BudgetExhausted
        self.reserved_micro_usd += price_micro_usd

    def settle(self, reserved_micro_usd: int, charged_micro_usd: int) -> None:
        """Release a reservation and record what the attempt did cost (0 if unbilled)."""
        self.reserved_micro_usd -= reserved_micro_usd
        self.spent_micro_usd += charged_micro_usd

    @property
    def left_micro_usd(self) -> int | None:
        if self.cap_micro_usd is None:
            return None
        return max(0, self.cap_micro_usd - self.spent_micro_usd - self.reserved_micro_usd)


class Store(Protocol):
    """The state of one run (one output location), as the core uses it."""

    @property
    def folder(self) -> Path:
        """The output folder the state belongs to."""
        ...

    @property
    def write_failure(self) -> StoreWriteError | None:
        """The first write the store refused, if any: once intents cannot be recorded, nothing
        more may be sent, whoever caught the error."""
        ...

    def close(self) -> None: ...

    # --- planning (synchronous, from the planning thread) -----------------------------------

    def batch(self) -> AbstractContextManager[object]:
        """The writes made inside commit together, durably, or not at all."""
        ...

    def job_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]: ...

    def finished_images(self, job_ids: Sequence[str]) -> set[str]: ...

    def plan_jobs(self, jobs: Iterable[Job]) -> None:
        """Record the manifest's jobs; a job whose content changed starts over as pending."""
        ...

    def record_metadata(self, jobs: Iterable[Job]) -> None:
        """Record what a matrix row made each of ``jobs`` of (variables, repeat index,
        template), for jobs recorded before the store kept it; nothing else changes."""
        ...

    def retire_image(
        self,
        job_id: str,
        reason: RetireReason,
        moved_to: str | None,
        found_sha256: str | None = None,
    ) -> None:
        """The succeeded job's image becomes an earlier version, kept at ``moved_to`` (relative
        to the folder; None: no file kept): a ``versions`` row with its version, sha256 and size
        as recorded (``found_sha256``: that of a file found in its place that does not decode,
        recorded instead, with no size), and the job pending at the next version, its image and
        ``edited_at`` forgotten. Its attempts stay: what they cost stays spent. The caller moves
        the file only once this is durable, then records it moved (:meth:`mark_moved`; see
        :mod:`runner.core.versions`)."""
        ...

    def record_edit(self, job_id: str, sha256: str, stat: ImageStat, size: tuple[int, int]) -> None:
        """The succeeded job's image was edited by hand in place and is kept: the generated
        image's sha256 and size become an earlier version (reason ``edited``, no file: the
        edit overwrote it), and the job stays succeeded at the next version, unreviewed, with
        the edited file's ``sha256``, ``stat`` and ``size`` in pixels, ``edited_at`` set."""
        ...

    def unmoved_versions(self) -> list[KeptVersion]:
        """The earlier images recorded as going to a file whose move is not recorded as done
        (a crash cut it off)."""
        ...

    def mark_moved(self, versions: Sequence[tuple[str, int]]) -> None:
        """Record the moves of ``versions`` ((job id, version) pairs) as done: their files are
        durably in place, or can no longer get there."""
        ...

    def record_image_stat(self, job_id: str, stat: ImageStat) -> None: ...

    def adopt(self, job_id: str, image: SavedImage) -> None:
        """An image found in place without its success recorded: the job is done, and the
        attempt that made it (the last in flight or possible) was billed."""
        ...

    def adoption_charge(self, job_id: str) -> tuple[AttemptState, int] | None: ...

    def in_flight_count(self) -> int: ...

    def settle_in_flight(self) -> int:
        """Attempts nobody works on any more become possible charges; returns how many."""
        ...

    def spend_micro_usd(self) -> tuple[int, int]:
        """(confirmed, possible) spend recorded for this output location, in micro-dollars."""
        ...

    def budget(self, cap_micro_usd: int | None) -> Budget:
        """The budget this worker reserves each attempt's price from at admission, capped at
        ``cap_micro_usd`` over all the spend recorded here (None: no cap). SQLite: one process
        holds the folder, so the budget is kept in memory, starting from the spend recorded. A
        shared backend hands out the one budget of the database in reservations (a block of
        prices reserved in one transaction on the budget's row, given back when the worker
        ends or its lease expires), so that all workers together stay under the cap."""
        ...

    def ceiling_rpm(self, own_rpm: float | None) -> float | None:
        """The ``--rpm`` ceiling this worker paces under, given its own (None: none). One
        machine: its own. A shared backend: the planning run's, recorded for every worker of
        the run, which a worker's own may only lower."""
        ...

    # --- the run ------------------------------------------------------------------------

    def start_run(self) -> int: ...

    def queue(self, job_ids: Sequence[str]) -> None:
        """The planned jobs this run is to send (its plan's to-do): what workers claim. On one
        machine the plan hands them to the pool directly, so this does nothing; a shared
        backend records them, and any worker joining the run claims from them."""
        ...

    def planned(self) -> bool:
        """Whether the run's plan is queued (:meth:`queue`): a worker that joins earlier (its
        planning run still reading the manifest) waits for it. One machine: always."""
        ...

    def stop_requested(self) -> str | None:
        """Why the run was stopped for every worker (an operator's ``image-runner stop``, or an
        error final for the run that another worker met), if it was; cheap enough to poll
        every second. On one machine there is no other worker: always None."""
        ...

    def request_stop(self, reason: str) -> None:
        """Stop the run for every worker, for ``reason`` (each finishes what is in flight); a
        later ``run`` of the manifest starts it again. On one machine: nothing to tell."""
        ...

    def finish_run(self, run_id: int, outcome: str) -> None: ...

    def claim(self, todo: Iterable[Job]) -> AsyncIterator[Job]:
        """The planned jobs this worker may send, one as it is ready for each (an async
        iterator: a shared backend claims small batches over the network, off the pool's way).
        A job claimed and never sent (the run stopped) goes back to others when the claim's
        lease expires."""
        ...

    # --- the pool (async: each returns once durable) ---------------------------------------

    async def begin_attempt(self, job: Job) -> int:
        """Record the intent to send the next attempt of ``job``; return its number."""
        ...

    async def record_outcome(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """How an attempt that saved no image ended (no answer, an error, or an image the disk
        refused); the job stays pending."""
        ...

    async def record_success(
        self, job_id: str, attempt: int, outcome: Outcome, image: SavedImage
    ) -> None: ...

    async def record_failure(
        self, job_id: str, attempt: int, outcome: Outcome, error: ApiError, *, retry_later: bool
    ) -> None: ...

    async def drain(self) -> None:
        """Wait until every write handed over so far is durable."""
        ...

    # --- views --------------------------------------------------------------------------

    def views(self) -> Views:
        """What the results, ledger, report, status and export read."""
        ...
