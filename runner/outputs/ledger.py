"""The results table and the cost ledger, built from the checkpoint.

- ``results.parquet`` / ``results.csv``: one row per job of the manifest, in manifest order.
- ``ledger.csv``: one row per billed or possibly billed request, over the folder's whole history
  (money spent on a job stays spent even if the job leaves the manifest).

Both are written atomically (temp file, rename), at the end of every run and on interruption,
and can always be rebuilt from the checkpoint and the manifest. They are written a batch of
:data:`RESULTS_BATCH_JOBS` rows at a time (a Parquet row group, CSV lines), each batch's states
and spend looked up by id in the store's views, and the ledger as its attempts stream in, so a
manifest of a million jobs costs no more memory than a thousand.
The CSV files read back in pandas as if pandas had written them (``True``/``False``, empty
cells for missing values); the Parquet file carries pandas' metadata, so ``width`` and
``height`` come back as nullable integers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from runner.images.files import temp_path_for
from runner.jobs import Job
from runner.provider import MICRO
from runner.store.views import JobState, Viewable, Views

if TYPE_CHECKING:
    import pyarrow as pa

RESULTS_BATCH_JOBS: Final = 5000

RESULTS_COLUMNS = [
    "job_id",
    "status",
    "endpoint",
    "model",
    "size",
    "prompt",
    "images",
    "image_path",
    "width",
    "height",
    "sha256",
    "attempts",
    "cost_usd",
    "possible_cost_usd",
    "error",
    "error_cause",
    "retry_on_rerun",
    "version",
    "review",
    "edited",
]
LEDGER_COLUMNS = [
    "job_id",
    "attempt",
    "endpoint",
    "model",
    "size",
    "cost_usd",
    "billing",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "finished_at",
]

# The columns that are not text: their Arrow type, and the dtype pandas reads them back as.
_TYPED_COLUMNS: Final = {
    "width": ("int64", "Int64"),
    "height": ("int64", "Int64"),
    "attempts": ("int64", "int64"),
    "cost_usd": ("float64", "float64"),
    "possible_cost_usd": ("float64", "float64"),
    "retry_on_rerun": ("bool", "bool"),
    "version": ("int64", "int64"),
    "edited": ("bool", "bool"),
}


def _results_schema() -> pa.Schema:
    """The results' Arrow schema, carrying the pandas metadata of a frame with those dtypes."""
    # Imported here: a dry run, which writes no results, starts faster without them.
    import pandas as pd
    import pyarrow as pa

    arrow_types, pandas_dtypes = {}, {}
    for name in RESULTS_COLUMNS:
        arrow_type, pandas_dtype = _TYPED_COLUMNS.get(name, ("string", "object"))
        arrow_types[name], pandas_dtypes[name] = pa.type_for_alias(arrow_type), pandas_dtype
    empty = pd.DataFrame({name: pd.Series([], dtype=t) for name, t in pandas_dtypes.items()})
    metadata = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    return pa.schema(list(arrow_types.items()), metadata=metadata)


@dataclass(frozen=True)
class Totals:
    succeeded: int
    failed: int
    pending: int
    confirmed_usd: float
    possible_usd: float
    failed_retry_on_rerun: int = 0

    @property
    def jobs(self) -> int:
        return self.succeeded + self.failed + self.pending


@dataclass(frozen=True)
class LedgerFiles:
    # Paths in the output folder, or URLs in its object store (runner.core.remote_out).
    results_parquet: Path | str
    results_csv: Path | str
    ledger_csv: Path | str
    totals: Totals


def write_ledger(jobs: Iterable[Job], store: Viewable, folder: Path | None = None) -> LedgerFiles:
    """Write results and ledger into the output folder (or ``folder``: a spool, for a run
    whose output is in object storage); return their paths and the totals."""
    folder, views = folder or store.folder, store.views()
    parquet_path, csv_path = folder / "results.parquet", folder / "results.csv"
    ledger_path = folder / "ledger.csv"
    import pyarrow.parquet as pq

    counts = {"succeeded": 0, "failed": 0, "pending": 0, "retry": 0}
    schema = _results_schema()
    with ExitStack() as stack:
        parquet_tmp = stack.enter_context(_atomic(parquet_path))
        results_csv = stack.enter_context(_atomic_text(csv_path))
        parquet = stack.enter_context(pq.ParquetWriter(parquet_tmp, schema))
        lines = _csv_writer(results_csv)
        lines.writerow(RESULTS_COLUMNS)
        iterator = iter(jobs)
        wrote = False
        while batch := list(islice(iterator, RESULTS_BATCH_JOBS)):
            rows = _result_rows(batch, views)
            for row in rows:
                counts[row[1]] += 1
                counts["retry"] += row[16]
            lines.writerows(rows)
            parquet.write_table(_table(rows, schema))
            wrote = True
        if not wrote:  # still a file with the columns
            parquet.write_table(_table([], schema))
    with _atomic_text(ledger_path) as ledger_csv:
        _write_ledger_rows(views, _csv_writer(ledger_csv))
    confirmed, possible = views.spend()
    totals = Totals(
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        pending=counts["pending"],
        confirmed_usd=confirmed / MICRO,
        possible_usd=possible / MICRO,
        failed_retry_on_rerun=counts["retry"],
    )
    return LedgerFiles(parquet_path, csv_path, ledger_path, totals)


# A job the checkpoint has not heard of: the manifest added it since the last run.
_NOT_PLANNED: Final = JobState(
    "pending", None, None, None, None, None, None, False, 1, "unreviewed", False
)


def _result_rows(jobs: list[Job], views: Views) -> list[tuple[Any, ...]]:
    """One results row per job, joined with its state and spend in the checkpoint."""
    ids = [job.id for job in jobs]
    states = views.job_states(ids)
    spend = views.job_spend(ids)
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for job in jobs:
        # Unpacked once, not read field by field: a million rows run through here.
        (status, image_path, width, height, sha256, error, error_cause, retryable, version,
         review, edited) = states.get(job.id, _NOT_PLANNED)  # fmt: skip
        attempts, confirmed, possible = spend.get(job.id) or (0, 0, 0)
        done = status == "succeeded"
        append(
            (
                job.id,
                status,
                job.endpoint,
                job.model,
                job.size,
                job.prompt,
                "|".join(map(str, job.images)),
                image_path,
                width,
                height,
                sha256,
                attempts,
                confirmed / MICRO,
                possible / MICRO,
                None if done else error,
                None if done else error_cause,
                # A failure that may clear (server error, timeout): the next run tries again.
                status == "failed" and retryable,
                # Of the image recorded, or of the one to make; a review is of a finished one.
                version,
                review if done else "unreviewed",
                done and edited,
            )
        )
    return rows


def _table(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    arrays = [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_ledger_rows(views: Views, lines: Any) -> None:
    lines.writerow(LEDGER_COLUMNS)
    for job_id, attempt, endpoint, model, size, cost, billing, *rest in views.billed_attempts():
        lines.writerow((job_id, attempt, endpoint, model, size, cost / MICRO, billing, *rest))


def _csv_writer(f: TextIO) -> Any:
    # As pandas writes: minimal quoting, "\n", None as an empty cell, floats by repr.
    return csv.writer(f, lineterminator="\n")


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``, renamed onto it (after an fsync) if the block succeeds."""
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_text(path: Path) -> Iterator[TextIO]:
    with _atomic(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f
