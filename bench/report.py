"""Report: ``image-runner report`` of a 100,000-job output folder, and its page in Chromium.

The folder is made as a user's is: a run of 100,000 jobs (``--quick``: 1,000) against the
emulator at its smallest size, 1280x544 (flat PNGs of about 1 KB: the smallest images it
makes), concurrency 16. That run writes its report at its end, making every thumbnail. Then
(each report a fresh process, timed from start to exit, with its peak RSS):

* ``image-runner report OUT`` as the run left the folder: every thumbnail there, none decoded;
* the page opened in a headless Chromium (the tests' DevTools driver, a fresh profile each
  time): the time from the navigation's start (the page's ``performance.now()``, polled every
  50 ms) until the first :data:`FIRST_CARDS` cards' thumbnails are loaded (``complete`` and
  ``naturalWidth > 0``); target < 3 s;
* ``image-runner report OUT`` with ``thumbs/`` deleted first: every image decoded, shrunk and
  encoded again (about 2 ms of CPU an image, on every core).

Targets for both reports: < 60 s and < 300 MB.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from bench.emulator import EmulatorProcess
from bench.figures import Options, Row, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import Finished, run_child, run_runner, runner_env, succeeded
from tests.chromium import CHROMIUM, Browser, BrowserError

SIZE = "1280x544"
CONCURRENCY = 16
FIRST_CARDS = 20
TARGET_S = 60.0
TARGET_MB = 300
TARGET_FIRST_THUMBS_S = 3.0
RUN_TIMEOUT_S = 1800.0
REPORT_TIMEOUT_S = 10 * TARGET_S  # decoding 100,000 images on a busy machine takes minutes
FIRST_THUMBS_TIMEOUT_S = 60.0
_POLL_S = 0.05
_FIRST_THUMBS_JS = (
    f"(() => {{ const imgs = [...document.querySelectorAll('#sheet img')].slice(0, {FIRST_CARDS});"
    f" return imgs.length === {FIRST_CARDS}"
    " && imgs.every((i) => i.complete && i.naturalWidth > 0) && performance.now(); })()"
)


def measure(options: Options) -> list[Row]:
    jobs = 1_000 if options.quick else 100_000
    out_dir = options.work_dir / "report-run"
    manifest = write_csv(options.work_dir / f"report-{jobs}.csv", jobs, SIZE)
    say(f"report: a {jobs:,}-job run of {SIZE} to report on, concurrency {CONCURRENCY}")
    with EmulatorProcess() as emulator:
        first = run_runner(
            manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=RUN_TIMEOUT_S
        )
    done = succeeded(first)
    say(f"  the run: {done} of {jobs} succeeded in {first.wall_s:.0f} s (its report included)")
    label = f"report: {jobs:,} jobs"
    if not first.ok or done != jobs:
        shutil.rmtree(out_dir, ignore_errors=True)
        reason = f"the run failed: {first.failure()}"
        return [Row(f"{label}, time", reason, f"< {TARGET_S:.0f} s", None)]
    rows = _reports(options, out_dir, f"{label}, thumbnails there", cold=False)
    rows.append(_first_thumbs(options, out_dir, label))  # while every thumbnail is there
    rows += _reports(options, out_dir, f"{label}, thumbnails made", cold=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows


def _report(out_dir: Path) -> Finished:
    args = ["-m", "runner", "report", str(out_dir)]
    return run_child(args, timeout_s=REPORT_TIMEOUT_S, env=runner_env())


def _reports(options: Options, out_dir: Path, label: str, *, cold: bool) -> list[Row]:
    times_s: list[float] = []
    peaks_mb: list[float] = []
    problems: list[str] = []
    for repeat in range(options.repeat):
        if cold:
            shutil.rmtree(out_dir / "thumbs", ignore_errors=True)
        made = _report(out_dir)
        say(
            f"  {label}, run {repeat + 1}: {made.wall_s:.1f} s, peak RSS {made.peak_rss_mb:.0f} MB"
            + ("" if made.ok else f", {made.failure()}")
        )
        if made.ok:
            times_s.append(made.wall_s)
            peaks_mb.append(made.peak_rss_mb)
        else:
            problems.append(made.failure())
    return [
        median_row(
            f"{label}, time",
            f"< {TARGET_S:.0f} s",
            times_s,
            problems,
            describe=lambda s: f"{s:.1f} s ({runs_text(times_s, '.1f')})",
            meets=lambda s: s < TARGET_S,
        ),
        median_row(
            f"{label}, peak RSS",
            f"< {TARGET_MB} MB",
            peaks_mb,
            problems,
            describe=lambda mb: f"{mb:.0f} MB ({runs_text(peaks_mb, '.0f')})",
            meets=lambda mb: mb < TARGET_MB,
        ),
    ]


def _first_thumbs(options: Options, out_dir: Path, label: str) -> Row:
    figure = f"{label}, page opened: first {FIRST_CARDS} thumbnails"
    target = f"< {TARGET_FIRST_THUMBS_S:.0f} s"
    if not CHROMIUM.is_file():
        return Row(figure, f"not measured: no Chromium at {CHROMIUM}", target, None)
    url = (out_dir / "report.html").as_uri()
    size_mb = (out_dir / "report.html").stat().st_size / 1e6
    times_s: list[float] = []
    for repeat in range(options.repeat):
        profile = options.work_dir / f"report-chromium-{repeat}"
        times_s.append(asyncio.run(_time_first_thumbs(url, profile)))
        shutil.rmtree(profile, ignore_errors=True)
        say(
            f"  page of {size_mb:.1f} MB in Chromium, run {repeat + 1}: first {FIRST_CARDS} "
            f"thumbnails in {times_s[-1]:.2f} s"
        )
    return median_row(
        figure,
        target,
        times_s,
        [],
        describe=lambda s: f"{s:.2f} s ({runs_text(times_s, '.2f')})",
        meets=lambda s: s < TARGET_FIRST_THUMBS_S,
    )


async def _time_first_thumbs(url: str, profile: Path) -> float:
    async with Browser(profile) as browser:
        page = await browser.open("about:blank")
        await page.send("Page.navigate", url=url)
        deadline_s = time.monotonic() + FIRST_THUMBS_TIMEOUT_S
        while time.monotonic() < deadline_s:
            try:
                now_ms = await page.evaluate(_FIRST_THUMBS_JS)
            except BrowserError:  # asked while the old page was going away
                now_ms = None
            if now_ms:
                return float(now_ms) / 1000
            await asyncio.sleep(_POLL_S)
    raise BrowserError(f"the first thumbnails did not load in {FIRST_THUMBS_TIMEOUT_S:.0f} s")
