"""How a run ends when it is told to stop, or when its output folder fails it: the real command
in a subprocess against an emulator on a loopback port, with real signals, real file
permissions and a real file-size limit.

Every ending is checked the same way: the exit code, no traceback on stderr, and the books
(results and ledger) written where the run got that far. (That the lock is released on every
path is checked in-process, in test_store.py: a process that exits frees its flock anyway.)"""

from __future__ import annotations

import csv
import ctypes
import os
import resource
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.emulator import EmulatorConfig, EmulatorThread
from runner.store.schema import DB_NAME
from tests.conftest import TEST_KEY
from tests.test_cli import cli, env, small_manifest
from tests.test_store import newer_checkpoint, older_checkpoint, schema

BIG_MANIFEST_ROWS = 200_000


@pytest.fixture
def server() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(api_key=TEST_KEY)) as thread:
        yield thread


def run(
    *args: str | Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args),
        env=env(PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
    )


def start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def planned_jobs(out: Path) -> int:
    """Jobs the run has recorded so far, read beside it (0 while it creates its checkpoint)."""
    try:
        db = sqlite3.connect(f"{(out / DB_NAME).absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def big_manifest(tmp_path: Path, rows: int = BIG_MANIFEST_ROWS) -> Path:
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as f:
        lines = csv.writer(f)
        lines.writerow(["id", "prompt", "size"])
        lines.writerows((f"job-{i}", f"picture {i}", "1280x544") for i in range(rows))
    return path


def assert_ended_cleanly(done: subprocess.CompletedProcess[str] | subprocess.Popen[str]) -> None:
    stderr = done.stderr if isinstance(done.stderr, str) else ""
    assert "Traceback" not in stderr, stderr


# --- an output folder that cannot be written (item 10) ---------------------------------------


def without_root_privilege() -> None:
    """Root writes through any permission (CAP_DAC_OVERRIDE): the child drops that capability
    from its bounding set before it executes, so it meets file permissions as a user does."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override = 24, 1
    if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.parametrize("read_only", ["folder", "images", "checkpoint"])
def test_an_output_folder_that_cannot_be_written_exits_2_before_sending(
    tmp_path: Path, server: EmulatorThread, read_only: str
) -> None:
    out = tmp_path / "out"
    base = ("--out", out, "--base-url", server.base_url, "--no-progress")
    if read_only == "checkpoint":
        first = run("run", small_manifest(tmp_path, 1), *base)
        assert first.returncode == 0, first.stderr
    target = {"folder": out, "images": out / "images", "checkpoint": out / DB_NAME}[read_only]
    target.parent.mkdir(parents=True, exist_ok=True)
    if read_only != "checkpoint":
        target.mkdir(exist_ok=True)
    sent_before = len(server.emulator.requests)
    target.chmod(0o444 if read_only == "checkpoint" else 0o555)
    try:
        done = run("run", small_manifest(tmp_path, 3), *base, preexec_fn=without_root_privilege)
    finally:
        target.chmod(0o644 if read_only == "checkpoint" else 0o755)
    assert done.returncode == 2, done.stdout + done.stderr
    assert_ended_cleanly(done)
    assert str(target) in done.stderr
    assert len(server.emulator.requests) == sent_before


# --- a database error during the run (item 10) ------------------------------------------------


def file_size_limit(size_bytes: int) -> Callable[[], None]:
    """A real "disk full" for the child alone: with RLIMIT_FSIZE, a write past ``size_bytes``
    fails with EFBIG (Python ignores SIGXFSZ), which SQLite reports as a disk I/O error. The
    write-ahead log is the biggest file a small run writes; images, results and ledger stay
    far below the limit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, size_bytes))

    return limit


