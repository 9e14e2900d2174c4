"""What the after-run views read from a store: the :class:`Views` protocol and its records.

The results and ledger, the report, ``status`` and ``export`` (:mod:`runner.outputs`) read the
run's state through these methods alone, never through its tables, so that a backend is free to
keep it as it likes: SQLite today (:mod:`runner.store.queries`), PostgreSQL later. Each method is
one read, of one consistent snapshot where the view needs one: status's counts and spend belong
to the same moment, and so do the report's counts and cards, while a run goes on writing.

The records are plain typed rows, named tuples where there may be a million of them (the
results' batches, the ledger's attempts). Money is in integer micro-dollars, so sums are exact;
times are ISO-8601 strings in UTC with milliseconds, as the checkpoint records them, so they sort
and compare as text. A store that cannot be read (damaged, or still being created by a first
run) raises :class:`~runner.errors.StoreError` saying ``<folder>: cannot read the checkpoint``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

from runner.jobs import JobStatus
from runner.store.base import ImageStat, RetireReason, ReviewState


class JobState(NamedTuple):
    """A job as the results show it: where it stands, its image or its error."""

    status: JobStatus
    image_path: str | None
    width: int | None
    height: int | None
    sha256: str | None
    error: str | None
    error_cause: str | None
    retryable: bool  # a failure a rerun of the manifest tries again
    version: int  # of the image recorded, or (pending) of the one to make; 1 for a first image
    review: ReviewState  # of that version
    edited: bool  # its image was found edited by hand, and kept


class JobSpend(NamedTuple):
    """A job's attempts and what they cost (or may have)."""

    attempts: int
    confirmed_micro_usd: int
    possible_micro_usd: int


class Spend(NamedTuple):
    """Spend recorded in the output location over its whole history."""

    confirmed_micro_usd: int
    possible_micro_usd: int


class BilledAttempt(NamedTuple):
    """One request that was billed (``confirmed``) or may have been (``possible``): a ledger row."""

    job_id: str
    attempt: int
    endpoint: str
    model: str
    size: str | None
    cost_micro_usd: int
    billing: Literal["confirmed", "possible"]
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    finished_at: str | None


@dataclass(frozen=True)
class LastRun:
    """The latest run recorded in the output location."""

    run_id: int
    started_at: str
    finished_at: str | None
    outcome: str | None  # "finished", or why it stopped early; None while live or interrupted
    pid: int | None  # None in checkpoints written before runs recorded their process


@dataclass(frozen=True)
class StatusFacts:
    """Everything ``status`` shows, of one moment."""

    succeeded: int
    failed: int
    failed_retryable: int  # of ``failed``
    pending: int
    in_flight: int  # attempts recorded as sent, without an outcome yet
    confirmed_micro_usd: int
    possible_micro_usd: int  # recorded possible charges; in-flight attempts are not in it
    last_activity_at: str | None  # the latest moment anything was recorded
    last_run: LastRun | None
    failures: dict[str, int] = field(default_factory=dict)  # error cause -> failed jobs, most first


class ReportJob(NamedTuple):
    """One job of the report: its card, and its line in the failures table."""

    job_id: str
    status: JobStatus
    size: str | None  # as asked
    prompt: str
    image_path: str | None
    width: int | None
    height: int | None
    sha256: str | None
    error: str | None
    error_cause: str | None
    retryable: bool
    attempts: int
    confirmed_micro_usd: int
    possible_micro_usd: int
    last_error: str | None  # a pending job's latest attempt's: why it is not done yet; else None
    references: tuple[str, ...]  # an edit's reference images, as recorded, in upload order
    version: int  # of the image recorded, or (pending) of the one to make
    review: ReviewState  # of that version
    edited: bool  # its image was found edited by hand, and kept
    image_stat: ImageStat | None  # recorded with the image: its sha256 holds while this does


class RunSpan(NamedTuple):
    """When a run started and ended; one still going, or cut off by a crash, ends at its last
    attempt's latest moment (or its start, if it made none)."""

    started_at: str
    ended_at: str


