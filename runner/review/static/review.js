// The review page: a grid of shots, a page at a time from /api/items, each with its reference
// images and earlier versions beside it; approve / reject by button or key, written at once
// through /api/review, and undone (u) by writing back the state the shot had before.
//
// Where the reviewer is (filters, page, selected shot) lives in the URL's hash, so a reload
// comes back to the same shot; decisions live on the server, so a reload shows them. Every
// piece of text from the checkpoint is put in the page as text (textContent, attributes),
// never as HTML.
//
// The token of the page's own URL is kept in memory and sent with every request: in a header
// to the API, as ?token= on the images (an <img> sends no header). There is no cookie: the
// browser would send a cookie of 127.0.0.1 to every port of the machine.
"use strict";
(() => {
  const LIMIT = 48;
  const TOKEN = new URLSearchParams(location.search).get("token") || "";
  const HEADERS = {"X-Review-Token": TOKEN, "Content-Type": "application/json"};
  const $ = (id) => document.getElementById(id);
  const grid = $("grid"), message = $("message"), viewer = $("viewer");
  const enc = encodeURIComponent;
  let items = [];  // the shots of this page, as the server last sent them
  let total = 0;  // shots matching the filters, all pages
  let selected = -1;
  let viewing = -1;  // the shot shown full size, or -1
  let focusLast = false;  // after paging back: select the page's last shot
  let loads = 0;
  const undo = [];  // decisions taken in this page: {jobId, version, previous}
  let queue = Promise.resolve();  // decisions are sent one at a time, in the order taken

  function state() {
    const h = new URLSearchParams(location.hash.slice(1));
    const offset = Math.max(0, parseInt(h.get("offset") || "0", 10) || 0);
    return {status: h.get("status") || "", review: h.get("review") || "", offset,
            job: h.get("job") || ""};
  }

  function hashOf(s) {
    const h = new URLSearchParams();
    for (const key of ["status", "review", "offset", "job"]) if (s[key]) h.set(key, s[key]);
    return "#" + h.toString();
  }

  function go(change) {  // another page or filter: the hashchange loads it
    const hash = hashOf(Object.assign(state(), change));
    if (hash === location.hash) load(); else location.hash = hash;
  }

  function say(text, bad = false) {
    message.textContent = text;
    message.className = bad ? "bad" : "";
  }

  async function api(path, init = {}) {
    const response = await fetch(path, Object.assign(
      {credentials: "omit", headers: HEADERS, cache: "no-store"}, init));
    let body = null;
    try { body = await response.json(); } catch (error) { body = null; }
    if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
    return body;
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === null || value === undefined) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    node.append(...children);
    return node;
  }

  const signed = (path, query = {}) =>
    path + "?" + new URLSearchParams(Object.assign({}, query, {token: TOKEN}));
  const jobPath = (kind, item, version) =>
    `/${kind}/${enc(item.job_id)}` + (version ? `/v${version}` : "");
  const imageUrl = (item, version) => signed(jobPath("image", item, version));
  const thumbUrl = (item, version) =>
    signed(jobPath("thumb", item, version), {v: version || item.version});
  const refUrl = (item, i) => signed(`/ref/${enc(item.job_id)}/${i}`);  // full size: the viewer
  const refThumbUrl = (item, i) => signed(`/refthumb/${enc(item.job_id)}/${i}`);  // the grid
  const when = (iso) => (iso || "").slice(0, 16).replace("T", " ") + " UTC";
  // Why it was retired, and its review when that says more ("v1: changed · approved").
  const versionCaption = (v) => `v${v.version}: ${v.reason}` +
    (v.review === "unreviewed" || v.review === v.reason ? "" : ` · ${v.review}`);
  const currentCaption = (item) =>
    `v${item.version}` + (item.versions.length ? " (current)" : "") + ` · ${item.review}`;

  function figure(cls, src, alt, caption, index) {
    const img = el("img", {src, alt, loading: "lazy", decoding: "async"});
    img.addEventListener("click", (event) => { event.stopPropagation(); openViewer(index); });
    return el("figure", {class: cls}, [img, el("figcaption", {text: caption})]);
  }

  function shots(item, index) {
    const list = item.references.map((name, i) => figure(
      "ref", refThumbUrl(item, i), `reference ${i + 1} of ${item.job_id}`, `ref ${i + 1}: ${name}`,
      index));
    for (const v of item.versions) {
      list.push(v.has_image
        ? figure("old", thumbUrl(item, v.version), `${item.job_id} v${v.version}`,
                 versionCaption(v), index)
        : el("figure", {class: "old"}, [el("div", {class: "ph", text: `v${v.version}: no file`}),
                                         el("figcaption", {text: versionCaption(v)})]));
    }
    if (item.status === "succeeded" && item.has_image) {
      list.push(figure("out", thumbUrl(item), item.job_id, currentCaption(item), index));
    } else {
      const detail = {failed: item.error_cause || "unknown cause", pending: "not done yet"};
      list.push(el("div", {class: "ph"}, [
        el("b", {text: item.status}), el("span", {text: detail[item.status] || "no image"})]));
    }
    return list;
  }

  function card(item, index) {
    const reviewable = item.status === "succeeded";
    const badges = [el("span", {class: `badge b-${item.status}`, text: item.status})];
    if (reviewable) badges.push(el("span", {class: `badge review b-${item.review}`, text: item.review}));
    if (item.edited) badges.push(el("span", {class: "badge b-edited", text: "edited by hand"}));
    const size = item.width ? `${item.width}×${item.height}`
      : item.size ? `asked ${item.size}` : "provider's default size";
    const facts = `${size} · ${item.model}` + (item.version > 1 ? ` · version ${item.version}` : "");
    const meta = [
      el("div", {class: "badges"}, badges),
      el("span", {class: "id", text: item.job_id}),
      el("p", {class: "prompt", title: item.prompt, text: item.prompt}),
      el("p", {class: "facts", text: facts}),
    ];
    if (reviewable && item.review !== "unreviewed" && item.reviewed_by) {
      meta.push(el("p", {class: "when",
                         text: `${item.review} by ${item.reviewed_by}, ${when(item.reviewed_at)}`}));
    }
    if (item.error) meta.push(el("p", {class: "error", text: item.error}));
    const actions = [["approve", "approved", "a"], ["reject", "rejected", "r"]].map(
      ([label, decision, key]) => {
        const button = el("button", {type: "button", class: label,
                                     "aria-pressed": String(item.review === decision)},
                          [`${label} `, el("kbd", {text: key})]);
        button.disabled = !reviewable;
        button.addEventListener("click", (event) => {
          event.stopPropagation();
          select(index);
          decide(item.job_id, decision);
        });
        return button;
      });
    const wide = item.references.length + item.versions.length > 1 ? " wide" : "";
    const node = el("article", {class: `card s-${item.status} r-${item.review}${wide}`,
                                "data-job": item.job_id, "data-review": item.review,
                                "data-version": item.version}, [
      el("div", {class: "shots"}, shots(item, index)),
      el("div", {class: "meta"}, meta),
      el("div", {class: "actions"}, actions),
    ]);
    node.addEventListener("click", () => select(index));
    return node;
  }

  function renderCounts(counts) {
    const all = counts.succeeded + counts.failed + counts.pending;
    for (const b of document.querySelectorAll("[data-count]")) {
      b.textContent = String(b.dataset.count === "all" ? all : counts[b.dataset.count] || 0);
    }
  }

  function renderControls() {
    const s = state();
    for (const group of document.querySelectorAll("[data-filter]")) {
      for (const b of group.querySelectorAll("button")) {
        b.setAttribute("aria-pressed", String(b.value === s[group.dataset.filter]));
      }
    }
    const last = Math.min(s.offset + items.length, total);
    $("range").textContent = total ? `${s.offset + 1}–${last} of ${total}` : "no shot matches";
    $("prev").disabled = s.offset === 0;
    $("next").disabled = s.offset + LIMIT >= total;
  }

  async function load() {
    const s = state(), ticket = ++loads;
    const query = new URLSearchParams({status: s.status, review: s.review,
                                       offset: String(s.offset), limit: String(LIMIT)});
    let page;
    try {
      page = await api("/api/items?" + query);
    } catch (error) {
      say(`could not load the shots: ${error.message}`, true);
      return;
    }
    if (ticket !== loads) return;  // a later load overtook this one
    if (!page.items.length && s.offset > 0 && page.total > 0) {  // past the end: the last page
      go({offset: Math.floor((page.total - 1) / LIMIT) * LIMIT, job: ""});
      return;
    }
    $("folder").textContent = page.folder;
    items = page.items;
    total = page.total;
    selected = -1;
    closeViewer();
    grid.replaceChildren(...items.map(card));
    renderCounts(page.counts);
    renderControls();
    const found = items.findIndex((item) => item.job_id === s.job);
    select(focusLast ? items.length - 1 : Math.max(found, 0));
    focusLast = false;
    document.body.dataset.loaded = String(ticket);
  }

  function select(index) {
    const cards = grid.children;
    if (cards[selected]) {
      cards[selected].classList.remove("selected");
      cards[selected].removeAttribute("aria-current");
    }
    selected = index;
    if (!items[index]) return;
    cards[index].classList.add("selected");
    cards[index].setAttribute("aria-current", "true");
    cards[index].scrollIntoView({block: "nearest"});
    history.replaceState(null, "", hashOf(Object.assign(state(), {job: items[index].job_id})));
    if (viewing >= 0 && viewing !== index) openViewer(index);
  }

  function move(step) {
    const s = state(), next = selected + step;
    if (next >= 0 && next < items.length) {
      select(next);
    } else if (step > 0 && s.offset + LIMIT < total) {
      go({offset: s.offset + LIMIT, job: ""});
    } else if (step < 0 && s.offset > 0) {
      focusLast = true;
      go({offset: Math.max(0, s.offset - LIMIT), job: ""});
    }
  }

  function update(item, counts) {  // a shot as the server now has it
    renderCounts(counts);
    const index = items.findIndex((it) => it.job_id === item.job_id);
    if (index < 0) return;
    items[index] = item;
    const fresh = card(item, index);
    if (index === selected) {
      fresh.classList.add("selected");
      fresh.setAttribute("aria-current", "true");
    }
    grid.children[index].replaceWith(fresh);
    if (viewing === index) openViewer(index);
  }

  async function post(jobId, decision, version) {
    const body = JSON.stringify({job_id: jobId, decision, version});
    const answer = await api("/api/review", {method: "POST", body});
    update(answer.item, answer.counts);
  }

  function decide(jobId, decision) {
    queue = queue.then(async () => {
      const item = items.find((it) => it.job_id === jobId);
      if (!item) return;
      if (item.status !== "succeeded") {
        say(`${jobId} is ${item.status}: only a finished image can be reviewed`, true);
      } else if (item.review === decision) {
        say(`${jobId} is already ${decision}`);
      } else {
        try {
          await post(jobId, decision, item.version);
        } catch (error) {
          say(`${jobId}: not saved: ${error.message}`, true);
          return;
        }
        undo.push({jobId, version: item.version, previous: item.review});
        say(`${jobId} v${item.version} ${decision}; u undoes it`);
      }
    });
  }

  function undoLast() {
    queue = queue.then(async () => {
      const last = undo.pop();
      if (!last) {
        say("nothing to undo: no decision taken in this page yet");
        return;
      }
      try {
        await post(last.jobId, last.previous, last.version);
      } catch (error) {
        undo.push(last);
        say(`${last.jobId}: not undone: ${error.message}`, true);
        return;
      }
      say(`undone: ${last.jobId} is ${last.previous} again`);
    });
  }

  function openViewer(index) {
    const item = items[index];
    if (!item) return;
    const big = (src, caption) =>
      el("figure", {}, [el("img", {src, alt: caption}), el("figcaption", {text: caption})]);
    const list = item.references.map(
      (name, i) => big(refUrl(item, i), `reference ${i + 1}: ${name}`));
    for (const v of item.versions) {
      if (v.has_image) list.push(big(imageUrl(item, v.version), versionCaption(v)));
    }
    if (item.status === "succeeded" && item.has_image) {
      list.push(big(imageUrl(item), currentCaption(item)));
    }
    if (!list.length) return;
    if (selected !== index) select(index);
    viewing = index;
    $("viewer-title").textContent = item.job_id;
    $("viewer-shots").replaceChildren(...list);
    viewer.hidden = false;
  }

  function closeViewer() {
    viewing = -1;
    viewer.hidden = true;
    $("viewer-shots").replaceChildren();
  }

  const keys = {
    j: () => move(1), ArrowRight: () => move(1), k: () => move(-1), ArrowLeft: () => move(-1),
    a: () => items[selected] && decide(items[selected].job_id, "approved"),
    r: () => items[selected] && decide(items[selected].job_id, "rejected"),
    u: undoLast, Enter: () => openViewer(selected), Escape: closeViewer,
  };
  // Keys typed into a field are the field's; Enter on a focused button or link activates it.
  // The letters and arrows stay shortcuts there: a button keeps the focus after a click.
  const typedInto = (target) => target.closest("input, select, textarea, [contenteditable]");
  const activates = (target) => target.closest("button, a[href]");
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || !Object.hasOwn(keys, event.key)) return;
    const target = event.target instanceof Element ? event.target : document.body;
    if (typedInto(target) || (event.key === "Enter" && activates(target))) return;
    event.preventDefault();
    keys[event.key]();
  });
  for (const group of document.querySelectorAll("[data-filter]")) {
    for (const b of group.querySelectorAll("button")) {
      b.addEventListener("click", () => go({[group.dataset.filter]: b.value, offset: 0, job: ""}));
    }
  }
  $("prev").addEventListener("click", () => go({offset: Math.max(0, state().offset - LIMIT), job: ""}));
  $("next").addEventListener("click", () => go({offset: state().offset + LIMIT, job: ""}));
  $("viewer-close").addEventListener("click", closeViewer);
  viewer.addEventListener("click", (event) => { if (event.target === viewer) closeViewer(); });
  addEventListener("hashchange", load);
  load();
})();
