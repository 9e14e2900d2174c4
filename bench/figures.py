"""What every figure shares: its options, the rows it reports, and the arithmetic of repeats.

A figure is a module with a ``measure(options) -> list[Row]`` function. It prints a line per run
as it goes (:func:`say`), so a slow figure shows it is alive, and returns one :class:`Row` per
target: the median over its repeats, the target, and whether the one meets the other.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000


@dataclass(frozen=True)
class Options:
    """How much work each figure does, and where it may write."""

    quick: bool  # a smoke pass: fewer jobs, figures not to quote
    repeat: int  # runs per measurement; the table shows their median
    work_dir: Path  # scratch space for manifests and output folders, removed at the end


@dataclass(frozen=True)
class Row:
    """One line of the final table."""

    figure: str
    measured: str
    target: str
    meets: bool | None  # None: nothing could be measured


def say(text: str) -> None:
    print(text, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def runs_text(values: Sequence[float], fmt: str) -> str:
    """``"runs: 1.02, 0.98, 1.00"``: every run behind a median, to show the noise."""
    return "runs: " + ", ".join(format(value, fmt) for value in values)


def warn(problems: Sequence[str]) -> str:
    """Print each problem; return the note the table adds, or ``""`` when there were none.

    A run that did not finish all its jobs (the runner failed or crashed) is no measurement of
    speed or memory: the figures leave it out of their medians and say so here.
    """
    for problem in problems:
        say(f"  WARNING {problem}")
    return f"; {len(problems)} incomplete run(s) left out" if problems else ""


def no_complete_run(figure: str, target: str, problems: Sequence[str]) -> Row:
    return Row(figure, f"no complete run: {problems[-1]}"[:160], target, None)


def median_row(
    figure: str,
    target: str,
    values: Sequence[float],
    problems: Sequence[str],
    *,
    describe: Callable[[float], str],
    meets: Callable[[float], bool],
) -> Row:
    """The row of a figure measured once per complete run: ``describe`` and ``meets`` get the
    median; runs left out are noted, and no complete run at all is said so."""
    note = warn(problems)
    if not values:
        return no_complete_run(figure, target, problems)
    value = median(values)
    return Row(figure, describe(value) + note, target, meets(value))
