"""The HTML report of an output folder: ``report.html``, with its thumbnails under ``thumbs/``.

One page that opens offline from disk (to move it, copy ``thumbs/`` along, and ``images/`` for
the thumbnails' links to the full-size images): a summary (jobs by
status, spend, wall time, throughput, failures by cause), the failures with their errors (the
first :data:`FAILURES_LISTED`), and a contact sheet with one card per job, an edit's references
beside its output, shown a page at a time by the page's script (:mod:`runner.outputs.report_page`)
from the jobs' rows, embedded as JSON. Without JavaScript the summary and failures still show,
and a note says what the contact sheet needs.

It scales with the folder: the checkpoint is read in one snapshot
(:meth:`~runner.store.views.Views.report_snapshot`: the summary summed by the store, the jobs
streamed in id order), the jobs' thumbnails are found or made (:mod:`runner.outputs.thumbs`) by
a pool of threads a bounded window of chunks at a time, and their rows are spooled to an
unnamed temp file, then copied into the page, itself written to a temp file renamed onto
``report.html`` (fsynced, as :func:`~runner.images.files.write_atomic` does): memory does not
grow with the number of jobs. The checkpoint is only read, so the report can be made while a
run is writing. Prompts and errors are untrusted text: escaped in the HTML, and in the JSON
every ``<`` is ``\\u003c``, so no text can close its script element.

A run whose images are in object storage (:func:`put_report`) gets the same page, its links as
relative: the thumbnails are made from the images read from the store and kept under
``thumbs/`` there (:mod:`runner.outputs.location_thumbs`), the page is written in a local spool
folder and put as ``report.html``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Final, NamedTuple

from runner.images.files import atomic_file
from runner.outputs.report_page import HEAD, SCRIPT_SHA256, TAIL, CardRow
from runner.outputs.thumbs import ThumbCache, Thumbnails
from runner.provider import MICRO
from runner.storage import Location
from runner.store.views import ReportJob, ReportSummary, Viewable

REPORT_NAME: Final = "report.html"
FAILURES_LISTED: Final = 1000
_CHUNK_JOBS = 64  # a worker's task: few enough futures, small enough to keep every core busy
_CHUNKS_AHEAD = 4  # per worker: how far the pool may run ahead of the page being written
# The rows' spool written a megabyte at a time: each write to the file lets the thumbnails'
# threads take the GIL, and the writer waits for it back.
_ROWS_BUFFER_BYTES = 1 << 20
# One encoder for every row: json.dumps with options makes a new one a call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class _Card(NamedTuple):
    """A job's row for the page, and what the rest of the report needs to know of it."""

    row: CardRow
    thumbs: list[str]  # the thumb files it shows
    unshown: bool  # a succeeded job whose image cannot be shown


def write_report(store: Viewable) -> Path:
    """Write ``<folder>/report.html`` (atomically) and the thumbnails it needs; return its path."""
    folder = store.folder
    path = folder / REPORT_NAME
    thumbs = _write_page(store, path, lambda: Thumbnails(folder), folder.name, str(folder))
    thumbs.sweep()  # now that the page in place no longer shows the thumbs it leaves
    return path


def put_report(store: Viewable, location: Location, spool: Path) -> str:
    """The report of a run whose images are in ``location``, an object store: its thumbnails
    under ``thumbs/`` there (:mod:`~runner.outputs.location_thumbs`), the page written in the
    local folder ``spool``, then put as ``report.html`` beside ``images/`` (replaced whole),
    its links relative as in a folder's. Returns the page's URL."""
    from runner.outputs.location_thumbs import LocationThumbnails

    page = spool / REPORT_NAME
    title = location.url.rstrip("/").rpartition("/")[2]
    try:
        thumbs = _write_page(store, page, lambda: LocationThumbnails(location), title, location.url)
        location.put(REPORT_NAME, page)
    finally:
        page.unlink(missing_ok=True)
    thumbs.sweep()
    return f"{location.url}/{REPORT_NAME}"


def _write_page(
    store: Viewable, path: Path, open_thumbs: Callable[[], ThumbCache], title: str, where: str
) -> ThumbCache:
    """Write the page at ``path`` (atomically; its scratch files beside it) and find or make
    the thumbnails it shows in the cache ``open_thumbs`` opens; return that cache, for its
    sweep once the page is in its place."""
    failed: list[ReportJob] = []
    unshown = 0
    with (
        store.views().report_snapshot() as snap,
        tempfile.TemporaryFile(dir=path.parent, buffering=_ROWS_BUFFER_BYTES) as rows,
    ):
        thumbs = open_thumbs()  # once the checkpoint could be read
        rows.write(b"[")
        comma = b""
        for card, job in _cards(snap.jobs, thumbs):
            rows.write(comma + _json(card.row))
            comma = b",\n"
            unshown += card.unshown
            for name in card.thumbs:
                thumbs.keep(name)
            if job.status == "failed" and len(failed) < FAILURES_LISTED:
                failed.append(job)
        rows.write(b"]")
        fields = {
            "script_sha256": SCRIPT_SHA256,
            "folder": _e(title),
            "folder_path": _e(where),
            "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "summary": _summary_html(snap.summary, unshown),
            "failures": _failures_html(failed, snap.summary.failed),
            "jobs": f"{snap.summary.jobs:,}",
        }
        with atomic_file(path) as page:
            page.write(re.sub(r"@@(\w+)@@", lambda m: fields[m.group(1)], HEAD).encode())
            rows.seek(0)
            shutil.copyfileobj(rows, page)
            page.write(TAIL.encode())
    return thumbs


