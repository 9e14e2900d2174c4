"""Scale: big manifests validated and planned, and finished runs rerun.

Four measurements, each a fresh ``image-runner run`` process, timed from start to exit
(start-up included: this is what a user waits for):

* a 1,000,000-row CSV manifest and a 100,000-job YAML manifest, with ``--dry-run``: validated,
  resumed against an empty output folder and planned, nothing sent. Time and peak RSS; targets
  < 20 s and < 1 GB each. A dry run killed at three times its time target is not repeated.
* a 10,000-job run finished against the emulator (small flat images), then run again: its
  time and the requests the emulator received during it; targets < 5 s and 0 requests.
* a finished 1,000,000-job run (``--quick``: 10,000) rerun once: time and requests; targets
  < 15 s and 0 requests. Running a million requests would take an hour, so the folder is made
  as :mod:`bench.finished` says (its first jobs run for real, the rest recorded through the
  store's own writes, their images hard links), in about two and a half minutes, printed; one
  rerun, as the figure must stay within minutes.

A rerun counts only if it found every job done before and none to do.

Every dry run points at the emulator too, to check that it sends nothing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from bench.emulator import EmulatorProcess
from bench.figures import MB, Options, Row, median, runs_text, say
from bench.finished import make_finished
from bench.manifests import write_csv, write_yaml
from bench.procs import run_runner, succeeded

DRY_RUN_SIZE = "1280x1280"
RUN_SIZE = "1280x544"  # the smallest size: the first run is only there to be rerun
CONCURRENCY = 16
TARGET_DRY_RUN_S = 20.0
TARGET_DRY_RUN_MB = 1000
TARGET_RERUN_S = 5.0
TARGET_BIG_RERUN_S = 15.0
DRY_RUN_TIMEOUT_S = 3 * TARGET_DRY_RUN_S
RUN_TIMEOUT_S = 600.0
_TO_DO = re.compile(r"to do:\s+(\d+) jobs")
_RERUN_PLAN = re.compile(r"image-runner: (\d+) to do, (\d+) done before")


def measure(options: Options) -> list[Row]:
    csv_jobs, yaml_jobs, run_jobs, big_jobs = (
        (100_000, 10_000, 1_000, 10_000)
        if options.quick
        else (1_000_000, 100_000, 10_000, 1_000_000)
    )
    rows: list[Row] = []
    with EmulatorProcess() as emulator:
        csv = write_csv(
            options.work_dir / "scale.csv", csv_jobs, DRY_RUN_SIZE, distinct_prompts=True
        )
        rows += _dry_run(options, emulator, f"{csv_jobs:,}-row CSV", csv, csv_jobs)
        yaml = write_yaml(
            options.work_dir / "scale.yaml", yaml_jobs, DRY_RUN_SIZE, distinct_prompts=True
        )
        rows += _dry_run(options, emulator, f"{yaml_jobs:,}-job YAML", yaml, yaml_jobs)
        rows += _rerun(options, emulator, run_jobs)
        rows += _big_rerun(options, emulator, big_jobs)
    return rows


def _dry_run(
    options: Options, emulator: EmulatorProcess, label: str, manifest: Path, jobs: int
) -> list[Row]:
    size_mb = manifest.stat().st_size / MB
    say(f"scale: dry run of a {label} manifest ({size_mb:.1f} MB)")
    times_s: list[float] = []
    peaks_mb: list[float] = []
    problem = ""
    for repeat in range(options.repeat):
        mark = emulator.mark()
        out_dir = options.work_dir / f"scale-dry-run-{repeat}"
        dry = run_runner(
            manifest,
            out_dir,
            emulator.base_url,
            concurrency=CONCURRENCY,
            timeout_s=DRY_RUN_TIMEOUT_S,
            extra=["--dry-run"],
        )
        sent = emulator.mark() - mark
        shutil.rmtree(out_dir, ignore_errors=True)
        match = _TO_DO.search(dry.stdout)
        planned = int(match.group(1)) if match else None
        times_s.append(dry.wall_s)
        peaks_mb.append(dry.peak_rss_mb)
        say(
            f"  run {repeat + 1}: {dry.wall_s:.1f} s, peak RSS {dry.peak_rss_mb:.0f} MB, "
            f"planned {planned if planned is not None else '?'} jobs, {sent} requests"
        )
        if not dry.ok:
            problem = dry.failure()
        elif planned != jobs or sent:
            problem = f"planned {planned} of {jobs} jobs, sent {sent} requests"
        if problem:
            say(f"  WARNING {problem}; not repeated")
            break
    time_s, peak_mb = median(times_s), median(peaks_mb)
    note = f"; {problem}" if problem else ""
    return [
        Row(
            f"scale: {label} dry run, time",
            f"{time_s:.1f} s ({runs_text(times_s, '.1f')}){note}",
            f"< {TARGET_DRY_RUN_S:.0f} s",
            time_s < TARGET_DRY_RUN_S and not problem,
        ),
        Row(
            f"scale: {label} dry run, peak RSS",
            f"{peak_mb:.0f} MB ({runs_text(peaks_mb, '.0f')}){note}",
            f"< {TARGET_DRY_RUN_MB / 1000:.0f} GB",
            peak_mb < TARGET_DRY_RUN_MB and not problem,
        ),
    ]


def _rerun(options: Options, emulator: EmulatorProcess, jobs: int) -> list[Row]:
    manifest = write_csv(options.work_dir / f"scale-run-{jobs}.csv", jobs, RUN_SIZE)
    out_dir = options.work_dir / "scale-run"
    say(f"scale: a {jobs:,}-job run of {RUN_SIZE}, concurrency {CONCURRENCY}, then reruns")
    first = run_runner(
        manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=RUN_TIMEOUT_S
    )
    done = succeeded(first)
    say(f"  first run: {done} of {jobs} succeeded in {first.wall_s:.1f} s")
    label = f"scale: rerun of a finished {jobs:,}-job run"
    if not first.ok or done != jobs:
        shutil.rmtree(out_dir, ignore_errors=True)
        reason = f"the first run failed: {first.failure()}"
        return [Row(f"{label}, time", reason, f"< {TARGET_RERUN_S:.0f} s", None)]
    rows = _reruns(
        emulator, label, manifest, out_dir, jobs, repeat=options.repeat, target_s=TARGET_RERUN_S
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows


def _big_rerun(options: Options, emulator: EmulatorProcess, jobs: int) -> list[Row]:
    say(f"scale: a finished {jobs:,}-job run of {RUN_SIZE}, made, then rerun once")
    label = f"scale: rerun of a finished {jobs:,}-job run"
    try:
        folder = make_finished(options.work_dir, jobs, RUN_SIZE, emulator.base_url)
    except RuntimeError as exc:
        return [Row(f"{label}, time", str(exc), f"< {TARGET_BIG_RERUN_S:.0f} s", None)]
    try:
        manifest, out_dir = folder.manifest, folder.out_dir
        return _reruns(
            emulator, label, manifest, out_dir, jobs, repeat=1, target_s=TARGET_BIG_RERUN_S
        )
    finally:
        folder.remove()


def _reruns(
    emulator: EmulatorProcess,
    label: str,
    manifest: Path,
    out_dir: Path,
    jobs: int,
    *,
    repeat: int,
    target_s: float,
) -> list[Row]:
    """Rerun the finished run of ``manifest`` in ``out_dir`` ``repeat`` times: its time, and the
    requests the emulator received meanwhile. A rerun that failed, or did not find every job
    done, is reported as failed."""
    times_s: list[float] = []
    sent: list[int] = []
    problem = ""
    for run in range(repeat):
        mark = emulator.mark()
        rerun = run_runner(
            manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=RUN_TIMEOUT_S
        )
        sent.append(emulator.mark() - mark)
        times_s.append(rerun.wall_s)
        planned = _RERUN_PLAN.search(rerun.stderr)
        found = (int(planned.group(1)), int(planned.group(2))) if planned else None
        say(
            f"  rerun {run + 1}: {rerun.wall_s:.2f} s, {sent[-1]} requests, "
            f"peak RSS {rerun.peak_rss_mb:.0f} MB, to do and done before: {found}"
            + ("" if rerun.ok else f", {rerun.failure()}")
        )
        if not rerun.ok:
            problem = rerun.failure()
        elif found != (0, jobs):
            problem = f"found (to do, done before) {found}, not (0, {jobs})"
    time_s = median(times_s)
    note = f"; failed: {problem}" if problem else ""
    return [
        Row(
            f"{label}, time",
            f"{time_s:.2f} s ({runs_text(times_s, '.2f')}){note}",
            f"< {target_s:.0f} s",
            time_s < target_s and not problem,
        ),
        Row(f"{label}, requests sent", str(max(sent)), "0", max(sent) == 0),
    ]
