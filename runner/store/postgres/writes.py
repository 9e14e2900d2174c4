"""The writes of a PostgreSQL run, each inside the caller's transaction: attempts with their
budget reservations, a job's end, planning.

The budget is exact because **the attempt row is the reservation**: :func:`intent` reserves the
price on the run's budget row (``image_runner.budgets``, shared by every worker and every run
that names it) and inserts the attempt ``in_flight`` in one transaction, or refuses with
:class:`~runner.errors.BudgetReached`; :func:`finish_attempt` turns the reservation into what
the attempt cost (an unbilled one gives its price back); settling (in flight to possible) and
adoption keep it. A worker that dies leaks nothing: its attempts in flight become possible
charges, which the budget already holds.

Statements are written with SQLite's placeholders and run through
:class:`~runner.store.postgres.connect.Translated`, as the shared ones
(:mod:`runner.store.versioning`) are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

from runner.errors import ApiError, BudgetReached, ClaimLost
from runner.jobs import Job
from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD
from runner.redact import redact
from runner.store.base import ImageStat, Outcome, SavedImage
from runner.store.postgres.connect import Translated
from runner.store.schema import now_iso
from runner.store.sqlite import metadata_columns

T = TypeVar("T")

# Rows a statement of planning sends at a time (psycopg pipelines each batch).
PLAN_BATCH = 5000


# The job is still this worker's: not succeeded, the content it was claimed with, held by this
# worker (or by nobody: its claim was cleared but nobody took it). An outcome needs no more (an
# image made for it is as good as another's); a request also needs this worker's lease valid
# (:data:`_SENDABLE`), and locks the jobs row to the end of the transaction, so two workers
# never record attempts of one job at once.
_HELD = (
    "job_id = :job AND content_hash = COALESCE(:hash, content_hash) AND status <> 'succeeded' "
    "AND (claimed_by = :me OR claimed_by IS NULL)"
)
_SENDABLE = (
    f"{_HELD} AND EXISTS (SELECT 1 FROM workers WHERE worker_id = :me "
    "AND lease_expires_at > statement_timestamp() AND finished_at IS NULL)"
)


def holds(db: Translated, job_id: str, content_hash: str | None, worker_id: int) -> bool:
    """Whether this worker may send the job (:data:`_SENDABLE`), locking its row if so."""
    params = {"job": job_id, "hash": content_hash, "me": worker_id}
    found = db.execute(f"SELECT 1 FROM jobs WHERE {_SENDABLE} FOR UPDATE", params).fetchone()
    return found is not None


def intent(db: Translated, job: Job, worker_id: int, budget: str) -> int:
    """Reserve the price on ``budget`` and record the attempt ``in_flight``; its number.
    :class:`~runner.errors.ClaimLost` (nothing written) when the job is no longer this
    worker's to send; :class:`~runner.errors.BudgetReached` when the budget cannot take the
    price, with the run's attempts in flight (any worker's: a dead worker's are settled within
    about a lease), whose outcomes may free room."""
    if not holds(db, job.id, job.content_hash, worker_id):
        raise ClaimLost(job.id, f"job {job.id} is no longer this worker's to send: not sent")
    price = PRICE_PER_IMAGE_MICRO_USD
    reserved = db.execute(
        "UPDATE budgets SET committed_micro_usd = committed_micro_usd + ? WHERE name = ? "
        "AND (cap_micro_usd IS NULL OR committed_micro_usd + ? <= cap_micro_usd) "
        "RETURNING committed_micro_usd",
        (price, budget, price),
    ).fetchone()
    if reserved is None:
        row = db.execute("SELECT cap_micro_usd FROM budgets WHERE name = ?", (budget,)).fetchone()
        cap = (row[0] or 0) / MICRO if row else 0
        flying = db.execute("SELECT COUNT(*) FROM attempts WHERE state = 'in_flight'").fetchone()
        in_flight = int(flying[0]) if flying else 0
        raise BudgetReached(f"the budget of ${cap:.2f} is reached", in_flight=in_flight)
    db.execute("UPDATE jobs SET claimed_by = ? WHERE job_id = ?", (worker_id, job.id))
    row = db.execute(
        "SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE job_id = ?", (job.id,)
    ).fetchone()
    attempt = int(row[0] if row else 0) + 1
    db.execute(
        "INSERT INTO attempts (job_id, attempt, endpoint, model, size, state, started_at, "
        "worker_id) VALUES (?, ?, ?, ?, ?, 'in_flight', ?, ?)",
        (job.id, attempt, job.endpoint, job.model, job.size, now_iso(), worker_id),
    )
    return attempt


def finish_attempt(db: Translated, budget: str, job_id: str, attempt: int, o: Outcome) -> None:
    """Record how the attempt ended, and settle its reservation with what it cost."""
    charged = o.cost_micro_usd if o.billing != "none" else 0
    before = db.execute(
        "SELECT state FROM attempts WHERE job_id = ? AND attempt = ? FOR UPDATE", (job_id, attempt)
    ).fetchone()
    db.execute(
        "UPDATE attempts SET state = ?, cost_micro_usd = ?, input_tokens = ?, "
        "output_tokens = ?, total_tokens = ?, error = ?, finished_at = ? "
        "WHERE job_id = ? AND attempt = ?",
        (
            "unbilled" if o.billing == "none" else o.billing,
            charged,
            o.input_tokens,
            o.output_tokens,
            o.total_tokens,
            redact(o.error) if o.error else None,
            now_iso(),
            job_id,
            attempt,
        ),
    )
    if before is not None and before[0] in ("in_flight", "possible"):  # it holds the price
        adjust(db, budget, charged - PRICE_PER_IMAGE_MICRO_USD)


def adjust(db: Translated, budget: str, delta_micro_usd: int) -> None:
    if delta_micro_usd:
        db.execute(
            "UPDATE budgets SET committed_micro_usd = committed_micro_usd + ? WHERE name = ?",
            (delta_micro_usd, budget),
        )


def succeeded(
    db: Translated,
    job_id: str,
    image: SavedImage,
    stat: ImageStat | tuple[None, None, None],
    held: tuple[str | None, int] | None = None,
) -> bool:
    """The job is done with ``image``, and leaves the run's to-do. ``held``: (content hash,
    worker id) the job must still be held with (:data:`_HELD`), else it is left as it is and
    the answer is False (a planner's adoption passes None)."""
    condition, params = _where(job_id, held)
    cursor = db.execute(
        "UPDATE jobs SET status = 'succeeded', image_path = :path, width = :width, "
        "height = :height, sha256 = :sha, image_size_bytes = :size, image_mtime_ns = :mtime, "
        "image_ctime_ns = :ctime, error = NULL, error_cause = NULL, retryable = 0, "
        f"updated_at = :stamp, queued = false WHERE {condition}",
        {
            **params,
            "path": image.path,
            "width": image.width,
            "height": image.height,
            "sha": image.sha256,
            "size": stat[0],
            "mtime": stat[1],
            "ctime": stat[2],
            "stamp": now_iso(),
        },
    )
    return cursor.rowcount > 0


def failed(
    db: Translated,
    job_id: str,
    error: ApiError,
    held: tuple[str | None, int],
    *,
    retry_later: bool,
) -> bool:
    """The job failed for this run, and leaves its to-do (the next run may queue it again);
    False, the job left as it is, when this worker no longer holds it (:data:`_HELD`)."""
    condition, params = _where(job_id, held)
    cursor = db.execute(
        "UPDATE jobs SET status = 'failed', error = :error, error_cause = :cause, "
        f"retryable = :retry, updated_at = :stamp, queued = false WHERE {condition}",
        {
            **params,
            "error": redact(error.describe()),
            "cause": error.cause,
            "retry": int(retry_later),
            "stamp": now_iso(),
        },
    )
    return cursor.rowcount > 0


def _where(job_id: str, held: tuple[str | None, int] | None) -> tuple[str, dict[str, object]]:
    if held is None:
        return "job_id = :job", {"job": job_id}
    return _HELD, {"job": job_id, "hash": held[0], "me": held[1]}


def adopt(
    db: Translated, job_id: str, image: SavedImage, stat: ImageStat | tuple[None, None, None]
) -> None:
    """An image found in place without its success: the last attempt in flight or possible
    made it, billed (its reserved price stays spent); the job is done."""
    db.execute(
        "UPDATE attempts SET state = 'confirmed', cost_micro_usd = ?, "
        "finished_at = COALESCE(finished_at, ?) "
        "WHERE job_id = ? AND attempt = (SELECT MAX(attempt) FROM attempts "
        "WHERE job_id = ? AND state IN ('in_flight', 'possible'))",
        (PRICE_PER_IMAGE_MICRO_USD, now_iso(), job_id, job_id),
    )
    succeeded(db, job_id, image, stat)


_PLAN = """
    INSERT INTO jobs (job_id, content_hash, status, endpoint, model, size, prompt, images,
                      response_format, row, variant, updated_at, vars, repeat_index, template)
    VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (job_id) DO UPDATE SET
        content_hash = excluded.content_hash, status = 'pending',
        endpoint = excluded.endpoint, model = excluded.model, size = excluded.size,
        prompt = excluded.prompt, images = excluded.images,
        response_format = excluded.response_format, row = excluded.row,
        variant = excluded.variant, vars = excluded.vars,
        repeat_index = excluded.repeat_index, template = excluded.template,
        image_path = NULL, width = NULL, height = NULL, sha256 = NULL,
        image_size_bytes = NULL, image_mtime_ns = NULL, image_ctime_ns = NULL,
        error = NULL, error_cause = NULL, retryable = 0,
        updated_at = excluded.updated_at, claimed_by = NULL
    WHERE jobs.content_hash <> excluded.content_hash
"""


def plan(db: Translated, jobs: Iterable[Job]) -> None:
    """Record the manifest's jobs, :data:`PLAN_BATCH` rows a statement; a job whose content
    changed starts over as pending (as :meth:`runner.store.sqlite.SqliteStore.plan_jobs`),
    claimed by nobody: a worker sending its old content finds it moved on (:data:`_HELD`)."""
    stamp = now_iso()
    for chunk in chunks(jobs, PLAN_BATCH):
        db.executemany(
            _PLAN,
            [
                (
                    job.id,
                    job.content_hash,
                    job.endpoint,
                    job.model,
                    job.size,
                    job.prompt,
                    json.dumps([str(p) for p in job.images]) if job.images else "[]",
                    job.response_format,
                    job.row,
                    job.variant,
                    stamp,
                    *metadata_columns(job),
                )
                for job in chunk
            ],
        )


def record_metadata(db: Translated, jobs: Iterable[Job]) -> None:
    for chunk in chunks(jobs, PLAN_BATCH):
        db.executemany(
            "UPDATE jobs SET vars = ?, repeat_index = ?, template = ? WHERE job_id = ?",
            [(*metadata_columns(job), job.id) for job in chunk],
        )


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
