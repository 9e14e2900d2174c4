"""The run's state, and the only home of SQL.

The core (plan, pool, the run's lifecycle) sees a :class:`Store`: the protocol of domain
operations in :mod:`runner.store.base` (plan jobs, claim work, begin an attempt, record its
outcome, settle what was left in flight), with its guarantees written there. Which backend
stands behind it is decided here, when a folder is opened: today the SQLite checkpoint in the
output folder (:mod:`runner.store.sqlite`, its schema and migrations in
:mod:`runner.store.schema`, its writes grouped by :mod:`runner.store.groupcommit`). Errors are
:class:`~runner.errors.StoreError` and :class:`~runner.errors.StoreWriteError`.
"""

from __future__ import annotations

from pathlib import Path

from runner.store.base import (
    AttemptState,
    Decision,
    ImageStat,
    JobRecord,
    Outcome,
    Review,
    ReviewLog,
    ReviewState,
    SavedImage,
    Store,
)
from runner.store.reviewlog import SqliteReviewLog
from runner.store.schema import check_writable
from runner.store.sqlite import SqliteStore

__all__ = [
    "AttemptState",
    "Decision",
    "ImageStat",
    "JobRecord",
    "Outcome",
    "Review",
    "ReviewLog",
    "ReviewState",
    "SavedImage",
    "SqliteStore",
    "Store",
    "check_writable",
    "open_for_dry_run",
    "open_read_only",
    "open_review_log",
    "open_store",
]


def open_store(folder: Path) -> Store:
    """The state of ``folder`` for a run: locked for this process, created if need be, checked
    writable before anything is sent."""
    return SqliteStore.open(folder)


def open_read_only(folder: Path) -> Store:
    """The state of ``folder`` for the views, read while a run may be writing it."""
    return SqliteStore.open_read_only(folder)


def open_for_dry_run(folder: Path) -> Store:
    """The state of ``folder`` for a dry run: read, never changed, no lock taken."""
    return SqliteStore.open_for_dry_run(folder)


def open_review_log(folder: Path) -> ReviewLog:
    """Where review decisions on ``folder``'s images are written: no lock taken, so a run may
    be going on; the checkpoint must exist."""
    return SqliteReviewLog(folder)
