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


# One statement: the job still this worker's to send (:data:`_SENDABLE`, its row locked), the
# price reserved on the budget, the claim renewed, the attempt inserted in flight; each write
# only if the one before it was made. It answers whether the job was held, the attempt's number
# (NULL when nothing was written) and the budget's cap (for the message when it is reached).
# The attempt's number is read in the statement's snapshot, which a wait for the job's lock
# leaves behind: an attempt committed meanwhile was another worker's, who then held the claim,
# so ``held`` (rechecked on the latest row) finds the job no longer this worker's.
_INTENT = f"""
    WITH held AS (SELECT job_id FROM jobs WHERE {_SENDABLE} FOR UPDATE),
    reserved AS (
        UPDATE budgets SET committed_micro_usd = committed_micro_usd + :price
        WHERE name = :budget AND EXISTS (SELECT 1 FROM held)
        AND (cap_micro_usd IS NULL OR committed_micro_usd + :price <= cap_micro_usd)
        RETURNING name
    ),
    claimed AS (
        UPDATE jobs SET claimed_by = :me FROM held, reserved WHERE jobs.job_id = held.job_id
    ),
    inserted AS (
        INSERT INTO attempts (job_id, attempt, endpoint, model, size, state, started_at,
                              worker_id)
        SELECT :job, COALESCE((SELECT MAX(attempt) FROM attempts WHERE job_id = :job), 0) + 1,
               :endpoint, :model, :size, 'in_flight', :stamp, :me
        FROM reserved
        RETURNING attempt
    )
    SELECT EXISTS (SELECT 1 FROM held), (SELECT attempt FROM inserted),
           (SELECT cap_micro_usd FROM budgets WHERE name = :budget)
"""


def intent(db: Translated, job: Job, worker_id: int, budget: str) -> int:
    """Reserve the price on ``budget`` and record the attempt ``in_flight``; its number.
    :class:`~runner.errors.ClaimLost` (nothing written) when the job is no longer this
    worker's to send; :class:`~runner.errors.BudgetReached` (nothing written) when the budget
    cannot take the price, with the run's attempts in flight (any worker's: a dead worker's
    are settled within about a lease), whose outcomes may free room."""
    row = db.execute(
        _INTENT,
        {
            "job": job.id,
            "hash": job.content_hash,
            "me": worker_id,
            "price": PRICE_PER_IMAGE_MICRO_USD,
            "budget": budget,
            "endpoint": job.endpoint,
            "model": job.model,
            "size": job.size,
            "stamp": now_iso(),
        },
    ).fetchone()
    assert row is not None  # a SELECT without FROM returns its row
    held, attempt, cap = row
    if not held:
        raise ClaimLost(job.id, f"job {job.id} is no longer this worker's to send: not sent")
    if attempt is None:
        flying = db.execute("SELECT COUNT(*) FROM attempts WHERE state = 'in_flight'").fetchone()
        in_flight = int(flying[0]) if flying else 0
        raise BudgetReached(
            f"the budget of ${(cap or 0) / MICRO:.2f} is reached", in_flight=in_flight
        )
    return int(attempt)


# How an attempt ended, and its reservation settled with what it cost (an attempt still
# holding the price, in flight or possible, gives back the difference), as the start of one
# statement: a job's end (:data:`_SUCCESS`, :data:`_FAILURE`) joins it as ``ended``. The
# attempt's row is locked first (``before``) so that its state is the latest one.
_FINISH = """
    WITH before AS (
        SELECT state FROM attempts WHERE job_id = :job AND attempt = :attempt FOR UPDATE
    ),
    finished AS (
        UPDATE attempts SET state = :state, cost_micro_usd = :charged,
            input_tokens = :input_tokens, output_tokens = :output_tokens,
            total_tokens = :total_tokens, error = :attempt_error, finished_at = :stamp
        FROM before WHERE job_id = :job AND attempt = :attempt
        RETURNING before.state AS was
    ),
    refund AS (
        UPDATE budgets SET committed_micro_usd = committed_micro_usd + :delta
        WHERE name = :budget AND :delta <> 0
        AND EXISTS (SELECT 1 FROM finished WHERE was IN ('in_flight', 'possible'))
    )
"""

_SUCCESS = (
    "UPDATE jobs SET status = 'succeeded', image_path = :path, width = :width, "
    "height = :height, sha256 = :sha, image_size_bytes = :size, image_mtime_ns = :mtime, "
    "image_ctime_ns = :ctime, error = NULL, error_cause = NULL, retryable = 0, "
    "updated_at = :stamp, queued = false"
)
_FAILURE = (
    "UPDATE jobs SET status = 'failed', error = :error, error_cause = :cause, "
    "retryable = :retry, updated_at = :stamp, queued = false"
)


def finish_attempt(
    db: Translated,
    budget: str,
    job_id: str,
    attempt: int,
    o: Outcome,
    ended: tuple[str, dict[str, object], tuple[str | None, int]] | None = None,
) -> bool:
    """Record how the attempt ended, and settle its reservation with what it cost; with
    ``ended`` (a job's end from :func:`success` or :func:`failure`, and the (content hash,
    worker id) the job must still be held with, :data:`_HELD`), the job's end too, in the same
    statement. False when the job's end was not written: the job moved on."""
    charged = o.cost_micro_usd if o.billing != "none" else 0
    params: dict[str, object] = {
        "job": job_id,
        "attempt": attempt,
        "state": "unbilled" if o.billing == "none" else o.billing,
        "charged": charged,
        "input_tokens": o.input_tokens,
        "output_tokens": o.output_tokens,
        "total_tokens": o.total_tokens,
        "attempt_error": redact(o.error) if o.error else None,
        "stamp": now_iso(),
        "delta": charged - PRICE_PER_IMAGE_MICRO_USD,
        "budget": budget,
    }
    if ended is None:
        db.execute(f"{_FINISH} SELECT 1", params)
        return True
    update, values, (content_hash, worker_id) = ended
    # ``before`` is read in the job's update (always true), so that the attempt's row is
    # locked before the job's, in the order adoption and settling take them: the other order
    # deadlocks with a re-plan adopting the job's image (tests/test_pg_lock_order.py).
    row = db.execute(
        f"{_FINISH}, ended AS ({update} WHERE {_HELD} "
        "AND (SELECT count(*) FROM before) >= 0 RETURNING 1) "
        "SELECT EXISTS (SELECT 1 FROM ended)",
        {**params, **values, "hash": content_hash, "me": worker_id},
    ).fetchone()
    return bool(row and row[0])


def success(
    image: SavedImage, stat: ImageStat | tuple[None, None, None]
) -> tuple[str, dict[str, object]]:
    """The job is done with ``image``, and leaves the run's to-do: the update and its values."""
    return _SUCCESS, {
        "path": image.path,
        "width": image.width,
        "height": image.height,
        "sha": image.sha256,
        "size": stat[0],
        "mtime": stat[1],
        "ctime": stat[2],
        "stamp": now_iso(),
    }


def failure(error: ApiError, *, retry_later: bool) -> tuple[str, dict[str, object]]:
    """The job failed for this run, and leaves its to-do (the next run may queue it again)."""
    return _FAILURE, {
        "error": redact(error.describe()),
        "cause": error.cause,
        "retry": int(retry_later),
        "stamp": now_iso(),
    }


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
    update, values = success(image, stat)
    db.execute(f"{update} WHERE job_id = :job", {**values, "job": job_id})


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
