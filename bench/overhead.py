"""Overhead: the full runner against the bare loop of :mod:`bench.bare`, same emulator, same run.

Zero latency and small flat images (1280x544, a few KB), so the network costs next to nothing
and what is left is each client's own work per image: the runner's checkpoint commits,
verification, hashing and atomic write against the bare loop's JSON and base64 decoding. Both
send the same requests at the same concurrency to one emulator, one after the other in each
repeat (the bare loop five times as many, or its request phase would be too short to time
well); each is timed over its request phase, and the ratio of each repeat is taken before the
median.
Target: runner / bare >= 0.25 (issue 13; it was 0.5, which would take over 3,000 verified, fsynced
images a second on 2 cores).
"""

from __future__ import annotations

import shutil

from bench.emulator import EmulatorProcess, phase
from bench.figures import Options, Row, median, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import run_bare, run_runner

SIZE = "1280x544"
CONCURRENCY = 16
TARGET = 0.25
TIMEOUT_S = 300.0
BARE_JOBS_FACTOR = 5  # the bare loop does 1,000 in ~0.15 s: too short a time to measure well


def measure(options: Options) -> list[Row]:
    jobs = 200 if options.quick else 1000
    bare_jobs = BARE_JOBS_FACTOR * jobs
    say(
        f"overhead: {jobs} jobs (the bare loop {bare_jobs}) of {SIZE}, "
        f"concurrency {CONCURRENCY}, latency 0"
    )
    manifest = write_csv(options.work_dir / "overhead.csv", jobs, SIZE)
    ratios, runner_rates, bare_rates = [], [], []
    problems: list[str] = []
    with EmulatorProcess() as emulator:
        for repeat in range(options.repeat):
            mark = emulator.mark()
            bare = run_bare(
                emulator.base_url,
                jobs=bare_jobs,
                concurrency=CONCURRENCY,
                size=SIZE,
                timeout_s=TIMEOUT_S,
            )
            bare_phase = phase(emulator.records_since(mark))
            mark = emulator.mark()
            out_dir = options.work_dir / f"overhead-{repeat}"
            runner = run_runner(
                manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S
            )
            runner_phase = phase(emulator.records_since(mark))
            shutil.rmtree(out_dir, ignore_errors=True)
            complete = True
            for name, finished, got, sent in (
                ("bare", bare, bare_phase, bare_jobs),
                ("runner", runner, runner_phase, jobs),
            ):
                if not finished.ok or got.ok != sent:
                    problems.append(f"{name}: {got.ok} of {sent} images, {finished.failure()}")
                    complete = False
            ratio = runner_phase.ok_per_s / bare_phase.ok_per_s if bare_phase.ok_per_s else 0.0
            if complete:
                ratios.append(ratio)
                runner_rates.append(runner_phase.ok_per_s)
                bare_rates.append(bare_phase.ok_per_s)
            say(
                f"  run {repeat + 1}: runner {runner_phase.ok_per_s:.0f} img/s "
                f"({runner_phase.span_s:.2f} s of requests, {runner.wall_s:.1f} s in all), "
                f"bare {bare_phase.ok_per_s:.0f} img/s ({bare_phase.span_s:.2f} s of requests), "
                f"ratio {ratio:.2f}"
            )

    def describe(ratio: float) -> str:
        return (
            f"{ratio:.2f} ({median(runner_rates):.0f} vs {median(bare_rates):.0f} img/s; "
            f"{runs_text(ratios, '.2f')})"
        )

    figure, target = "overhead: runner / bare throughput", f">= {TARGET}"
    return [
        median_row(figure, target, ratios, problems, describe=describe, meets=lambda r: r >= TARGET)
    ]
