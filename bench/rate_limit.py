"""Rate limit: how close the runner runs to a limit the provider does not announce, and how
few requests it wastes finding it.

The emulator enforces a token bucket of 300 requests a minute with a burst of 10 and answers a
request over it with a bare 429: no ``retry-after``, no ``x-ratelimit-*`` headers, so the
runner has to find the rate by itself (its adaptive limiter; no ``--rpm`` is given). Answers
take 0.2-0.4 s. It runs 400 jobs, about 80 s, at concurrency 32 and again at 100: without a
slow start, the first ``--concurrency`` requests would all go out before the first 429 came
back (at 100, some 90 429s at once).

Over a request phase of ``T`` seconds the bucket admits at most ``burst + rate * T`` requests;
the figure is the runner's successful requests over that bound (1.0: every request the limit
allowed was made), and the share of all its requests that were answered 429. A fresh emulator
per run starts each with a full bucket. Targets, at each concurrency: >= 0.9 of the allowed
rate with <= 3% of requests answered 429.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.emulator import EmulatorProcess, phase
from bench.figures import Options, Row, median, runs_text, say
from bench.manifests import write_csv
from bench.procs import run_runner

SIZE = "1280x544"
RATE_PER_MIN = 300
BURST = 10
LATENCY_S = 0.2
JITTER_S = 0.2  # answers take 0.2-0.4 s
CONCURRENCIES = (32, 100)
TARGET_SHARE = 0.9
TARGET_429_SHARE = 0.03
TIMEOUT_S = 400.0


def measure(options: Options) -> list[Row]:
    jobs = 60 if options.quick else 400
    manifest = write_csv(options.work_dir / "rate-limit.csv", jobs, SIZE)
    rows: list[Row] = []
    for concurrency in CONCURRENCIES:
        say(
            f"rate limit: {jobs} jobs of {SIZE}, concurrency {concurrency}, against a silent "
            f"limit of {RATE_PER_MIN} requests/min (burst {BURST}), answers in "
            f"{LATENCY_S:g}-{LATENCY_S + JITTER_S:g} s"
        )
        rows += _at(options, manifest, jobs, concurrency)
    return rows


def _at(options: Options, manifest: Path, jobs: int, concurrency: int) -> list[Row]:
    shares: list[float] = []
    refused_shares: list[float] = []
    problems: list[str] = []
    for repeat in range(options.repeat):
        limit = ["--rate-limit", str(RATE_PER_MIN), "--burst", str(BURST)]
        limit += ["--latency", f"{LATENCY_S:g}", "--latency-jitter", f"{JITTER_S:g}"]
        with EmulatorProcess(limit) as emulator:
            out_dir = options.work_dir / f"rate-limit-{concurrency}-{repeat}"
            runner = run_runner(
                manifest,
                out_dir,
                emulator.base_url,
                concurrency=concurrency,
                timeout_s=TIMEOUT_S,
            )
            got = phase(emulator.records_since(0))
        shutil.rmtree(out_dir, ignore_errors=True)
        if not runner.ok or got.ok != jobs:
            problems.append(f"{got.ok} of {jobs} images, {runner.failure()}")
        allowed = BURST + RATE_PER_MIN / 60 * got.span_s
        shares.append(got.ok / allowed if allowed else 0.0)
        refused_shares.append(got.rate_limited / got.requests if got.requests else 0.0)
        say(
            f"  run {repeat + 1}: {got.ok} images in {got.span_s:.1f} s of requests "
            f"({got.ok_per_s * 60:.0f}/min), {shares[-1]:.3f} of the allowed; "
            f"{got.rate_limited} of {got.requests} requests answered 429 "
            f"({refused_shares[-1]:.1%}); {runner.wall_s:.1f} s in all"
        )
    # Here a run that failed jobs still measured something: how the runner met the limit.
    for problem in problems:
        say(f"  WARNING {problem}")
    note = f"; {len(problems)} run(s) did not finish every job" if problems else ""
    share, refused = median(shares), median(refused_shares)
    return [
        Row(
            f"rate limit, C={concurrency}: sustained / allowed rate",
            f"{share:.3f} of {RATE_PER_MIN}/min ({runs_text(shares, '.3f')}){note}",
            f">= {TARGET_SHARE}",
            share >= TARGET_SHARE and not problems,
        ),
        Row(
            f"rate limit, C={concurrency}: requests answered 429",
            f"{refused:.1%} ({runs_text(refused_shares, '.1%')})",
            f"<= {TARGET_429_SHARE:.0%}",
            refused <= TARGET_429_SHARE,
        ),
    ]