def _cards(jobs: Iterable[ReportJob], thumbs: ThumbCache) -> Iterator[tuple[_Card, ReportJob]]:
    """Each job's card, in the jobs' order, its thumbnails made by a pool of threads (decoding
    and shrinking release the GIL) a bounded number of chunks ahead."""
    workers = thumbs.threads
    pending: deque[tuple[list[ReportJob], Future[list[_Card]]]] = deque()
    it = iter(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            while len(pending) < workers * _CHUNKS_AHEAD:
                chunk = list(islice(it, _CHUNK_JOBS))
                if not chunk:
                    break
                pending.append((chunk, pool.submit(_cards_of, chunk, thumbs)))
            if not pending:
                return
            chunk, future = pending.popleft()
            yield from zip(future.result(), chunk, strict=True)


def _cards_of(jobs: list[ReportJob], thumbs: ThumbCache) -> list[_Card]:
    return [_card(job, thumbs) for job in jobs]


def _card(job: ReportJob, thumbs: ThumbCache) -> _Card:
    refs = [(thumbs.of_reference(path), Path(path).name) for path in job.references]
    names = [thumb.name for thumb, _ in refs if thumb.name]
    note = ""
    thumb = ""
    if job.status == "succeeded":
        made = thumbs.of_image(job.job_id, job.image_path, job.sha256, job.image_stat)
        thumb, note = made.name or "", made.note or ""
        names += [thumb] if thumb else []
        size = f"{job.width}\u00d7{job.height}"
    else:
        size = f"asked {job.size}" if job.size else "provider's default size"
    # What the placeholder says, by status: only the one needed is formatted.
    if job.status == "succeeded":
        detail = "no thumbnail"
    elif job.status == "failed":
        detail = job.error_cause or "unknown cause"
    else:
        detail = f"last try: {job.last_error}" if job.last_error else "not tried yet"
    row = CardRow(
        id=job.job_id,
        status=job.status,
        thumb=thumb,
        image=job.image_path or "",
        size=size,
        prompt=job.prompt,
        confirmed=job.confirmed_micro_usd,
        possible=job.possible_micro_usd,
        attempts=job.attempts,
        detail=detail,
        note=note,
        refs=[(t.name or "", label if t.name else t.note or label) for t, label in refs],
        version=job.version,
        review=job.review if job.status == "succeeded" else "",
        edited=job.edited,
    )
    return _Card(row, names, job.status == "succeeded" and not thumb)


def _json(row: CardRow) -> bytes:
    text = _ENCODER.encode(row)
    return text.replace("<", "\\u003c").encode()


def _seconds_between(start: str, end: str) -> float:
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return max(0.0, delta.total_seconds())


def _summary_html(summary: ReportSummary, unshown: int) -> str:
    wall_s = sum(_seconds_between(run.started_at, run.ended_at) for run in summary.runs)
    per_s = summary.succeeded / wall_s if wall_s > 0 else 0.0
    tiles = [
        ("jobs", str(summary.jobs), "jobs", ""),
        ("succeeded", str(summary.succeeded), "succeeded", "ok"),
        ("failed", str(summary.failed), "failed", "bad"),
        ("pending", str(summary.pending), "pending", "wait"),
        ("confirmed", _usd(summary.spend.confirmed_micro_usd), "spent, confirmed", ""),
        ("possible", _usd(summary.spend.possible_micro_usd), "possibly spent", ""),
        ("wall", _duration(wall_s), f"wall time, {len(summary.runs)} run(s)", ""),
        ("throughput", f"{per_s * 60:.1f}", f"images/min ({per_s:.2f}/s)", ""),
    ]
    html_tiles = "".join(
        f'<div class="tile" id="t-{key}"><b class="{cls}">{value}</b><span>{label}</span></div>'
        for key, value, label, cls in tiles
    )
    listed = ", ".join(f"{_e(cause)}: {n}" for cause, n in summary.failures) or "none"
    notes = f'<p>Failures by cause: <b id="causes">{listed}</b></p>'
    if summary.succeeded:
        reviewed = ", ".join(f"{n} {review}" for review, n in summary.reviews.items())
        notes += f'<p>Review of the finished images: <b id="reviews">{reviewed}</b></p>'
    if summary.pending:
        notes += f'<p class="sub">{summary.pending} pending: run the manifest again.</p>'
    if unshown:
        notes += (
            f'<p class="note">{unshown} finished image(s) cannot be shown: see their cards.</p>'
        )
    return f'<section id="summary"><div class="tiles">{html_tiles}</div>{notes}</section>'


def _failures_html(failed: list[ReportJob], total: int) -> str:
    if not failed:
        return '<p class="sub">No failed jobs.</p>'
    rows = "".join(
        f'<tr><td><a href="#status=failed&amp;job={_e(r.job_id)}">{_e(r.job_id)}</a></td>'
        f'<td>{_e(r.error_cause or "unknown")}</td><td class="error">{_e(r.error or "")}</td>'
        f"<td>{r.attempts}</td><td>{'next run' if r.retryable else 'no'}</td></tr>"
        for r in failed
    )
    head = "<tr><th>job</th><th>cause</th><th>error</th><th>attempts</th><th>retried</th></tr>"
    more = ""
    if total > len(failed):
        more = (
            f'<p class="sub" id="failures-more">The first {len(failed):,} of {total:,} failed '
            "jobs, by id; all of them are on the contact sheet, "
            '<a href="#status=failed">filtered to the failures</a>.</p>'
        )
    return f'{more}<table id="failures-table">{head}{rows}</table>'


def _usd(micro_usd: int) -> str:
    return f"${micro_usd / MICRO:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