def test_a_database_error_mid_run_stops_it_with_exit_3_and_the_books(
    tmp_path: Path, server: EmulatorThread
) -> None:
    out = tmp_path / "out"
    manifest = small_manifest(tmp_path, 80)
    args = ("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    done = run(*args, "--concurrency", "4", preexec_fn=file_size_limit(400_000))
    assert done.returncode == 3, done.stdout + done.stderr
    assert_ended_cleanly(done)
    assert "stopped:   cannot write the checkpoint" in done.stdout
    assert 0 < len(server.emulator.requests) < 80
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 80 and (results["status"] == "pending").any()
    assert (out / "ledger.csv").is_file()

    again = run(*args)  # with room again, the rerun finishes
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(list((out / "images").iterdir())) == 80


def test_a_database_error_before_any_request_exits_2(
    tmp_path: Path, server: EmulatorThread
) -> None:
    """The checkpoint is created (about 60 kB of log), then planning 2,000 jobs fills it."""
    out = tmp_path / "out"
    done = run(
        "run",
        small_manifest(tmp_path, 2000),
        "--out",
        out,
        "--base-url",
        server.base_url,
        "--no-progress",
        preexec_fn=file_size_limit(100_000),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert_ended_cleanly(done)
    assert str(out / DB_NAME) in done.stderr
    assert server.emulator.requests == []


# --- checkpoints of other versions (item 13d) -------------------------------------------------


@pytest.mark.parametrize("command", ["status", "report", "export"])
@pytest.mark.parametrize("written_by", ["older", "newer"])
def test_read_only_commands_name_a_checkpoint_of_another_version(
    tmp_path: Path, command: str, written_by: str
) -> None:
    out = tmp_path / "out"
    if written_by == "older":
        older_checkpoint(out, 2)
    else:
        newer_checkpoint(out)
    extra = (tmp_path / "dataset",) if command == "export" else ()
    done = run(command, out, *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert_ended_cleanly(done)
    assert f"error: {out} was written by a" in done.stderr
    assert f"{written_by} image-runner" in done.stderr
    if written_by == "older":
        assert "run `image-runner run` on it once to upgrade it" in done.stderr


def test_a_run_refuses_a_checkpoint_of_a_newer_version(
    tmp_path: Path, server: EmulatorThread
) -> None:
    out = tmp_path / "out"
    newer_checkpoint(out)
    before = schema(out)
    done = run("run", small_manifest(tmp_path), "--out", out, "--base-url", server.base_url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert_ended_cleanly(done)
    assert "newer image-runner" in done.stderr
    assert schema(out) == before
    assert server.emulator.requests == []


# --- signals (item 14) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"), [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM)]
)
def test_signals_during_planning_of_a_big_manifest_are_answered_at_once(
    tmp_path: Path, server: EmulatorThread, first: signal.Signals, second: signal.Signals
) -> None:
    out = tmp_path / "out"
    proc = start(
        "run", big_manifest(tmp_path), "--out", out, "--base-url", server.base_url, "--no-progress"
    )
    wait_for(lambda: planned_jobs(out) > 0)  # planning has committed its first batch
    signalled = time.monotonic()
    proc.send_signal(first)
    time.sleep(0.2)
    proc.send_signal(second)
    stdout, stderr = proc.communicate(timeout=60)
    ended_s = time.monotonic() - signalled
    assert proc.returncode == 3, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert ended_s < 10  # generous: the books of 200,000 jobs take about 2 s to write
    assert planned_jobs(out) < BIG_MANIFEST_ROWS  # planning stopped, it did not run to its end
    assert server.emulator.requests == []
    assert sum(1 for _ in (out / "results.csv").open()) == BIG_MANIFEST_ROWS + 1
    assert (out / "ledger.csv").is_file()


def test_two_quick_sigterms_during_a_slow_run(tmp_path: Path) -> None:
    with EmulatorThread(EmulatorConfig(api_key=TEST_KEY, latency_s=2.0)) as server:
        out = tmp_path / "out"
        proc = start(
            "run",
            small_manifest(tmp_path, 12),
            "--out",
            out,
            "--base-url",
            server.base_url,
            "--no-progress",
            "--concurrency",
            "4",
        )
        # The emulator books a request after its latency: 4 booked means 4 more go out now.
        wait_for(lambda: len(server.emulator.requests) >= 4)
        time.sleep(0.5)  # they are mid-flight, for another 1.5 s
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "stopped:   at once" in stdout
    ledger = pd.read_csv(out / "ledger.csv")
    assert (ledger["billing"] == "possible").sum() >= 1  # the dropped requests
    assert len(pd.read_csv(out / "results.csv")) == 12


def writing_results(out: Path) -> bool:
    """Whether the results are being written: their temp file is there."""
    return any(
        "results." in p.name and p.name not in ("results.csv", "results.parquet")
        for p in out.iterdir()
    )


def test_a_second_signal_while_the_books_are_written_skips_only_the_report(
    tmp_path: Path, server: EmulatorThread
) -> None:
    out = tmp_path / "out"
    proc = start(
        "run",
        big_manifest(tmp_path),
        "--out",
        out,
        "--base-url",
        server.base_url,
        "--no-progress",
        "--concurrency",
        "2",
    )
    wait_for(lambda: len(server.emulator.requests) >= 2)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: writing_results(out))  # 200,000 rows: about 2 s
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "stopped:   at once" in stdout
    assert sum(1 for _ in (out / "results.csv").open()) == BIG_MANIFEST_ROWS + 1
    assert len(pd.read_csv(out / "ledger.csv")) == len(server.emulator.bills)
    assert not (out / "report.html").exists()  # the slow part a second signal skips


def test_the_grace_period_ends_with_the_run(tmp_path: Path) -> None:
    """After a Ctrl-C the run finishes its requests well within the grace period and then
    writes its books and report; the grace timer must not fire after that, into whatever the
    process does then (with --emulate: stopping the emulator)."""
    out = tmp_path / "out"
    done_before = run("run", small_manifest(tmp_path, 300, prefix="a"), "--emulate", "--out", out)
    assert done_before.returncode == 0, done_before.stderr
    jobs = [{"id": f"b-{i}", "prompt": f"more {i}", "size": "1280x544"} for i in range(2000)]
    manifest = tmp_path / "more.csv"
    with manifest.open("w", newline="") as f:
        lines = csv.DictWriter(f, ["id", "prompt", "size"])
        lines.writeheader()
        lines.writerows(jobs)
    proc = start("run", manifest, "--emulate", "--out", out, "--no-progress", "--grace", "0.2")
    wait_for(lambda: planned_jobs(out) >= 2300)
    time.sleep(0.3)  # requests are going out
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "stopped:   interrupted by SIGINT" in stdout  # gracefully: not "at once"
