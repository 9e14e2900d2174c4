"""The HTML report of an output folder: ``report.html`` and the thumbnail cache ``thumbs/``.

One self-contained page that opens offline: a summary (jobs by status, spend, wall time,
throughput, failures by cause), the failures with their errors, and a contact sheet with one card
per job, filtered and sorted by a small inline script (the state lives in the URL's hash, e.g.
``report.html#status=failed&sort=cost``; without JavaScript every card is shown). Thumbnails are
WebP files cached under ``thumbs/<job_id>-<first 12 of sha256>.webp`` and embedded as ``data:``
URIs; a Content-Security-Policy lets the page load nothing but them and its own script.

The checkpoint is only read, in one snapshot (:meth:`~runner.store.views.Views.report_snapshot`),
so the report can be made while a run is writing. Prompts and errors are untrusted text:
everything is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from PIL import Image

from runner.images.files import remove_temp_files, sha256_file, write_atomic
from runner.provider import MICRO, sniff_format
from runner.store.views import ReportJob, ReportSnapshot, Viewable

REPORT_NAME: Final = "report.html"
THUMBS_DIR: Final = "thumbs"
THUMB_MAX_PX: Final = 256
THUMB_QUALITY: Final = 70

_PROMPT_CHARS = 140
_THUMB_NAME = re.compile(r".+-[0-9a-f]{12}\.webp")
_THUMB_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_SCRIPT: Final = """
(() => {
  const sheet = document.getElementById("sheet"), cards = [...sheet.children];
  const buttons = [...document.querySelectorAll("#controls button")];
  const select = document.getElementById("sort"), shown = document.getElementById("shown");
  const rank = {failed: 0, pending: 1, succeeded: 2};
  const by = (key) => (a, b) => key(a) - key(b) || a.dataset.index - b.dataset.index;
  const sorts = {id: by(() => 0), status: by((c) => rank[c.dataset.status]),
                 cost: by((c) => -c.dataset.cost)};
  const state = () => {
    const h = new URLSearchParams(location.hash.slice(1)), status = h.get("status");
    return {status: Object.hasOwn(rank, status) ? status : "all",
            sort: Object.hasOwn(sorts, h.get("sort")) ? h.get("sort") : "id"};
  };
  const apply = () => {
    const s = state();
    let n = 0;
    for (const card of cards.slice().sort(sorts[s.sort])) {
      card.hidden = s.status !== "all" && card.dataset.status !== s.status;
      n += card.hidden ? 0 : 1;
      sheet.append(card);
    }
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.value === s.status));
    select.value = s.sort;
    shown.textContent = n + " of " + cards.length + " shown";
  };
  const go = (change) => {
    const s = Object.assign(state(), change);
    location.hash = "status=" + s.status + "&sort=" + s.sort;
  };
  for (const b of buttons) b.addEventListener("click", () => go({status: b.value}));
  select.addEventListener("change", () => go({sort: select.value}));
  addEventListener("hashchange", apply);
  document.getElementById("controls").hidden = false;
  apply();
})();
"""
_SCRIPT_SHA256: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'sha256-@@script_sha256@@'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>image-runner report: @@folder@@</title>
<style>
:root { --ok: #1a7f37; --bad: #cf222e; --wait: #9a6700; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; } [hidden] { display: none !important; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, sans-serif; color: #1f2328;
  background: #f6f8fa; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 17px; margin: 28px 0 10px; }
.sub, .tile span, #shown, .facts, .ph { color: var(--muted); }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 16px; }
.tile, table, .card, #controls button, #controls select { background: #fff;
  border: 1px solid var(--line); border-radius: 8px; }
.tile { padding: 10px 14px; flex: 1 1 auto; } .tile b { display: block; font-size: 24px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .wait { color: var(--wait); }
table { border-collapse: collapse; border-radius: 0; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px;
  border-bottom: 1px solid var(--line); } th { background: #eef1f4; }
td.error { font: 12px ui-monospace, monospace; max-width: 640px; overflow-wrap: anywhere; }
#controls { display: flex; gap: 6px; align-items: center; margin-bottom: 12px; flex-wrap: wrap; }
#controls button, #controls select { font: inherit; padding: 4px 12px; border-radius: 16px; }
#controls button[aria-pressed="true"] { background: #1f2328; color: #fff; }
#shown { margin-left: auto; }
#sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.card { overflow: hidden; display: flex; flex-direction: column; }
.card.s-failed { border-color: var(--bad); } .card.s-pending { border-color: #d4a72c; }
.thumb { height: 200px; display: flex; align-items: center; justify-content: center;
  background: #e9ecef; } .thumb img { max-width: 100%; max-height: 100%; }
.ph { text-align: center; padding: 12px; font-size: 13px; overflow-wrap: anywhere; }
.ph b { display: block; font-size: 16px; text-transform: uppercase; letter-spacing: .05em; }
.meta { padding: 8px 12px 10px; display: flex; flex-direction: column; gap: 3px; }
.badge { align-self: flex-start; font-size: 11px; font-weight: 600; padding: 1px 8px;
  border-radius: 10px; color: #fff; text-transform: uppercase; }
.b-succeeded { background: var(--ok); } .b-failed { background: var(--bad); }
.b-pending { background: var(--wait); }
.id { font: 600 13px ui-monospace, monospace; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.prompt { margin: 0; font-size: 13px; overflow: hidden; display: -webkit-box;
  -webkit-line-clamp: 3; -webkit-box-orient: vertical; }
.facts, .note { margin: 0; font-size: 12px; } .note { color: var(--bad); }
</style></head>
<body>
<header><h1>image-runner report</h1>
<div class="sub">@@folder_path@@ &middot; generated @@generated@@ UTC</div></header>
@@summary@@
<h2 id="failures">Failures</h2>
@@failures@@
<h2 id="contact-sheet">Contact sheet</h2>
<div id="controls" hidden>
<button type="button" value="all">all</button>
<button type="button" value="succeeded">succeeded</button>
<button type="button" value="failed">failed</button>
<button type="button" value="pending">pending</button>
<label>&nbsp;sort by <select id="sort"><option value="id">id</option>
<option value="status">status</option><option value="cost">cost</option></select></label>
<span id="shown"></span></div>
<div id="sheet">
@@cards@@
</div>
<script>@@script@@</script>
</body></html>
"""


