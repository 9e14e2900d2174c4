"""The machine-readable summary of ``image-runner run``: what ``--json`` prints on stdout and
``--notify`` posts to a webhook, with the one line a chat channel shows.

Its keys are stable and documented in the README ("Nightly runs"): a script reads them without
knowing how the run went, so every key is always there, and what a run did not get to (the
counts after an invalid manifest, the results of a dry run) is ``null`` rather than missing.
Counts and spend are those of the CLI's human summary (:class:`runner.library.RunReport`).
Everything passes :func:`~runner.redact.redact` on its way out, as the human summary does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from runner.core.options import under
from runner.library import RunReport
from runner.redact import redact
from runner.words import plural

SUMMARY_KEYS: Final = {
    "exit_code": None,
    "error": None,
    "stop_reason": None,
    "dry_run": None,
    "counts": ("succeeded", "failed", "pending", "requests"),
    "versions": ("rejected_redone", "edited_kept", "edited_redone", "unreadable_redone"),
    "spend_usd": ("confirmed", "possible"),
    "paths": ("out", "images", "results", "ledger", "report"),
    "timings": ("started_at", "finished_at", "wall_s"),
}
"""The summary's keys; a nested object's keys after its name (the README's table, in order)."""


def run_summary(
    report: RunReport | None,
    out_dir: Path | str,
    *,
    started: datetime,
    finished: datetime,
    exit_code: int,
    dry_run: bool,
    error: str | None = None,
) -> dict[str, Any]:
    """The summary of a run into ``out_dir``: of ``report`` when there is one, else of a run
    refused before it began (an invalid manifest, a folder in use), which ``error`` says."""
    books = report.details.ledger if report is not None and not dry_run else None
    cancelled = report is not None and report.details.cancelled
    return {
        "exit_code": exit_code,
        "error": error,
        "stop_reason": report.stop_reason if report else None,
        "dry_run": dry_run,
        "counts": None
        if report is None
        else {
            "succeeded": report.succeeded,
            "failed": report.failed,
            "pending": report.pending,
            "requests": report.requests,
        },
        "versions": None
        if report is None
        else {
            "rejected_redone": report.rejected_redone,
            "edited_kept": report.edited_kept,
            "edited_redone": report.edited_redone,
            "unreadable_redone": report.unreadable_redone,
        },
        "spend_usd": None
        if report is None
        else {
            "confirmed": round(report.confirmed_usd, 6),
            "possible": round(report.possible_usd, 6),
        },
        "paths": {
            "out": str(out_dir),
            "images": None if report is None or dry_run else under(out_dir, "images"),
            "results": str(books.results_parquet) if books else None,
            "ledger": str(books.ledger_csv) if books else None,
            "report": under(out_dir, "report.html") if books and not cancelled else None,
        },
        "timings": {
            "started_at": _utc(started),
            "finished_at": _utc(finished),
            "wall_s": round(report.wall_s if report else (finished - started).total_seconds(), 3),
        },
    }


def summary_json(summary: dict[str, Any]) -> str:
    """The summary as one JSON document on one line, the key masked."""
    return redact(json.dumps(summary))


def summary_line(summary: dict[str, Any]) -> str:
    """The summary in one line for people, the ``text`` a Slack-compatible webhook shows:
    ``image-runner: output/nightly-2026-11-29: 3 succeeded, 0 failed, 0 pending; $0.09
    confirmed + $0.00 possible; exit 0``."""
    parts = [f"image-runner: {summary['paths']['out']}"]
    counts, spend = summary["counts"], summary["spend_usd"]
    if summary["dry_run"]:
        parts[0] += " (dry run)"
    if counts is not None:
        parts.append(
            f"{counts['succeeded']} succeeded, {counts['failed']} failed, "
            f"{counts['pending']} pending, {plural(counts['requests'], 'request')}"
        )
    if spend is not None:
        parts.append(f"${spend['confirmed']:.2f} confirmed + ${spend['possible']:.2f} possible")
    if summary["stop_reason"]:
        parts.append(f"stopped: {summary['stop_reason']}")
    if summary["error"]:
        parts.append(summary["error"].strip().splitlines()[0])
    parts.append(f"exit {summary['exit_code']}")
    return redact(": ".join(parts[:2]) + "".join(f"; {part}" for part in parts[2:]))


def _utc(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
