"""The benchmark suite's smoke pass: ``python -m bench --quick overhead`` runs end to end.

Its figures are not checked (they depend on the machine); only that the machinery works: the
emulator started as a child and found by its printed URL, the runner's command line, the bare
client, the emulator's request records, the final table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_overhead_figure_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "overhead"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| figure" in done.stdout
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| overhead:")]
    assert "incomplete" not in row
    assert "error" not in row
    assert "WARNING" not in done.stdout
