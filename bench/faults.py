"""Faults: a run that meets the provider's everyday trouble against the same run without it.

200 jobs at concurrency 16, answers in 0.2-0.4 s, no rate limit. The faulty run's emulator
gives 20% of requests a fault drawn from its default mix (429s with a Retry-After of 1 s, 5xx,
resets, dropped connections, truncated and malformed bodies, slow answers: ``python -m runner
emulate --help``), seeded per repeat; the clean run's gives none. The figure is the faulty
run's request phase (first request received to last answered, from the emulator's books) over
the clean run's. What it cannot avoid: the retries' backoff (0.5 s, then 1 s, 2 s ...; a 429's
Retry-After when longer) and the slow answers' 2 s. What it must not add: a scattered 429
taken for the rate limit, which used to pause every worker for the Retry-After and hold the
pace at some 700/min for the rest of the run, 8-15 times a naive script's time. Target: <= 2.
"""

from __future__ import annotations

import shutil

from bench.emulator import EmulatorProcess, Phase, phase
from bench.figures import Options, Row, median_row, runs_text, say
from bench.manifests import write_csv
from bench.procs import Finished, run_runner

SIZE = "1280x544"
CONCURRENCY = 16
LATENCY = ["--latency", "0.2", "--latency-jitter", "0.2"]
FAULT_RATE = 0.2
RETRY_AFTER_S = 1.0
TARGET = 2.0
TIMEOUT_S = 300.0


def measure(options: Options) -> list[Row]:
    jobs = 60 if options.quick else 200
    say(
        f"faults: {jobs} jobs of {SIZE}, concurrency {CONCURRENCY}, answers in 0.2-0.4 s; "
        f"{FAULT_RATE:.0%} of requests faulty (Retry-After {RETRY_AFTER_S:g} s) against none"
    )
    manifest = write_csv(options.work_dir / "faults.csv", jobs, SIZE)
    ratios: list[float] = []
    problems: list[str] = []
    for repeat in range(options.repeat):
        spans: list[float] = []
        complete = True
        for faulty in (False, True):
            extra = [*LATENCY]
            if faulty:
                extra += ["--fault-rate", str(FAULT_RATE), "--retry-after", f"{RETRY_AFTER_S:g}"]
                extra += ["--seed", str(101 + repeat)]
            with EmulatorProcess(extra) as emulator:
                out_dir = options.work_dir / f"faults-{repeat}-{int(faulty)}"
                runner = run_runner(
                    manifest,
                    out_dir,
                    emulator.base_url,
                    concurrency=CONCURRENCY,
                    timeout_s=TIMEOUT_S,
                )
                records = emulator.records_since(0)
            shutil.rmtree(out_dir, ignore_errors=True)
            got = phase(records)
            spans.append(got.span_s)
            faults = sum(1 for r in records if r["fault"] not in (None, "ok", "rate_limited"))
            limited = sum(1 for r in records if r["status"] == 429)
            say(
                f"  run {repeat + 1}, {'faulty' if faulty else 'clean '}: {got.ok} images in "
                f"{got.span_s:.1f} s of requests, {got.requests} requests ({faults} faulty, "
                f"{limited} answered 429); {runner.wall_s:.1f} s in all"
            )
            complete = _complete(problems, runner, got, jobs, "faulty" if faulty else "clean")
        ratio = spans[1] / spans[0] if spans[0] else 0.0
        if complete:
            ratios.append(ratio)
        say(f"  run {repeat + 1}: faulty / clean = {ratio:.2f}")

    def describe(ratio: float) -> str:
        return f"{ratio:.2f} ({runs_text(ratios, '.2f')})"

    figure = f"faults: {FAULT_RATE:.0%} faulty requests, wall time / without faults"
    target = f"<= {TARGET:g}"
    return [
        median_row(figure, target, ratios, problems, describe=describe, meets=lambda r: r <= TARGET)
    ]


def _complete(problems: list[str], runner: Finished, got: Phase, jobs: int, name: str) -> bool:
    """Whether the run made every image; if not, why, in ``problems``."""
    if runner.ok and got.ok >= jobs:
        return True
    problems.append(f"{name}: {got.ok} images for {jobs} jobs, {runner.failure()}")
    return False
