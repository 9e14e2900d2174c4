"""Benchmarks of the core entry point, ``Run(jobs, options).execute()``, against the emulator.

Run as ``.venv/bin/python benchmarks/bench_run.py`` (about 4 minutes on 2 cores) or with
``--quick`` (under a minute, one repeat, fewer jobs: a smoke test, not figures to quote). It
prints three plain-text tables:

1. **Throughput vs the provider's limit.** The emulator answers every request after
   ``L = 0.2 s``, on its own thread and event loop (:class:`~runner.emulator.EmulatorThread`), so
   the runner on the main loop waits on the network as it would on a remote API. With ``C``
   requests in flight the best possible rate is ``C / L`` images/s; *efficiency* is the measured
   rate divided by that ideal. 1.00 means the runner adds nothing; what it loses is its own work
   per job (checkpoint commits, image decode and hashing, the atomic write), its fixed cost per
   run (opening the checkpoint, planning, the ledger at the end) and the emulator's work, which
   shares this process's GIL. With a fixed latency the workers move in lock-step rounds, so N
   jobs take at least ceil(N / C) rounds: ``max eff.`` is the efficiency that alone allows
   (0.89 for N = 200, C = 32); the gap between it and ``efficiency`` is the runner's. A gap that
   widens as ``C`` grows points at work done serially on the event loop. Each row is the median
   of 3 runs (``runs`` lists them all, to show the noise).

2. **Memory.** Each configuration runs in a fresh child process (``--child`` mode of this
   script) against an emulator in a separate process with no latency, so neither the parent's
   nor the server's memory is counted. ``after imports`` is the child's peak RSS before the run
   starts (Python, aiohttp, pandas, Pillow); ``peak`` is ``ru_maxrss`` at the end; ``added`` is
   what the run itself cost. Read (b)/(a): the same run with 5x the jobs should cost the same
   memory (ratio ~1), because workers pull jobs one at a time. (a) vs (d) shows the cost of
   concurrency. The emulator draws flat images that compress to a few KB even at 4K, so (a)-(d)
   carry tiny payloads (though the runner still decodes each image in full); (e) uses a
   stand-in server (``--serve-payload`` mode) that answers every request with one real-sized 4K
   PNG (half of it noise, ~12 MB, ~16 MB as base64 JSON) to show the cost of big payloads in
   flight.

3. **Rerun cost.** The 1000-job folder of (b) is run again with the same jobs: every image is
   found done after its sha256 is checked, so no request may go out. The table gives the wall
   time of that rerun next to the first run's and the number of requests the emulator received
   during it (it must be 0).

All jobs of one configuration share a prompt, so the emulator renders one image per size and
the figures measure the runner, not Pillow's encoder in the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from runner.client import ClientConfig
from runner.jobs import Job
from runner.retry import RetryConfig
from runner.run import Run, RunOptions, RunReport

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-key"
MODEL = "gpt-image-2-vip"
PROMPT = "a lighthouse on a cliff at dusk, benchmark"
SMALL, LARGE = "1280x544", "3840x2160"
LATENCY_S = 0.2
CONCURRENCIES = (1, 4, 16, 32)
SERVER_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Scale:
    throughput_jobs: int
    repeats: int
    memory_jobs: int
    many_jobs: int
    payload_jobs: int


FULL = Scale(throughput_jobs=200, repeats=3, memory_jobs=200, many_jobs=1000, payload_jobs=48)
QUICK = Scale(throughput_jobs=60, repeats=1, memory_jobs=60, many_jobs=300, payload_jobs=16)


@dataclass(frozen=True)
class ChildResult:
    """What one ``--child`` run reports on its stdout, as one JSON line."""

    wall_s: float
    rss_after_imports_kb: int
    peak_rss_kb: int
    succeeded: int
    done_before: int  # jobs the plan found already done (the rerun's case)
    todo: int


def make_jobs(count: int, size: str, tag: str) -> list[Job]:
    """``count`` distinct jobs; the same arguments give the same jobs, so a rerun matches."""
    return [
        Job(
            id=f"{tag}-{i:05d}",
            prompt=PROMPT,
            model=MODEL,
            size=size,
            response_format="b64_json",
            content_hash=f"{tag}-{size}-{i}",
        )
        for i in range(count)
    ]


def run_options(out_dir: Path, base_url: str, concurrency: int) -> RunOptions:
    client = ClientConfig(base_url=base_url, api_key=API_KEY, timeout_s=120.0)
    return RunOptions(
        out_dir=out_dir,
        client=client,
        retry=RetryConfig(max_attempts=3),
        concurrency=concurrency,
    )


def timed_run(jobs: list[Job], options: RunOptions) -> tuple[float, RunReport]:
    """Run ``jobs`` to the end, as the CLI does; return the wall time and the report."""
    started = time.perf_counter()
    report = asyncio.run(Run(jobs, options).execute())
    return time.perf_counter() - started, report


# --- servers in other processes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_stats(port: int) -> dict[str, Any]:
    """The server's books from ``GET /_emulator/stats``; ``requests`` counts API requests."""
    url = f"http://127.0.0.1:{port}/_emulator/stats"
    with urllib.request.urlopen(url, timeout=10.0) as response:
        stats: dict[str, Any] = json.load(response)
    return stats


