"""Decisions taken without the page: ``image-runner review OUT --approve ID... --reject ID...``.

A script's list is recorded whole or not at all (the review log checks every id first): an
unknown id, one with no image to judge, or one both approved and rejected refuses the lot, so
that a typo never leaves half a batch decided. Who decided is ``--reviewer``, else the user the
process runs as.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence

from runner.errors import ReviewError
from runner.store.base import Decision, Review, ReviewLog


def reviewer_name(given: str | None) -> str:
    """``given``, else the login name of the process's user (``unknown`` if it has none)."""
    if given:
        return given
    try:
        return getpass.getuser()
    except OSError:  # no USER, LOGNAME, ... and no passwd entry: a bare container
        return "unknown"


def decide_ids(
    log: ReviewLog, approve: Sequence[str], reject: Sequence[str], reviewer: str
) -> list[Review]:
    """Approve ``approve`` and reject ``reject`` (each at its current version), all or none:
    :class:`~runner.errors.ReviewError` naming the ids in both lists, else every id the log
    refuses (unknown, not succeeded), and then nothing is written."""
    both = sorted(set(approve) & set(reject))
    if both:
        lines = "\n".join(f"  {job_id}: both approved and rejected; say which" for job_id in both)
        raise ReviewError(f"{log.folder}: nothing was recorded:\n{lines}")
    decisions = [
        *(Decision(job_id, "approved") for job_id in dict.fromkeys(approve)),
        *(Decision(job_id, "rejected") for job_id in dict.fromkeys(reject)),
    ]
    return log.decide(decisions, reviewer)
