"""The fixed parts of ``report.html``: its style, its script, and the HTML around the figures.

The page is written by :mod:`runner.outputs.report` in three parts: :data:`HEAD` (its
``@@name@@`` fields filled in), the jobs' rows as JSON (each a :class:`CardRow`, an array), and
:data:`TAIL`, which holds the script. The script reads the rows and shows one page of
cards at a time, so that a folder of 100,000 jobs opens as fast as one of a hundred: the
browser holds the rows, a few megabytes, and only ever lays out :data:`CARDS_PER_PAGE` cards.
Filters (status, and review of the finished images), sort and page live in the URL's hash
(``report.html#status=failed&sort=cost&page=2``, ``#review=rejected``;
``&job=ID`` opens the page with that job's card and scrolls to it). Cards are built with
``textContent``, never markup, so prompts and errors cannot inject any.

The Content-Security-Policy allows the page's own script (by its hash) and images from
``'self'``: for a page opened from disk Chromium takes that as local files, so the thumbnails
under ``thumbs/`` show while ``data:`` and every network URL are refused.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final, NamedTuple

CARDS_PER_PAGE: Final = 120
PROMPT_CHARS: Final = 140


class CardRow(NamedTuple):
    """A job's row in the page's JSON: an array of these fields in this order (the script
    names them the same, in capitals)."""

    id: str
    status: str
    thumb: str  # its file name under thumbs/; "" for none
    image: str  # the image, relative to the folder, for the thumb's link
    size: str  # as made ("1280x720"), or as asked
    prompt: str
    confirmed: int  # micro-dollars
    possible: int
    attempts: int
    detail: str  # what the placeholder of a card without a thumb says
    note: str  # what went wrong with the image, if anything
    refs: list[tuple[str, str]]  # an edit's references: (thumb name or "", what to call it)
    version: int  # of the image shown (or, pending, of the one to make)
    review: str  # approved, rejected or unreviewed: of a succeeded job's image; "" otherwise
    edited: bool  # the image was edited by hand since it was made, and kept


SCRIPT: Final = (
    """