@contextmanager
def server_process(args: Sequence[str], port: int) -> Iterator[str]:
    """Start a server subprocess listening on ``port``; yield its base URL once it answers."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"{' '.join(args)} exited: {stderr.strip()}")
            try:
                server_stats(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(args)} did not answer") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def emulator_process() -> Iterator[tuple[str, int]]:
    port = free_port()
    with server_process(["-m", "runner", "emulate", "--port", str(port)], port) as url:
        yield url, port


@contextmanager
def payload_process() -> Iterator[tuple[str, int]]:
    port = free_port()
    script = str(Path(__file__).resolve())
    with server_process([script, "--serve-payload", "--port", str(port)], port) as url:
        yield url, port


def realistic_png(width: int, height: int) -> bytes:
    """A PNG about as big as a real generated image: noise over half the frame (~1.5 B/px)."""
    image = Image.new("RGB", (width, height), (40, 90, 160))
    noise = Image.frombytes("RGB", (width, height // 2), os.urandom(width * (height // 2) * 3))
    image.paste(noise, (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def serve_payload(port: int) -> None:
    """``--serve-payload``: answer every generation with the same real-sized 4K PNG."""
    # Imported here, like the emulator, so that the measured --child processes never load it.
    from aiohttp import web

    width, height = (int(n) for n in LARGE.split("x"))
    png = realistic_png(width, height)
    b64 = base64.b64encode(png).decode("ascii")
    body = json.dumps({"created": int(time.time()), "data": [{"b64_json": b64}]}).encode()
    requests = 0

    async def generations(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": requests, "png_bytes": len(png), "response_bytes": len(body)}
        )

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/_emulator/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- child mode -----------------------------------------------------------------------------


def peak_rss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KB on Linux


def child_main(args: argparse.Namespace) -> None:
    """``--child``: one run in this fresh process; print a :class:`ChildResult` as JSON."""
    rss_after_imports_kb = peak_rss_kb()
    jobs = make_jobs(args.jobs, args.size, args.tag)
    options = run_options(Path(args.out), args.base_url, args.concurrency)
    wall_s, report = timed_run(jobs, options)
    result = ChildResult(
        wall_s=wall_s,
        rss_after_imports_kb=rss_after_imports_kb,
        peak_rss_kb=peak_rss_kb(),
        succeeded=report.ledger.totals.succeeded,
        done_before=report.plan.done,
        todo=len(report.plan.todo),
    )
    print(json.dumps(vars(result)))


def _force_fork() -> None:
    """Passed as ``preexec_fn`` only so that subprocess forks instead of using vfork.

    After vfork + exec, Linux folds the parent's peak RSS into the child's ``ru_maxrss``, so
    every child would report at least the peak of this (larger) process. It does nothing, so it
    takes no lock another thread might hold at the fork.
    """


def run_child(
    base_url: str, out_dir: Path, jobs: int, size: str, concurrency: int, tag: str
) -> ChildResult:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--jobs={jobs}",
        f"--size={size}",
        f"--concurrency={concurrency}",
        f"--tag={tag}",
        f"--base-url={base_url}",
        f"--out={out_dir}",
    ]
    completed = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_force_fork,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child run failed:\n{completed.stderr}")
    return ChildResult(**json.loads(completed.stdout.strip().splitlines()[-1]))


# --- the three benchmarks -------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def check_all_succeeded(label: str, succeeded: int, expected: int) -> None:
    if succeeded != expected:
        print(f"WARNING: {label}: {succeeded} of {expected} jobs succeeded; figures are suspect")


def bench_throughput(scale: Scale) -> None:
    # Imported here so that the --child processes, whose memory is measured, never load it.
    from runner.emulator import EmulatorConfig, EmulatorThread

    n = scale.throughput_jobs
    print(f"1. Throughput: {n} jobs of {SMALL}, emulator latency L = {LATENCY_S} s on its own")
    print(f"   thread; median of {scale.repeats} run(s) per row")
    print()
    rows = []
    with EmulatorThread(EmulatorConfig(latency_s=LATENCY_S)) as server:
        for concurrency in CONCURRENCIES:
            walls = []
            for repeat in range(scale.repeats):
                jobs = make_jobs(n, SMALL, f"tp{concurrency}r{repeat}")
                with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
                    options = run_options(Path(out), server.base_url, concurrency)
                    wall_s, report = timed_run(jobs, options)
                check_all_succeeded(f"C={concurrency}", report.ledger.totals.succeeded, n)
                walls.append(wall_s)
            wall_s = statistics.median(walls)
            rate = n / wall_s
            ideal = concurrency / LATENCY_S
            rounds = math.ceil(n / concurrency)
            rows.append(
                [
                    str(concurrency),
                    f"{wall_s:.2f}",
                    f"{rate:.1f}",
                    f"{ideal:.0f}",
                    f"{rate / ideal:.2f}",
                    f"{n / concurrency / rounds:.2f}",
                    " ".join(f"{w:.2f}" for w in walls),
                ]
            )
    headers = ["C", "wall s", "images/s", "ideal C/L", "efficiency", "max eff.", "runs (s)"]
    print_table(headers, rows)
    print()


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def bench_memory_and_rerun(scale: Scale) -> None:
    print("2. Peak RSS of a fresh child process per run (emulator in its own process, L = 0)")
    print()
    configs = {
        "a": (scale.memory_jobs, LARGE, 8),
        "b": (scale.many_jobs, LARGE, 8),
        "c": (scale.memory_jobs, SMALL, 8),
        "d": (scale.memory_jobs, LARGE, 32),
    }
    results: dict[str, ChildResult] = {}
    rows = []
    # (b)'s folder outlives its run: the rerun of section 3 goes over it again.
    with (
        tempfile.TemporaryDirectory(prefix="bench-run-") as many_out,
        emulator_process() as (base_url, port),
    ):
        for label, (jobs, size, concurrency) in configs.items():
            with tempfile.TemporaryDirectory(prefix="bench-run-") as own_out:
                out = Path(many_out if label == "b" else own_out)
                result = run_child(base_url, out, jobs, size, concurrency, f"mem-{label}")
            check_all_succeeded(f"({label})", result.succeeded, jobs)
            results[label] = result
            rows.append(memory_row(label, jobs, size, concurrency, "flat (emulator)", result))

        requests_before = server_stats(port)["requests"]
        rerun = run_child(base_url, Path(many_out), scale.many_jobs, LARGE, 8, "mem-b")
        rerun_requests = server_stats(port)["requests"] - requests_before

    with (
        tempfile.TemporaryDirectory(prefix="bench-run-") as payload_out,
        payload_process() as (base_url, port),
    ):
        jobs = scale.payload_jobs
        result = run_child(base_url, Path(payload_out), jobs, LARGE, 8, "mem-e")
        check_all_succeeded("(e)", result.succeeded, jobs)
        png_mb = server_stats(port)["png_bytes"] / 1e6
        rows.append(memory_row("e", jobs, LARGE, 8, f"{png_mb:.1f} MB PNG (stand-in)", result))

    print_table(
        ["", "jobs", "size", "C", "payload", "after imports MB", "peak MB", "added MB", "wall s"],
        rows,
    )
    print()
    ratio = results["b"].peak_rss_kb / results["a"].peak_rss_kb
    print(f"(b)/(a) peak RSS ratio: {ratio:.2f}  (~1 when memory does not grow with the jobs)")
    print()

    first = results["b"]
    print(f"3. Rerun of the {scale.many_jobs}-job folder of (b), same jobs, nothing left to do")
    print()
    print_table(
        ["run", "wall s", "jobs done before", "requests sent", "peak MB"],
        [
            ["first", f"{first.wall_s:.2f}", str(first.done_before), "-", mb(first.peak_rss_kb)],
            [
                "rerun",
                f"{rerun.wall_s:.2f}",
                str(rerun.done_before),
                str(rerun_requests),
                mb(rerun.peak_rss_kb),
            ],
        ],
    )
    print()
    verdict = "OK" if rerun_requests == 0 and rerun.done_before == scale.many_jobs else "FAILED"
    print(f"zero new requests and every job verified done: {verdict}")


def memory_row(
    label: str, jobs: int, size: str, concurrency: int, payload: str, result: ChildResult
) -> list[str]:
    added_kb = result.peak_rss_kb - result.rss_after_imports_kb
    return [
        f"({label})",
        str(jobs),
        size,
        str(concurrency),
        payload,
        mb(result.rss_after_imports_kb),
        mb(result.peak_rss_kb),
        mb(added_kb),
        f"{result.wall_s:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer jobs, one repeat")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-payload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    if args.serve_payload:
        serve_payload(args.port)
        return

    scale = QUICK if args.quick else FULL
    started = time.perf_counter()
    print(f"image-runner run benchmark{' (--quick)' if args.quick else ''}")
    print(f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    )
    print()
    bench_throughput(scale)
    bench_memory_and_rerun(scale)
    print()
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
