"""Breakdown: where an image's time goes, in microseconds per image, stage by stage.

The overhead figure's run (small flat images, zero latency, the same concurrency), in this
process, so that :func:`runner.stages.counting` sees it, against an emulator in a child; the
progress bar is the CLI's, disabled as ``--no-progress`` has it. The stages, each divided by the
images made:

- the event loop: the CPU time of its thread while the pool ran, all of it, and of that the
  base64 stream (the JSON scan, the decode, the temp file's writes) and the progress reports;
  the rest is aiohttp's request and answer, asyncio, and the pool's own books (admission, the
  pacer, the retry loop);
- the savers' threads (wall time): verification (a full decode), the write of the final file
  (with its provenance), its fsync and the fsync of its folder;
- the group commit's thread (wall time): the checkpoint's transactions, intent and outcome.

The threads overlap one another and the event loop, so the sum of the stages is the work per
image, not its wall time; the wall time per image (the pool's run over the images) is the
figure the others explain. The bare loop of :mod:`bench.bare` is timed once alongside: its
wall time per image is what the network and the JSON alone cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import shutil
import statistics
from pathlib import Path

from bench.emulator import EmulatorProcess, phase
from bench.figures import Options, Row, say
from bench.manifests import write_csv
from bench.overhead import BARE_JOBS_FACTOR, CONCURRENCY, SIZE
from bench.procs import API_KEY, run_bare
from runner.cli.printing import ProgressBar
from runner.core.lifecycle import RunOptions
from runner.http.client import ClientConfig
from runner.library import execute
from runner.manifest.load import load_manifest
from runner.stages import StageTimes, counting

TIMEOUT_S = 300.0
NS_PER_US = 1000

# (stage, label): what is printed, in this order; a label's indent says what it is part of.
STAGES = (
    ("event loop", "event loop"),
    ("b64 stream", "  b64 stream (JSON scan, decode, temp file)"),
    ("progress", "  progress reports"),
    ("loop rest", "  the rest: aiohttp, asyncio, pool, admission, pacer"),
    ("save", "savers (threads)"),
    ("verify", "  verify (a PNG checked whole; others decoded)"),
    ("write", "  write (with provenance, sha256)"),
    ("fsync file", "  fsync, the file"),
    ("fsync folder", "  fsync, the folder"),
    ("checkpoint commit", "checkpoint commits (thread)"),
    ("other", "other threads (executor, decoders)"),
    ("pool run", "the process, while the pool ran"),
)


def measure(options: Options) -> list[Row]:
    jobs = 200 if options.quick else 1000
    say(f"breakdown: {jobs} jobs of {SIZE}, concurrency {CONCURRENCY}, latency 0, in-process")
    manifest = write_csv(options.work_dir / "breakdown.csv", jobs, SIZE)
    runs: list[dict[str, tuple[float, float]]] = []
    with EmulatorProcess() as emulator:
        bare_jobs = BARE_JOBS_FACTOR * jobs
        mark = emulator.mark()
        run_bare(
            emulator.base_url,
            jobs=bare_jobs,
            concurrency=CONCURRENCY,
            size=SIZE,
            timeout_s=TIMEOUT_S,
        )
        bare = phase(emulator.records_since(mark))
        bare_us = 1e6 / bare.ok_per_s if bare.ok_per_s else float("nan")
        for repeat in range(options.repeat):
            out_dir = options.work_dir / f"breakdown-{repeat}"
            made, times = _run(manifest, out_dir, emulator.base_url)
            shutil.rmtree(out_dir, ignore_errors=True)
            if made != jobs:
                say(f"  run {repeat + 1}: WARNING {made} of {jobs} images; left out")
                continue
            runs.append(per_image_us(times, made))
            say(f"  run {repeat + 1}: " + _line(runs[-1]))
    if not runs:
        return [Row("per-image breakdown", "no complete run", "-", None)]
    us = {
        stage: (
            statistics.median(run[stage][0] for run in runs),
            statistics.median(run[stage][1] for run in runs),
        )
        for stage in runs[0]
    }
    for text in table(us, bare_us):
        say(text)
    return [Row("per-image breakdown, us/image (median)", _line(us), "-", None)]


def _run(manifest: Path, out_dir: Path, base_url: str) -> tuple[int, StageTimes]:
    bar = ProgressBar(disable=True)  # what `run --no-progress` does
    client = ClientConfig(base_url=base_url, api_key=API_KEY)
    run_options = RunOptions(out_dir=out_dir, client=client, concurrency=CONCURRENCY)
    jobs = load_manifest(manifest)
    with counting() as times, contextlib.redirect_stderr(io.StringIO()):
        report = asyncio.run(execute(jobs, run_options, on_plan=bar.start, on_progress=bar.update))
    made = report.pool.progress.succeeded if report.pool else 0
    return made, times


def per_image_us(times: StageTimes, images: int) -> dict[str, tuple[float, float]]:
    """Each stage's (wall, CPU) microseconds per image. ``loop rest`` is the event loop's CPU
    outside the stages measured on it; ``other`` the process's CPU outside the threads
    measured (the decoders', mostly); ``pool run`` the process's, its wall time the figure
    the others explain."""

    def us(stage: str) -> tuple[float, float]:
        wall_ns, cpu_ns = times.wall_ns.get(stage, 0), times.cpu_ns.get(stage, 0)
        return wall_ns / NS_PER_US / images, cpu_ns / NS_PER_US / images

    stages = {stage: us(stage) for stage, _ in STAGES if stage not in ("loop rest", "other")}
    loop_cpu = stages["event loop"][1] - stages["b64 stream"][1] - stages["progress"][1]
    stages["loop rest"] = (float("nan"), loop_cpu)
    measured = ("event loop", "save", "checkpoint commit")
    stages["other"] = (float("nan"), stages["pool run"][1] - sum(stages[s][1] for s in measured))
    commits = times.calls.get("checkpoint commit", 0)
    stages["writes per commit"] = (2 * images / commits if commits else 0.0, 0.0)
    return stages


def table(us: dict[str, tuple[float, float]], bare_us: float) -> list[str]:
    """The breakdown as printed: one stage a line, its CPU and wall time per image."""
    lines = [f"  median per image: {'CPU':>56} {'wall':>9}"]
    for stage, label in STAGES:
        wall, cpu = us[stage]
        wall_text = "" if math.isnan(wall) else f"{wall:6.0f} us"
        lines.append(f"    {label:<52} {cpu:6.0f} us {wall_text}")
    lines.append(f"    {'the bare loop, for comparison':<52} {'':9} {bare_us:6.0f} us")
    lines.append(f"    (checkpoint: {us['writes per commit'][0]:.1f} writes per group commit)")
    return lines


def _line(us: dict[str, tuple[float, float]]) -> str:
    """CPU per image of the main parts, and the wall time per image."""
    parts = {
        "CPU: loop": us["event loop"][1],
        "savers": us["save"][1],
        "commits": us["checkpoint commit"][1],
        "other": us["other"][1],
        "all": us["pool run"][1],
        "wall": us["pool run"][0],
    }
    return ", ".join(f"{name} {value:.0f}" for name, value in parts.items()) + " us"
