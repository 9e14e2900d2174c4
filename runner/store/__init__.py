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

from runner.errors import StoreError
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
    "stop_run",
]


def open_store(
    folder: Path | str,
    state_url: str | None = None,
    *,
    join: bool = False,
    budget: str | None = None,
    rpm: float | None = None,
) -> Store:
    """The state of ``folder`` for a run. Without ``state_url``: its SQLite checkpoint, locked
    for this process, created if need be, checked writable before anything is sent. With one
    (a PostgreSQL URL): the run of ``folder`` in that database, this process one of its
    workers; one that ``join``s a run (``image-runner work``) never creates it: a run nobody
    planned there (a mistyped ``--out``) is refused with a :class:`StoreError`. The planning
    run names the shared ``budget`` the run spends from (None: the run's own) and records its
    ``rpm`` as the ceiling of every worker (:meth:`Store.ceiling_rpm`); a joining worker's
    are the run's."""
    if state_url is not None:
        from runner.store.postgres import open_pg_store

        if join:
            return open_pg_store(state_url, folder, create=False)
        return open_pg_store(state_url, folder, budget=budget, rpm=rpm)
    return SqliteStore.open(_sqlite_folder(folder))


def open_read_only(folder: Path | str, state_url: str | None = None) -> Store:
    """The state of ``folder`` for the views, read while a run may be writing it."""
    if state_url is not None:
        from runner.store.postgres import open_pg_read_only

        return open_pg_read_only(state_url, folder)
    return SqliteStore.open_read_only(_sqlite_folder(folder))


def open_for_dry_run(folder: Path | str, state_url: str | None = None) -> Store:
    """The state of ``folder`` for a dry run: read, never changed, no lock taken."""
    if state_url is not None:
        from runner.store.postgres import open_pg_for_dry_run

        return open_pg_for_dry_run(state_url, folder)
    return SqliteStore.open_for_dry_run(_sqlite_folder(folder))


def open_review_log(folder: Path | str, state_url: str | None = None) -> ReviewLog:
    """Where review decisions on ``folder``'s images are written: no lock taken, so a run may
    be going on; the checkpoint (or the run in ``state_url``) must exist."""
    if state_url is not None:
        from runner.store.postgres import open_pg_review_log

        return open_pg_review_log(state_url, folder)
    return SqliteReviewLog(_sqlite_folder(folder))


def stop_run(folder: Path | str, state_url: str, reason: str) -> None:
    """Stop every worker of the run of ``folder`` whose state is in ``state_url``: each sees it
    within a few seconds and finishes what it has in flight."""
    from runner.store.postgres import stop_pg_run

    stop_pg_run(state_url, folder, reason)


def _sqlite_folder(folder: Path | str) -> Path:
    """The local folder whose SQLite checkpoint holds the state; an object store's URL has
    none (a string: see :func:`runner.core.options.out_location`), its state is shared."""
    if isinstance(folder, str):
        raise StoreError(
            f"{folder} is object storage: its state is in a shared PostgreSQL database; add "
            "--state postgresql://... as the run had it"
        )
    return folder