@dataclass(frozen=True)
class ReportSummary:
    """The report's figures, summed by the store: their size does not grow with the jobs."""

    succeeded: int
    failed: int
    pending: int
    failures: list[tuple[str, int]]  # (error cause, failed jobs), most first; "unknown" for none
    reviews: dict[ReviewState, int]  # succeeded jobs by the review of their current image
    spend: Spend
    runs: list[RunSpan]  # in the order they started

    @property
    def jobs(self) -> int:
        return self.succeeded + self.failed + self.pending


@dataclass(frozen=True)
class ReportSnapshot:
    """Everything the report shows from the store, of one moment: the summary, and the jobs
    read as they are consumed (a folder may hold millions), while the snapshot is open."""

    summary: ReportSummary
    jobs: Iterator[ReportJob]  # in job id order


class ExportJob(NamedTuple):
    """A succeeded job with its image recorded, as an export needs it."""

    job_id: str
    prompt: str
    size: str | None  # as asked; None: the provider's default
    model: str
    references: tuple[str, ...]  # the reference images' paths, in upload order
    image_path: str  # relative to the output folder
    width: int
    height: int
    sha256: str
    vars: dict[str, str | int | float]  # a matrix row's variables; {} for none
    repeat_index: int | None  # the copy number of a row with ``repeat``
    template: str | None  # a matrix row's prompt template
    version: int
    review: ReviewState
    edited: bool
    content_hash: str  # of what shaped the image, references included (runner.jobs)


class ReviewItem(NamedTuple):
    """A job as the review app shows it: its current image, its references and its review."""

    job_id: str
    status: JobStatus
    prompt: str
    size: str | None
    model: str
    image_path: str | None
    width: int | None
    height: int | None
    sha256: str | None
    references: tuple[str, ...]  # the reference images' paths as recorded, in upload order
    version: int
    review: ReviewState
    reviewed_by: str | None
    reviewed_at: str | None
    edited: bool
    error: str | None
    error_cause: str | None
    image_stat: ImageStat | None  # recorded with the image: its sha256 holds while this does


class ReviewPage(NamedTuple):
    items: list[ReviewItem]  # in job id order
    total: int  # of the jobs the filters select


class VersionRecord(NamedTuple):
    """An earlier image of a job, kept where it was moved (None when it was gone), with the
    review it had."""

    job_id: str
    version: int
    image_path: str | None
    sha256: str | None
    width: int | None
    height: int | None
    reason: RetireReason
    retired_at: str
    review: ReviewState
    reviewed_by: str | None
    reviewed_at: str | None


class Views(Protocol):
    """The read side of a store. Each call reads one consistent snapshot where its view needs
    one; none of them writes."""

    def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The states of those of ``job_ids`` the store has (a few thousand ids a call)."""
        ...

    def job_spend(self, job_ids: Sequence[str]) -> dict[str, JobSpend]:
        """The attempts and spend of those of ``job_ids`` with attempts."""
        ...

    def billed_attempts(self) -> Iterator[BilledAttempt]:
        """Every billed or possibly billed attempt, in the order they finished, read as it is
        consumed: a folder's history may hold millions."""
        ...

    def spend(self) -> Spend: ...

    def status_facts(self) -> StatusFacts | None:
        """Where the run stands, in one snapshot; None while a first run is only creating
        the store."""
        ...

    def report_snapshot(self) -> AbstractContextManager[ReportSnapshot]:
        """``with views.report_snapshot() as snap:`` the summary and the jobs of one read
        transaction: the jobs stream from it until the block ends."""
        ...

    def exportable_jobs(self) -> list[ExportJob]:
        """The succeeded jobs with an image recorded, in the order they were first planned."""
        ...

    def review_items(
        self,
        *,
        status: JobStatus | None = None,
        review: ReviewState | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> ReviewPage:
        """A page of jobs in id order, filtered by status and review state (None: any)."""
        ...

    def review_item(self, job_id: str) -> ReviewItem | None: ...

    def review_counts(self) -> dict[str, int]:
        """Jobs by status (``succeeded``, ``failed``, ``pending``) and succeeded jobs by review
        state (``approved``, ``rejected``, ``unreviewed``), every key present."""
        ...

    def job_versions(self, job_id: str) -> list[VersionRecord]:
        """The earlier images of a job, oldest first."""
        ...


class Viewable(Protocol):
    """What the outputs take: a store's views, and its folder, where the outputs are written
    and the images are. Every store is one."""

    @property
    def folder(self) -> Path: ...

    def views(self) -> Views: ...
