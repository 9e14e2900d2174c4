"""What the review page is sent and what it may send: the JSON of a page of shots, of one shot
with its earlier versions, and the checks on a page's query and on a decision.

A shot's JSON holds what the page shows and nothing it does not: its reference images by file
name only (the page asks for them by index, ``/ref/<job_id>/<i>``; their paths stay on the
server), and its earlier versions (``versions``, oldest first) only when it has any, each with
why it was retired and how it was reviewed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Final, NamedTuple, get_args

from runner.jobs import JobStatus
from runner.store.base import REVIEW_STATES, ImageStat, ReviewState
from runner.store.views import ReviewItem, VersionRecord, Views

MAX_LIMIT: Final = 200
STATUSES: Final = frozenset(get_args(JobStatus))
REVIEWS: Final = frozenset(REVIEW_STATES)


@dataclass(frozen=True)
class ItemsQuery:
    """A page of shots: which (``None``: any status, any review) and where."""

    status: JobStatus | None
    review: ReviewState | None
    offset: int
    limit: int

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ItemsQuery:
        """From ``?status=&review=&offset=&limit=``; ``ValueError`` saying which is wrong."""
        status = query.get("status") or None
        review = query.get("review") or None
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r}: one of {', '.join(sorted(STATUSES))}")
        if review is not None and review not in REVIEWS:
            raise ValueError(f"review {review!r}: one of {', '.join(sorted(REVIEWS))}")
        offset = _whole(query, "offset", 0)
        limit = _whole(query, "limit", 50)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit {limit}: from 1 to {MAX_LIMIT}")
        return cls(status, review, offset, limit)  # type: ignore[arg-type]  # checked above


def _whole(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name) or str(default)
    if not text.isdigit():
        raise ValueError(f"{name} {text!r}: a whole number")
    return int(text)


def page(views: Views, query: ItemsQuery, folder_name: str) -> dict[str, Any]:
    """One page of shots, how many match in all, and the counts the filters show."""
    found = views.review_items(
        status=query.status, review=query.review, offset=query.offset, limit=query.limit
    )
    return {
        "folder": folder_name,
        "items": [item_json(views, item) for item in found.items],
        "total": found.total,
        "offset": query.offset,
        "counts": views.review_counts(),
    }


def item_json(views: Views, item: ReviewItem) -> dict[str, Any]:
    """One shot as the page shows it; its earlier versions are read only when it has some."""
    versions = views.job_versions(item.job_id) if item.version > 1 else []
    return {
        "job_id": item.job_id,
        "status": item.status,
        "prompt": item.prompt,
        "size": item.size,
        "model": item.model,
        "width": item.width,
        "height": item.height,
        "has_image": item.image_path is not None,
        "references": [PurePath(path).name for path in item.references],
        "version": item.version,
        "review": item.review,
        "reviewed_by": item.reviewed_by,
        "reviewed_at": item.reviewed_at,
        "edited": item.edited,
        "error": item.error,
        "error_cause": item.error_cause,
        "versions": [_version_json(v) for v in versions],
    }


def _version_json(record: VersionRecord) -> dict[str, Any]:
    return {
        "version": record.version,
        "reason": record.reason,
        "retired_at": record.retired_at,
        "has_image": record.image_path is not None,
        "width": record.width,
        "height": record.height,
        "review": record.review,
        "reviewed_by": record.reviewed_by,
    }


def parse_decision(body: object) -> tuple[str, ReviewState, int | None]:
    """``{job_id, decision, version}`` as the page posts it; ``ValueError`` saying what is
    wrong. ``version`` is the one the page showed, so that a shot regenerated meanwhile is
    not judged on an image the reviewer never saw."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object {job_id, decision, version}")
    job_id, decision, version = body.get("job_id"), body.get("decision"), body.get("version")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("job_id: the id of a job")
    if decision not in REVIEWS:
        raise ValueError(f"decision {decision!r}: one of {', '.join(sorted(REVIEWS))}")
    if version is not None and (type(version) is not int or version < 1):
        raise ValueError(f"version {version!r}: a whole number from 1")
    return job_id, decision, version


class RecordedImage(NamedTuple):
    path: str  # relative to the output folder
    sha256: str | None
    stat: ImageStat | None  # recorded with the current image (None for an earlier version)


def recorded_image(views: Views, job_id: str, version: str | None) -> RecordedImage | None:
    """The image the checkpoint records for ``job_id``: its current one, or an earlier
    ``version`` (digits, from the route); None when there is none."""
    if version is None:
        item = views.review_item(job_id)
        if item is None or item.status != "succeeded" or item.image_path is None:
            return None
        return RecordedImage(item.image_path, item.sha256, item.image_stat)
    for record in views.job_versions(job_id):
        if record.version == int(version) and record.image_path is not None:
            return RecordedImage(record.image_path, record.sha256, None)
    return None
