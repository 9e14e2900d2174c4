"""Decisions taken without the page: ``image-runner review OUT --approve ID... --reject ID...``.

A script's list is checked whole before anything is written: an unknown id, one that has no
image to judge, or one both approved and rejected refuses the lot, so that a typo never leaves
half a batch decided. Who decided is ``--reviewer``, else the user the process runs as.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence

from runner.errors import ReviewError
from runner.store.base import Review, ReviewLog, ReviewState


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
    """Approve ``approve`` and reject ``reject`` (each at its current version), in that
    order, once every id is checked; :class:`~runner.errors.ReviewError` naming every id that
    cannot be, and then nothing is written."""
    both = sorted(set(approve) & set(reject))
    problems = [f"{job_id}: both approved and rejected; say which" for job_id in both]
    views = log.views()
    for job_id in dict.fromkeys([*approve, *reject]):
        if job_id in both:
            continue
        item = views.review_item(job_id)
        if item is None:
            problems.append(f"{job_id}: no such job in {log.folder}")
        elif item.status != "succeeded":
            problems.append(f"{job_id}: {item.status}, so there is no image to review yet")
    if problems:
        lines = "\n".join(f"  {problem}" for problem in problems)
        raise ReviewError(f"nothing was decided:\n{lines}")
    decisions: list[tuple[str, ReviewState]] = [
        *((job_id, "approved") for job_id in dict.fromkeys(approve)),
        *((job_id, "rejected") for job_id in dict.fromkeys(reject)),
    ]
    return [log.decide(job_id, decision, reviewer) for job_id, decision in decisions]
