"""4K throughput: the full runner against a bare loop that decodes and writes each image.

The emulator answers at zero latency with 3840x2160 noise PNGs (``--payload noise``: random
pixels no encoder shrinks, ~25 MB each, ~33 MB as base64, the size of a real provider's 4K
image). At that size the per-image bookkeeping is noise and what counts is the work done per
byte: the runner's streamed base64 decode, verification, provenance copy, hash and fsync,
against the bare loop of :mod:`bench.bare` with ``--write``, which decodes the JSON and the
base64 and writes each image to a file of its own. Both send the same requests at the same
concurrency to one emulator, one after the other in each repeat; each is timed over its request
phase (the emulator's books), and the ratio of each repeat is taken before the median, as
:mod:`bench.overhead` does. Throughput on a shared 2-core machine moves with everyone else's
load, so each client's CPU time per image (user + system, from the kernel's books of the
finished child, its start-up included) is printed beside it: what a change to the per-image
work moves.
The emulator keeps one PNG and its base64 per size (~60 MB; its RSS stays under 200 MB); a
warm-up request renders it before anything is timed, so neither client pays the 0.7 s render.
Target: runner / bare >= 0.5.
"""

from __future__ import annotations

import resource
import shutil
from collections.abc import Callable
from functools import partial

from bench.emulator import EmulatorProcess, phase
from bench.figures import Options, Row, median, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import Finished, run_child, run_runner, runner_env

SIZE = "3840x2160"
CONCURRENCY = 4
TARGET = 0.5
TIMEOUT_S = 300.0


def run_bare_writing(
    base_url: str, *, jobs: int, out_dir: str, timeout_s: float = TIMEOUT_S
) -> Finished:
    """The bare loop of :mod:`bench.bare`, writing each image into ``out_dir``."""
    args = ["-m", "bench.bare", base_url, "--jobs", str(jobs), "--size", SIZE]
    args += ["--concurrency", str(CONCURRENCY), "--write", out_dir]
    return run_child(args, timeout_s=timeout_s, env=runner_env())


def cpu_ms_per_image(run: Callable[[], Finished], images: int) -> tuple[Finished, float]:
    """``run()``, and the CPU its child used per image. The children's usage counts only
    children reaped: the emulator, still running, is not in it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return finished, 1000 * cpu_s / images


def measure(options: Options) -> list[Row]:
    jobs = 12 if options.quick else 60
    say(f"4k: {jobs} noise PNGs of {SIZE} (~25 MB), concurrency {CONCURRENCY}, latency 0")
    manifest = write_csv(options.work_dir / "fourk.csv", jobs, SIZE)
    ratios, runner_rates, bare_rates, runner_cpu, bare_cpu = [], [], [], [], []
    problems: list[str] = []
    with EmulatorProcess(["--payload", "noise"]) as emulator:
        warm_dir = options.work_dir / "fourk-warm"
        warm_up = run_bare_writing(emulator.base_url, jobs=1, out_dir=str(warm_dir))
        shutil.rmtree(warm_dir, ignore_errors=True)
        if not warm_up.ok:
            problems.append(f"warm-up: {warm_up.failure()}")
        for repeat in range(options.repeat):
            bare_dir = options.work_dir / f"fourk-bare-{repeat}"
            mark = emulator.mark()
            bare, bare_ms = cpu_ms_per_image(
                partial(run_bare_writing, emulator.base_url, jobs=jobs, out_dir=str(bare_dir)), jobs
            )
            bare_phase = phase(emulator.records_since(mark))
            shutil.rmtree(bare_dir, ignore_errors=True)
            out_dir = options.work_dir / f"fourk-{repeat}"
            mark = emulator.mark()
            runner, runner_ms = cpu_ms_per_image(
                partial(
                    run_runner,
                    manifest,
                    out_dir,
                    emulator.base_url,
                    concurrency=CONCURRENCY,
                    timeout_s=TIMEOUT_S,
                ),
                jobs,
            )
            runner_phase = phase(emulator.records_since(mark))
            shutil.rmtree(out_dir, ignore_errors=True)
            complete = True
            for name, finished, got in (
                ("bare", bare, bare_phase),
                ("runner", runner, runner_phase),
            ):
                if not finished.ok or got.ok != jobs:
                    problems.append(f"{name}: {got.ok} of {jobs} images, {finished.failure()}")
                    complete = False
            ratio = runner_phase.ok_per_s / bare_phase.ok_per_s if bare_phase.ok_per_s else 0.0
            if complete:
                ratios.append(ratio)
                runner_rates.append(runner_phase.ok_per_s)
                bare_rates.append(bare_phase.ok_per_s)
                runner_cpu.append(runner_ms)
                bare_cpu.append(bare_ms)
            say(
                f"  run {repeat + 1}: runner {runner_phase.ok_per_s:.2f} img/s, {runner_ms:.0f} ms "
                f"CPU/img, peak RSS {runner.peak_rss_mb:.0f} MB; bare {bare_phase.ok_per_s:.2f} "
                f"img/s, {bare_ms:.0f} ms CPU/img, peak RSS {bare.peak_rss_mb:.0f} MB; "
                f"ratio {ratio:.2f}"
            )

    def describe(ratio: float) -> str:
        return (
            f"{ratio:.2f} ({median(runner_rates):.2f} vs {median(bare_rates):.2f} img/s, "
            f"{median(runner_cpu):.0f} vs {median(bare_cpu):.0f} ms CPU/img; "
            f"{runs_text(ratios, '.2f')})"
        )

    figure, target = "4k: runner / bare (decode + write) throughput", f">= {TARGET}"
    return [
        median_row(figure, target, ratios, problems, describe=describe, meets=lambda r: r >= TARGET)
    ]
