"""The SQL of a job's image versions, for both backends (:class:`~.sqlite.SqliteStore`, and
:class:`~.postgres.store.PostgresStore` through its ``search_path`` and placeholder
translation): one home for each statement.

A job's image is its version (``jobs.version``); when a new image of the job is to take its
place (the old one rejected in review, edited by hand, of a changed manifest entry, gone, or
a file in its place that does not decode), the old one becomes a ``versions`` row, kept with
where its file went, and the job moves on to the next version. Each function writes inside the
caller's transaction (``SqliteStore.batch``), so that a version is retired whole or not at all;
the files are the planner's to move, once this is durable, and to record as moved once they
are (:mod:`runner.core.versions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from runner.store.base import ImageStat, KeptVersion, RetireReason


class Rows(Protocol):
    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """A connection taking SQLite's placeholders: :mod:`sqlite3`'s, or PostgreSQL's through
    :class:`runner.store.postgres.connect.Translated`."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> object: ...


# The job's current image as an earlier version at :moved_to; :found, when given, is the sha256
# of a file that took the image's place and does not decode (its size in pixels unknown).
_KEEP_CURRENT = (
    "INSERT INTO versions (job_id, version, image_path, sha256, width, height, reason, "
    "retired_at, moved) SELECT job_id, version, CAST(:moved_to AS TEXT), "
    "COALESCE(:found, sha256), CASE WHEN :found IS NULL THEN width END, "
    "CASE WHEN :found IS NULL THEN height END, :reason, :stamp, "
    "CASE WHEN :moved_to IS NULL THEN 1 ELSE 0 END "
    "FROM jobs WHERE job_id = :job_id AND status = 'succeeded'"
)


def retire(
    db: Db,
    job_id: str,
    reason: RetireReason,
    moved_to: str | None,
    stamp: str,
    found_sha256: str | None = None,
) -> None:
    """The succeeded job's image becomes an earlier version at ``moved_to`` (its move not done
    yet: see :func:`mark_moved`); the job is pending at the next version, its image and
    ``edited_at`` forgotten (its attempts stay). ``found_sha256``: that of the file found in
    the image's place, recorded instead when it is not the image (it does not decode)."""
    keep = {"moved_to": moved_to, "found": found_sha256, "reason": reason, "stamp": stamp}
    db.execute(_KEEP_CURRENT, {**keep, "job_id": job_id})
    db.execute(
        "UPDATE jobs SET status = 'pending', version = version + 1, image_path = NULL, "
        "sha256 = NULL, width = NULL, height = NULL, image_size_bytes = NULL, "
        "image_mtime_ns = NULL, image_ctime_ns = NULL, edited_at = NULL, updated_at = ? "
        "WHERE job_id = ? AND status = 'succeeded'",
        (stamp, job_id),
    )


def record_edit(
    db: Db,
    job_id: str,
    sha256: str,
    stat: ImageStat,
    size: tuple[int, int],
    stamp: str,
) -> None:
    """The succeeded job's image, edited by hand in place, is its next version: the generated
    image's sha256 and size stay as an earlier version without a file (the edit overwrote it)."""
    keep = {"moved_to": None, "found": None, "reason": "edited", "stamp": stamp}
    db.execute(_KEEP_CURRENT, {**keep, "job_id": job_id})
    db.execute(
        "UPDATE jobs SET version = version + 1, sha256 = ?, width = ?, height = ?, "
        "image_size_bytes = ?, image_mtime_ns = ?, image_ctime_ns = ?, edited_at = ?, "
        "updated_at = ? WHERE job_id = ? AND status = 'succeeded'",
        (sha256, *size, *stat, stamp, stamp, job_id),
    )


def unmoved_versions(db: Db) -> list[KeptVersion]:
    """The earlier images recorded as going to a file whose move is not recorded as done."""
    rows = db.execute(
        "SELECT job_id, version, image_path, sha256 FROM versions "
        "WHERE moved = 0 AND image_path IS NOT NULL ORDER BY job_id, version"
    ).fetchall()
    return [KeptVersion(*row) for row in rows]


def mark_moved(db: Db, versions: Sequence[tuple[str, int]]) -> None:
    """Record the files of ``versions`` ((job id, version) pairs) as where they were to go,
    or as past moving there."""
    db.executemany("UPDATE versions SET moved = 1 WHERE job_id = ? AND version = ?", versions)