def write_report(store: Viewable) -> Path:
    """Write ``<folder>/report.html`` (atomically) and the thumbnails it needs; return its path."""
    folder = store.folder
    snap = store.views().report_snapshot()
    thumbs = folder / THUMBS_DIR
    thumbs.mkdir(exist_ok=True)
    remove_temp_files(thumbs)
    kept: set[str] = set()
    # Decoding and shrinking images release the GIL: make the thumbnails on every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        cards = list(
            pool.map(lambda job: _card(job[0], job[1], folder, thumbs, kept), enumerate(snap.jobs))
        )
    unshown = sum(1 for _, shown in cards if not shown)
    for entry in thumbs.iterdir():
        if _THUMB_NAME.fullmatch(entry.name) and entry.name not in kept:
            entry.unlink(missing_ok=True)  # an older image's thumb, or a job no longer done
    fields = {
        "script_sha256": _SCRIPT_SHA256,
        "folder": _e(folder.name),
        "folder_path": _e(str(folder)),
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "summary": _summary_html(snap, unshown),
        "failures": _failures_html(snap.jobs),
        "cards": "\n".join(card for card, _ in cards),
        "script": _SCRIPT,
    }
    page = re.sub(r"@@(\w+)@@", lambda m: fields[m.group(1)], _PAGE)
    path = folder / REPORT_NAME
    write_atomic(path, page.encode())
    return path


def _seconds_between(start: str, end: str) -> float:
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return max(0.0, delta.total_seconds())


def _summary_html(snap: ReportSnapshot, unshown: int) -> str:
    counts = Counter(r.status for r in snap.jobs)  # a missing status counts 0
    causes = Counter(r.error_cause or "unknown" for r in snap.jobs if r.status == "failed")
    wall_s = sum(_seconds_between(run.started_at, run.ended_at) for run in snap.runs)
    per_s = counts["succeeded"] / wall_s if wall_s > 0 else 0.0
    tiles = [
        ("jobs", str(len(snap.jobs)), "jobs", ""),
        ("succeeded", str(counts["succeeded"]), "succeeded", "ok"),
        ("failed", str(counts["failed"]), "failed", "bad"),
        ("pending", str(counts["pending"]), "pending", "wait"),
        ("confirmed", _usd(snap.spend.confirmed_micro_usd), "spent, confirmed", ""),
        ("possible", _usd(snap.spend.possible_micro_usd), "possibly spent", ""),
        ("wall", _duration(wall_s), f"wall time, {len(snap.runs)} run(s)", ""),
        ("throughput", f"{per_s * 60:.1f}", f"images/min ({per_s:.2f}/s)", ""),
    ]
    html_tiles = "".join(
        f'<div class="tile" id="t-{key}"><b class="{cls}">{value}</b><span>{label}</span></div>'
        for key, value, label, cls in tiles
    )
    by_cause = sorted(causes.items(), key=lambda item: (-item[1], item[0]))
    listed = ", ".join(f"{_e(cause)}: {n}" for cause, n in by_cause) or "none"
    notes = f'<p>Failures by cause: <b id="causes">{listed}</b></p>'
    if counts["pending"]:
        notes += f'<p class="sub">{counts["pending"]} pending: run the manifest again.</p>'
    if unshown:
        notes += (
            f'<p class="note">{unshown} finished image(s) cannot be shown: see their cards.</p>'
        )
    return f'<section id="summary"><div class="tiles">{html_tiles}</div>{notes}</section>'


