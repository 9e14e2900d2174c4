"""``python -m bench [FIGURE ...] [--quick] [--repeat N]``: run the figures, print one table.

Figures, always run in this order: ``overhead``, ``latency``, ``4k``, ``rate-limit``,
``faults``, ``memory``, ``scale``, ``report``, ``scale-out``, ``breakdown`` (all when none is
named). ``breakdown`` comes last: it runs the runner inside this process, and Linux counts a
parent's memory into the peak RSS of every child it starts after that. ``--quick`` is a smoke
pass with fewer jobs and one run each: its numbers are not to be quoted. A figure that breaks is
reported in the table and the others still run. The exit code is 0 whenever the suite ran,
whether targets were met or not.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    breakdown,
    faults,
    fourk,
    latency,
    memory,
    overhead,
    rate_limit,
    report,
    scale,
    scaleout,
)
from bench.figures import MB, Options, Row, say

FIGURES: dict[str, Callable[[Options], list[Row]]] = {
    "overhead": overhead.measure,
    "latency": latency.measure,
    "4k": fourk.measure,
    "rate-limit": rate_limit.measure,
    "faults": faults.measure,
    "memory": memory.measure,
    "scale": scale.measure,
    "report": report.measure,
    "scale-out": scaleout.measure,
    "breakdown": breakdown.measure,  # last: see the docstring
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "figures", nargs="*", metavar="FIGURE", help=f"default: all of {', '.join(FIGURES)}"
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke pass, one run each")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.figures if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figures {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    names = [name for name in FIGURES if name in args.figures or not args.figures]
    repeat = args.repeat or (1 if args.quick else 3)
    started_s = time.perf_counter()
    say(f"image-runner benchmarks{' (--quick: not figures to quote)' if args.quick else ''}")
    say(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; median of {repeat} run(s) each"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="image-runner-bench-") as work_dir:
        options = Options(quick=args.quick, repeat=repeat, work_dir=Path(work_dir))
        for name in names:
            figure_started_s = time.perf_counter()
            say("")
            try:
                rows += FIGURES[name](options)
            except Exception as exc:  # a broken figure must not hide the others' results
                traceback.print_exc()
                rows.append(Row(name, f"error: {exc!r}"[:160], "-", None))
            say(f"  ({name}: {time.perf_counter() - figure_started_s:.0f} s)")
    say("")
    _print_table(rows)
    say("")
    # Linux counts this process's memory into each child's peak as the child starts.
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    say(
        f"wall time: {time.perf_counter() - started_s:.0f} s; this process's peak RSS "
        f"{floor_mb:.0f} MB (no child's peak RSS can read lower)"
    )
    return 0


def _print_table(rows: Sequence[Row]) -> None:
    header = ("figure", "measured", "target", "meets?")
    cells = [
        (row.figure, row.measured, row.target, {True: "yes", False: "NO", None: "n/a"}[row.meets])
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    for line in [header, tuple("-" * width for width in widths), *cells]:
        say("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")


if __name__ == "__main__":
    sys.exit(main())
