"""Latency hiding: with a provider that takes 1 s an image, does the runner keep 100 in flight?

The emulator answers every request after exactly ``L = 1 s``; the runner runs at concurrency
``C = 100``. No client can beat ``C / L`` = 100 images/s, so the figure is the runner's
throughput over its request phase divided by that. What it loses is the time between one
answer arriving and the worker's next request leaving (checkpoint, verification, write), and,
because every request takes the same time, workers move in rounds: N jobs need at least
``ceil(N / C)`` rounds, so N is a multiple of C. The bare loop of :mod:`bench.bare` runs the
same jobs once first, to show what the setup itself allows (about 0.97 on 2 cores): what it
misses is the emulator's and the loopback's, not the runner's. Target: >= 0.95.
"""

from __future__ import annotations

import shutil

from bench.emulator import EmulatorProcess, phase
from bench.figures import Options, Row, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import run_bare, run_runner

SIZE = "1280x544"
LATENCY_S = 1.0
CONCURRENCY = 100
TARGET = 0.95
TIMEOUT_S = 300.0


def measure(options: Options) -> list[Row]:
    jobs = 300 if options.quick else 500
    ideal_per_s = CONCURRENCY / LATENCY_S
    say(f"latency: {jobs} jobs of {SIZE}, concurrency {CONCURRENCY}, latency {LATENCY_S:g} s")
    manifest = write_csv(options.work_dir / "latency.csv", jobs, SIZE)
    shares: list[float] = []
    problems: list[str] = []
    with EmulatorProcess(["--latency", f"{LATENCY_S:g}"]) as emulator:
        mark = emulator.mark()
        bare = run_bare(
            emulator.base_url, jobs=jobs, concurrency=CONCURRENCY, size=SIZE, timeout_s=TIMEOUT_S
        )
        bare_share = phase(emulator.records_since(mark)).ok_per_s / ideal_per_s
        say(f"  bare loop: {bare_share:.3f} of C/L" + ("" if bare.ok else f", {bare.failure()}"))
        for repeat in range(options.repeat):
            mark = emulator.mark()
            out_dir = options.work_dir / f"latency-{repeat}"
            runner = run_runner(
                manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S
            )
            got = phase(emulator.records_since(mark))
            shutil.rmtree(out_dir, ignore_errors=True)
            say(
                f"  run {repeat + 1}: {got.ok_per_s:.1f} img/s over {got.span_s:.2f} s of "
                f"requests ({runner.wall_s:.1f} s in all), {got.ok_per_s / ideal_per_s:.3f} of C/L"
            )
            if runner.ok and got.ok == jobs:
                shares.append(got.ok_per_s / ideal_per_s)
            else:
                problems.append(f"{got.ok} of {jobs} images, {runner.failure()}")

    def describe(share: float) -> str:
        return (
            f"{share:.3f} ({share * ideal_per_s:.1f} of {ideal_per_s:.0f} img/s, bare loop "
            f"{bare_share:.3f}; {runs_text(shares, '.3f')})"
        )

    figure, target = "latency hiding: throughput / (C/L)", f">= {TARGET}"
    return [
        median_row(figure, target, shares, problems, describe=describe, meets=lambda s: s >= TARGET)
    ]
