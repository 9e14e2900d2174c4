"""Memory: the runner's peak RSS with real-sized images in flight.

The emulator answers every request with the same incompressible 3840x2160 PNG of random pixels
(``--payload noise``): ~25 MB, ~33 MB of base64 JSON, about what a real 4K image weighs. The
runner fetches them at concurrency 16, so 16 such bodies are in flight at once, and enough jobs
run for every worker to go round a few times. The figure is the ``ru_maxrss`` of the runner's
process (the emulator's memory is its own), the median over the repeats. Target: < 500 MB.
"""

from __future__ import annotations

import shutil

from bench.emulator import EmulatorProcess, phase
from bench.figures import MB, Options, Row, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import run_runner

SIZE = "3840x2160"
CONCURRENCY = 16
TARGET_MB = 500
TIMEOUT_S = 300.0


def measure(options: Options) -> list[Row]:
    jobs = 16 if options.quick else 64
    say(f"memory: {jobs} jobs of {SIZE} noise (~25 MB PNGs), concurrency {CONCURRENCY}")
    manifest = write_csv(options.work_dir / "memory.csv", jobs, SIZE)
    peaks_mb: list[float] = []
    problems: list[str] = []
    with EmulatorProcess(["--payload", "noise"]) as emulator:
        for repeat in range(options.repeat):
            mark = emulator.mark()
            out_dir = options.work_dir / f"memory-{repeat}"
            runner = run_runner(
                manifest, out_dir, emulator.base_url, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S
            )
            got = phase(emulator.records_since(mark))
            written_mb = sum(p.stat().st_size for p in out_dir.rglob("*.png")) / MB
            shutil.rmtree(out_dir, ignore_errors=True)
            if runner.ok and got.ok == jobs:
                peaks_mb.append(runner.peak_rss_mb)
            else:
                problems.append(f"{got.ok} of {jobs} images, {runner.failure()}")
            say(
                f"  run {repeat + 1}: peak RSS {runner.peak_rss_mb:.0f} MB, {got.ok} images "
                f"({written_mb:.0f} MB written) at {got.ok_per_s:.1f} img/s, "
                f"{runner.wall_s:.1f} s in all"
            )
    figure, target = "memory: peak RSS, 4K noise at C=16", f"< {TARGET_MB} MB"
    return [
        median_row(
            figure,
            target,
            peaks_mb,
            problems,
            describe=lambda mb: f"{mb:.0f} MB ({runs_text(peaks_mb, '.0f')})",
            meets=lambda mb: mb < TARGET_MB,
        )
    ]
