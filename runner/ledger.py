"""The results table and the cost ledger, built with pandas from the checkpoint.

- ``results.parquet`` / ``results.csv``: one row per job of the manifest, in manifest order.
- ``ledger.csv``: one row per billed or possibly billed request, over the folder's whole history
  (money spent on a job stays spent even if the job leaves the manifest).

Both are written atomically (temp file, rename), at the end of every run and on interruption,
and can always be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from runner.api import MICRO
from runner.images import TMP_MARKER
from runner.jobs import Job
from runner.store import Store

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
    results_parquet: Path
    results_csv: Path
    ledger_csv: Path
    totals: Totals


def results_frame(jobs: list[Job], store: Store) -> pd.DataFrame:
    """One row per manifest job, joined with its state and spend in the checkpoint."""
    state = {r["job_id"]: r for r in store.query("SELECT * FROM jobs")}
    spend = {
        r["job_id"]: r
        for r in store.query(
            "SELECT job_id, COUNT(*) AS attempts, "
            "SUM(CASE WHEN state = 'confirmed' THEN cost_micro_usd ELSE 0 END) AS confirmed, "
            "SUM(CASE WHEN state = 'possible' THEN cost_micro_usd ELSE 0 END) AS possible "
            "FROM attempts GROUP BY job_id"
        )
    }
    rows = []
    for job in jobs:
        s, m = state.get(job.id), spend.get(job.id)
        rows.append(
            {
                "job_id": job.id,
                "status": s["status"] if s else "pending",
                "endpoint": job.endpoint,
                "model": job.model,
                "size": job.size,
                "prompt": job.prompt,
                "images": "|".join(str(p) for p in job.images),
                "image_path": s["image_path"] if s else None,
                "width": s["width"] if s else None,
                "height": s["height"] if s else None,
                "sha256": s["sha256"] if s else None,
                "attempts": m["attempts"] if m else 0,
                "cost_usd": (m["confirmed"] if m else 0) / MICRO,
                "possible_cost_usd": (m["possible"] if m else 0) / MICRO,
                "error": s["error"] if s and s["status"] != "succeeded" else None,
                "error_cause": s["error_cause"] if s and s["status"] != "succeeded" else None,
                # A failure that may clear (server error, timeout): the next run tries again.
                "retry_on_rerun": bool(s and s["status"] == "failed" and s["retryable"]),
            }
        )
    frame = pd.DataFrame(rows, columns=RESULTS_COLUMNS)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    return frame


def ledger_frame(store: Store) -> pd.DataFrame:
    rows = store.query(
        "SELECT job_id, attempt, endpoint, model, size, cost_micro_usd, state AS billing, "
        "input_tokens, output_tokens, total_tokens, finished_at FROM attempts "
        "WHERE state IN ('confirmed', 'possible') ORDER BY finished_at, job_id, attempt"
    )
    frame = pd.DataFrame([dict(r) for r in rows], columns=[*LEDGER_COLUMNS, "cost_micro_usd"])
    frame["cost_usd"] = frame["cost_micro_usd"] / MICRO
    for column in ("input_tokens", "output_tokens", "total_tokens"):
        frame[column] = frame[column].astype("Int64")
    return frame[LEDGER_COLUMNS]


def totals_of(results: pd.DataFrame, store: Store) -> Totals:
    counts = results["status"].value_counts()
    confirmed, possible = store.spend_micro_usd()
    return Totals(
        succeeded=int(counts.get("succeeded", 0)),
        failed=int(counts.get("failed", 0)),
        pending=int(counts.get("pending", 0)),
        confirmed_usd=confirmed / MICRO,
        possible_usd=possible / MICRO,
        failed_retry_on_rerun=int(results["retry_on_rerun"].sum()),
    )


def write_ledger(jobs: list[Job], store: Store) -> LedgerFiles:
    """Write results and ledger into the output folder; return their paths and the totals."""
    folder = store.folder
    results = results_frame(jobs, store)
    ledger = ledger_frame(store)
    files = LedgerFiles(
        folder / "results.parquet",
        folder / "results.csv",
        folder / "ledger.csv",
        totals_of(results, store),
    )
    _atomic(files.results_parquet, lambda p: results.to_parquet(p, index=False))
    _atomic(files.results_csv, lambda p: results.to_csv(p, index=False))
    _atomic(files.ledger_csv, lambda p: ledger.to_csv(p, index=False))
    return files


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{secrets.token_hex(4)}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
