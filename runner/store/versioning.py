"""The SQL of a job's image versions in a SQLite checkpoint, for :class:`~.sqlite.SqliteStore`.

A job's image is its version (``jobs.version``); when a new image of the job is to take its
place (the old one rejected in review, edited by hand, of a changed manifest entry, or gone),
the old one becomes a ``versions`` row, kept with where its file went, and the job moves on to
the next version. Each function writes inside the caller's transaction (``SqliteStore.batch``),
so that a version is retired whole or not at all; the files are the planner's to move, once
this is durable (:mod:`runner.core.versions`).
"""

from __future__ import annotations

import sqlite3

from runner.store.base import ImageStat, KeptVersion, RetireReason

_KEEP_CURRENT = (
    "INSERT INTO versions (job_id, version, image_path, sha256, width, height, reason, "
    "retired_at) SELECT job_id, version, ?, sha256, width, height, ?, ? "
    "FROM jobs WHERE job_id = ? AND status = 'succeeded'"
)


def retire(
    db: sqlite3.Connection, job_id: str, reason: RetireReason, moved_to: str | None, stamp: str
) -> None:
    """The succeeded job's image becomes an earlier version at ``moved_to``; the job is pending
    at the next version, its image and ``edited_at`` forgotten (its attempts stay)."""
    db.execute(_KEEP_CURRENT, (moved_to, reason, stamp, job_id))
    db.execute(
        "UPDATE jobs SET status = 'pending', version = version + 1, image_path = NULL, "
        "sha256 = NULL, width = NULL, height = NULL, image_size_bytes = NULL, "
        "image_mtime_ns = NULL, image_ctime_ns = NULL, edited_at = NULL, updated_at = ? "
        "WHERE job_id = ? AND status = 'succeeded'",
        (stamp, job_id),
    )


def record_edit(
    db: sqlite3.Connection,
    job_id: str,
    sha256: str,
    stat: ImageStat,
    size: tuple[int, int] | None,
    stamp: str,
) -> None:
    """The succeeded job's image, edited by hand in place, is its next version: the generated
    image's sha256 and size stay as an earlier version without a file (the edit overwrote it).
    ``size`` None (the edit does not decode) keeps the size recorded."""
    width, height = size or (None, None)
    db.execute(_KEEP_CURRENT, (None, "edited", stamp, job_id))
    db.execute(
        "UPDATE jobs SET version = version + 1, sha256 = ?, width = COALESCE(?, width), "
        "height = COALESCE(?, height), image_size_bytes = ?, image_mtime_ns = ?, "
        "image_ctime_ns = ?, edited_at = ?, updated_at = ? "
        "WHERE job_id = ? AND status = 'succeeded'",
        (sha256, width, height, *stat, stamp, stamp, job_id),
    )


def kept_versions(db: sqlite3.Connection, job_id: str) -> list[KeptVersion]:
    """The earlier images of ``job_id`` recorded with a file, oldest first."""
    rows = db.execute(
        "SELECT version, image_path, sha256 FROM versions "
        "WHERE job_id = ? AND image_path IS NOT NULL ORDER BY version",
        (job_id,),
    ).fetchall()
    return [KeptVersion(*row) for row in rows]