(() => {
  const $ = (id) => document.getElementById(id);
  const rows = JSON.parse($("jobs").textContent);
  const [@@fields@@] = [...Array(@@field_count@@).keys()];
  const PER_PAGE = @@per_page@@, PROMPT_CHARS = @@prompt_chars@@;
  const sheet = $("sheet"), select = $("sort"), shown = $("shown");
  const buttons = [...document.querySelectorAll("#controls button[name]")];
  const rank = {failed: 0, pending: 1, succeeded: 2};
  const reviews = {approved: 0, rejected: 1, unreviewed: 2};
  const cost = (i) => rows[i][CONFIRMED] + rows[i][POSSIBLE];
  const sorts = {id: null,
                 status: (a, b) => rank[rows[a][STATUS]] - rank[rows[b][STATUS]] || a - b,
                 cost: (a, b) => cost(b) - cost(a) || a - b};
  const state = () => {
    const h = new URLSearchParams(location.hash.slice(1));
    const status = h.get("status"), review = h.get("review"), sort = h.get("sort");
    return {status: Object.hasOwn(rank, status) ? status : "all",
            review: Object.hasOwn(reviews, review) ? review : "all",
            sort: Object.hasOwn(sorts, sort) ? sort : "id",
            page: Math.max(1, parseInt(h.get("page"), 10) || 1), job: h.get("job")};
  };
  let memo = {key: null, order: []};
  const order = (s) => {
    const key = [s.status, s.review, s.sort].join(" ");
    if (memo.key !== key) {
      const picked = [];
      for (let i = 0; i < rows.length; i++) {
        // Only a finished image is reviewed: a review filter picks succeeded jobs.
        if ((s.status === "all" || rows[i][STATUS] === s.status)
            && (s.review === "all" || rows[i][REVIEW] === s.review)) picked.push(i);
      }
      if (sorts[s.sort]) picked.sort(sorts[s.sort]);
      memo = {key, order: picked};
    }
    return memo.order;
  };
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const img = (name, alt) => {
    const i = el("img");
    i.loading = "lazy";
    i.alt = alt;
    i.src = "thumbs/" + name;
    return i;
  };
  const usd = (micro) => "$" + (micro / 1e6).toFixed(2);
  const card = (i) => {
    const r = rows[i], status = r[STATUS], c = el("article", "card s-" + status);
    c.id = "job-" + r[ID];
    c.dataset.status = status;
    const pic = el("div", "thumb");
    if (r[REFS].length) {
      pic.classList.add("edit");
      const refs = el("div", "refs");
      for (const [name, label] of r[REFS]) {
        const ref = name ? img(name, label) : el("span", "ph", label);
        ref.title = name ? "reference: " + label : label;
        refs.append(ref);
      }
      pic.append(refs);
    }
    if (r[THUMB]) {
      const link = el("a", "out");
      link.href = r[IMAGE];
      link.append(img(r[THUMB], r[ID]));
      pic.append(link);
    } else {
      const ph = el("div", "ph out");
      ph.append(el("b", "", status), r[DETAIL]);
      pic.append(ph);
    }
    const id = el("span", "id", r[ID]), text = r[PROMPT];
    id.title = r[ID];
    const prompt = el("p", "prompt", text.length <= PROMPT_CHARS ? text
                      : text.slice(0, PROMPT_CHARS - 1) + "\\u2026");
    prompt.title = text;
    let spent = usd(r[CONFIRMED]);
    if (r[POSSIBLE]) spent += " + " + usd(r[POSSIBLE]) + " possible";
    const tries = r[ATTEMPTS] + " attempt" + (r[ATTEMPTS] === 1 ? "" : "s");
    const facts = [r[SIZE], spent, tries];
    if (r[VERSION] > 1) facts.push("version " + r[VERSION]);
    if (r[EDITED]) facts.push("edited by hand");
    const badges = el("div", "badges");
    badges.append(el("span", "badge b-" + status, status));
    if (r[REVIEW] && r[REVIEW] !== "unreviewed") {
      badges.append(el("span", "badge r-" + r[REVIEW], r[REVIEW]));
    }
    const meta = el("div", "meta");
    meta.append(badges, id, prompt, el("p", "facts", facts.join(" \\u00b7 ")));
    if (r[NOTE]) meta.append(el("p", "note", r[NOTE]));
    c.append(pic, meta);
    return c;
  };
  let current = 1;
  const apply = () => {
    const s = state(), picked = order(s);
    const pages = Math.max(1, Math.ceil(picked.length / PER_PAGE));
    const at = s.job === null ? -1 : picked.findIndex((i) => rows[i][ID] === s.job);
    current = at >= 0 ? Math.floor(at / PER_PAGE) + 1 : Math.min(s.page, pages);
    const first = (current - 1) * PER_PAGE;
    sheet.replaceChildren(...picked.slice(first, first + PER_PAGE).map(card));
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.value === s[b.name]));
    select.value = s.sort;
    shown.textContent = picked.length + " of " + rows.length + " shown";
    for (const pager of document.querySelectorAll(".pager")) {
      pager.hidden = pages === 1;
      pager.querySelector(".page").textContent = "page " + current + " of " + pages;
      pager.querySelector(".prev").disabled = current <= 1;
      pager.querySelector(".next").disabled = current >= pages;
    }
    if (at >= 0) {
      const target = sheet.children[at - first];
      target.classList.add("target");
      target.scrollIntoView({block: "center"});
    }
  };
  const go = (change) => {
    const s = Object.assign(state(), {page: 1}, change);
    const review = s.review === "all" ? "" : "&review=" + s.review;
    location.hash = "status=" + s.status + review + "&sort=" + s.sort + "&page=" + s.page;
  };
  for (const b of buttons) b.addEventListener("click", () => go({[b.name]: b.value}));
  select.addEventListener("change", () => go({sort: select.value}));
  for (const pager of document.querySelectorAll(".pager")) {
    for (const [button, step] of [[".prev", -1], [".next", 1]]) {
      pager.querySelector(button).addEventListener("click", () => {
        go({page: current + step});
        scrollTo(0, $("contact-sheet").offsetTop);
      });
    }
  }
  addEventListener("hashchange", apply);
  $("needs-js").remove();
  $("controls").hidden = false;
  apply();
})();
""".replace("@@fields@@", ", ".join(name.upper() for name in CardRow._fields))
    .replace("@@field_count@@", str(len(CardRow._fields)))
    .replace("@@per_page@@", str(CARDS_PER_PAGE))
    .replace("@@prompt_chars@@", str(PROMPT_CHARS))
)
SCRIPT_SHA256: Final = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()

_PAGER: Final = """<nav class="pager" hidden><button type="button" class="prev">&larr; previous\
</button><span class="page"></span><button type="button" class="next">next &rarr;</button></nav>"""

HEAD: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; \
style-src 'unsafe-inline'; script-src 'sha256-@@script_sha256@@'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>image-runner report: @@folder@@</title>
<style>
:root { --ok: #1a7f37; --bad: #cf222e; --wait: #9a6700; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; } [hidden] { display: none !important; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, sans-serif; color: #1f2328;
  background: #f6f8fa; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 17px; margin: 28px 0 10px; }
.sub, .tile span, #shown, .facts, .ph, .page { color: var(--muted); }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 16px; }
.tile, table, .card, #controls button, #controls select, .pager button { background: #fff;
  border: 1px solid var(--line); border-radius: 8px; }
.tile { padding: 10px 14px; flex: 1 1 auto; } .tile b { display: block; font-size: 24px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .wait { color: var(--wait); }
table { border-collapse: collapse; border-radius: 0; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px;
  border-bottom: 1px solid var(--line); } th { background: #eef1f4; }
td.error { font: 12px ui-monospace, monospace; max-width: 640px; overflow-wrap: anywhere; }
#controls, .pager { display: flex; gap: 6px; align-items: center; margin-bottom: 12px;
  flex-wrap: wrap; }
#controls button, #controls select, .pager button { font: inherit; padding: 4px 12px;
  border-radius: 16px; }
#controls button[aria-pressed="true"] { background: #1f2328; color: #fff; }
#shown { margin-left: auto; } .pager { margin: 12px 0; justify-content: center; }
#sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.card { overflow: hidden; display: flex; flex-direction: column; }
.card.s-failed { border-color: var(--bad); } .card.s-pending { border-color: #d4a72c; }
.card.target { outline: 3px solid #0969da; }
.thumb { height: 200px; display: flex; align-items: center; justify-content: center; gap: 4px;
  background: #e9ecef; } .thumb img { max-width: 100%; max-height: 100%; }
.thumb .out { flex: 1 1 0; min-width: 0; height: 100%; display: flex; flex-direction: column;
  align-items: center; justify-content: center; }
.refs { flex: 0 0 64px; display: flex; flex-direction: column; gap: 4px; padding: 4px;
  max-height: 100%; overflow: hidden; border-right: 2px dashed var(--line); }
.refs img, .refs .ph { max-height: 60px; padding: 0; font-size: 10px; }
.ph { text-align: center; padding: 12px; font-size: 13px; overflow-wrap: anywhere; }
.ph b { display: block; font-size: 16px; text-transform: uppercase; letter-spacing: .05em; }
.meta { padding: 8px 12px 10px; display: flex; flex-direction: column; gap: 3px; }
.badge { align-self: flex-start; font-size: 11px; font-weight: 600; padding: 1px 8px;
  border-radius: 10px; color: #fff; text-transform: uppercase; }
.b-succeeded { background: var(--ok); } .b-failed { background: var(--bad); }
.b-pending { background: var(--wait); } .r-approved { background: #0969da; }
.r-rejected { background: #6e7781; } .badges { display: flex; gap: 4px; }
.sep { width: 12px; }
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
<p id="needs-js" class="note">The contact sheet of the @@jobs@@ job(s) needs JavaScript: allow \
it for this page (the summary and failures above show without it).</p>
<div id="controls" hidden>
<button type="button" name="status" value="all">all</button>
<button type="button" name="status" value="succeeded">succeeded</button>
<button type="button" name="status" value="failed">failed</button>
<button type="button" name="status" value="pending">pending</button>
<span class="sep"></span>
<button type="button" name="review" value="all">any review</button>
<button type="button" name="review" value="approved">approved</button>
<button type="button" name="review" value="rejected">rejected</button>
<button type="button" name="review" value="unreviewed">unreviewed</button>
<label>&nbsp;sort by <select id="sort"><option value="id">id</option>
<option value="status">status</option><option value="cost">cost</option></select></label>
<span id="shown"></span></div>
@@pager@@
<div id="sheet"></div>
@@pager@@
<script type="application/json" id="jobs">""".replace("@@pager@@", _PAGER)

TAIL: Final = f"""</script>
<script>{SCRIPT}</script>
</body></html>
"""