def _failures_html(jobs: list[ReportJob]) -> str:
    rows = [
        f'<tr><td><a href="#job-{_e(r.job_id)}">{_e(r.job_id)}</a></td>'
        f'<td>{_e(r.error_cause or "unknown")}</td><td class="error">{_e(r.error or "")}</td>'
        f"<td>{r.attempts}</td><td>{'next run' if r.retryable else 'no'}</td></tr>"
        for r in jobs
        if r.status == "failed"
    ]
    if not rows:
        return '<p class="sub">No failed jobs.</p>'
    head = "<tr><th>job</th><th>cause</th><th>error</th><th>attempts</th><th>retried</th></tr>"
    return f'<table id="failures-table">{head}{"".join(rows)}</table>'


def _card(
    index: int, row: ReportJob, folder: Path, thumbs: Path, kept: set[str]
) -> tuple[str, bool]:
    """The card of one job, and whether a succeeded job's image could be shown."""
    job_id, status = row.job_id, row.status
    cost_micro = row.confirmed_micro_usd + row.possible_micro_usd
    note = None
    if status == "succeeded":
        name, data, note = thumbnail(folder, thumbs, job_id, row.image_path, row.sha256)
        size = f"{row.width}&times;{row.height}"
    else:
        name, data = None, None
        size = f"asked {_e(row.size)}" if row.size else "provider's default size"
    if name is not None and data is not None:
        kept.add(name)
        uri = "data:image/webp;base64," + base64.b64encode(data).decode()
        picture = f'<img src="{uri}" alt="{_e(job_id)}">'
    else:
        last = row.last_error
        detail = {
            "succeeded": "no thumbnail",
            "failed": row.error_cause or "unknown cause",
            "pending": f"last try: {last}" if last else "not tried yet",
        }[status]
        picture = f'<div class="ph"><b>{status}</b>{_e(detail)}</div>'
    prompt = row.prompt
    short = prompt if len(prompt) <= _PROMPT_CHARS else prompt[: _PROMPT_CHARS - 1] + "\u2026"
    cost = _usd(row.confirmed_micro_usd)
    if row.possible_micro_usd:
        cost += f" + {_usd(row.possible_micro_usd)} possible"
    card = (
        f'<article class="card s-{status}" id="job-{_e(job_id)}" data-index="{index}" '
        f'data-status="{status}" data-cost="{cost_micro}">'
        f'<div class="thumb">{picture}</div><div class="meta">'
        f'<span class="badge b-{status}">{status}</span>'
        f'<span class="id" title="{_e(job_id)}">{_e(job_id)}</span>'
        f'<p class="prompt" title="{_e(prompt)}">{_e(short)}</p>'
        f'<p class="facts">{size} &middot; {cost} &middot; {row.attempts} attempt'
        f"{'s' * (row.attempts != 1)}</p>"
        + (f'<p class="note">{_e(note)}</p>' if note else "")
        + "</div></article>"
    )
    return card, status != "succeeded" or data is not None


def thumbnail(
    folder: Path, thumbs: Path, job_id: str, image_path: str | None, sha256: str | None
) -> tuple[str | None, bytes | None, str | None]:
    """(thumb file name, its WebP bytes, a note for the reader); the image is decoded only
    when no thumb of its recorded sha256 exists yet. The review app serves its thumbnails
    from here too, so both share one cache."""
    if not image_path:
        return None, None, "no image recorded"
    source = folder / image_path
    if not source.is_file():
        return None, None, f"image file missing: {image_path}"
    if sha256:
        cached = thumbs / f"{job_id}-{sha256[:12]}.webp"
        try:
            data = cached.read_bytes()
        except OSError:
            data = b""
        if sniff_format(data[:16]) == "webp":
            return cached.name, data, None
    try:
        digest = sha256_file(source)
        data = _make_thumb(source)
    except _THUMB_ERRORS as exc:
        return None, None, f"image unreadable: {image_path} ({exc})"
    name = f"{job_id}-{digest[:12]}.webp"
    write_atomic(thumbs / name, data, durable=False)  # a cache, checked when read
    note = None if digest == sha256 else "the image file changed since the run; rerun to redo it"
    return name, data, note


def _make_thumb(source: Path) -> bytes:
    with Image.open(source) as image:
        image.draft("RGB", (THUMB_MAX_PX, THUMB_MAX_PX))  # JPEG decodes at 1/2..1/8 scale
        alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        mode = "RGBA" if alpha else "RGB"
        # Palette images would be resized with nearest-neighbour: convert them first.
        small = image if image.mode == mode else image.convert(mode)
        small.thumbnail((THUMB_MAX_PX, THUMB_MAX_PX))
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=THUMB_QUALITY)
    return buffer.getvalue()


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
