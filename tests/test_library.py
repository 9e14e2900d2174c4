"""The Python API as a notebook or a program uses it: ``runner.run`` and ``runner.arun`` on
records, DataFrames and manifests, the report, interrupts, ``runner.Emulator``; and the README's
example, run as it is written there."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import runner
from runner import library
from runner.cli.main import main
from runner.library import INTERRUPTED
from tests.conftest import write_manifest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_MARKER = "<!-- example: python-api"
KEY_VARIABLES = ("IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY", "IMAGE_RUNNER_BASE_URL")


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*KEY_VARIABLES, "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def records(count: int, prefix: str = "fox") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "prompt": f"{prefix} {i}", "size": "1280x544"} for i in range(count)
    ]


def readme_example() -> tuple[str, str]:
    """The README's example: its code, and the output shown after it."""
    text = README.read_text()
    start = text.index("```python\n", text.index(EXAMPLE_MARKER)) + len("```python\n")
    end = text.index("```\n", start)
    shown = text.index("```console\n", end) + len("```console\n")
    return text[start:end], text[shown : text.index("```\n", shown)]


def test_the_readme_example_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, shown = readme_example()
    namespace: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)

    def timeless(text: str) -> str:
        return re.sub(r"wall_s=[0-9.]+", "wall_s=_", text)

    assert timeless(printed.getvalue()) == timeless(shown)  # the README shows a real run

    report, again = namespace["report"], namespace["again"]
    assert (report.succeeded, report.failed, report.pending) == (20, 0, 0)
    assert report.requests == 20 and report.exit_code == 0 and report.stop_reason is None
    assert again.requests == 0 and again.succeeded == 20
    assert len(namespace["emu"].requests) == 20  # the emulator's own count: none on the rerun
    results, ledger = namespace["results"], namespace["ledger"]
    assert isinstance(results, pd.DataFrame) and len(results) == 20
    assert set(results["status"]) == {"succeeded"}
    assert isinstance(ledger, pd.DataFrame) and len(ledger) == 20
    assert ledger["cost_usd"].sum() == pytest.approx(0.60)

    # The invalid row's error is what `image-runner validate` prints for it in a manifest,
    # but for the name of the source and the manifest's line number.
    Path("dawn.csv").write_text("prompt,size\na fox at dawn,2048x2084\n")
    cli_printed = io.StringIO()
    with contextlib.redirect_stderr(cli_printed):
        assert main(["validate", "dawn.csv"]) == 2
    expected = cli_printed.getvalue().replace("dawn.csv:", "jobs:").replace(" (line 2)", "")
    assert printed.getvalue().endswith(expected)
    assert not Path("output/dawn").exists()


async def test_run_works_where_an_event_loop_already_runs(tmp_path: Path) -> None:
    asyncio.get_running_loop()  # as in Jupyter: this thread's loop is running
    with runner.Emulator() as emu:
        report = runner.run(records(3), out=tmp_path / "out", base_url=emu.url, api_key=emu.api_key)
    assert (report.succeeded, report.requests, report.exit_code) == (3, 3, 0)
    assert len(emu.requests) == 3


async def test_arun_runs_on_the_callers_loop(tmp_path: Path) -> None:
    async with runner.Emulator() as emu:
        report = await runner.arun(
            pd.DataFrame(records(4)), tmp_path / "out", base_url=emu.url, api_key=emu.api_key
        )
        again = await runner.arun(records(4), tmp_path / "out", emulate=True)
    assert (report.succeeded, report.requests) == (4, 4)
    assert (again.succeeded, again.requests) == (4, 0)
    assert len(report.results()) == 4 and len(report.ledger()) == 4


async def test_run_refuses_an_emulator_the_loop_it_would_block_serves(tmp_path: Path) -> None:
    """``async with runner.Emulator()`` then the synchronous run() in one notebook cell: run()
    blocks the loop the emulator answers on. It used to send anyway, every request timing out
    (each a possible charge); now it refuses, before anything is sent."""
    async with runner.Emulator() as emu:
        with pytest.raises(runner.RunnerError, match=r"with runner.Emulator\(\)`, or `await"):
            runner.run(
                records(2),
                out=tmp_path / "out",
                base_url=emu.url + "/",
                api_key=emu.api_key,
                timeout_s=0.5,
                max_attempts=1,
            )
        assert emu.requests == []
        report = await runner.arun(records(2), tmp_path / "out", base_url=emu.url, api_key="k")
        assert report.succeeded == 2
    with runner.Emulator() as threaded:  # served from a thread of its own: fine
        again = runner.run(records(3), out=tmp_path / "out", base_url=threaded.url, api_key="k")
        assert (again.succeeded, again.requests) == (3, 1)


def interrupt_when(
    ready: Callable[[], bool], *, times: int = 1, after_s: float = 0.0
) -> threading.Thread:
    """A thread that sends this process SIGINT (a Ctrl-C, a notebook's interrupt) ``times``
    times, 0.3 s apart, ``after_s`` after ``ready()``."""

    def send() -> None:
        deadline = time.monotonic() + 30
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(after_s)
        for i in range(times):
            if i:
                time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_an_interrupt_stops_the_run_gracefully_and_run_returns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with runner.Emulator(latency_s=0.3) as emu:
        sender = interrupt_when(lambda: len(emu.requests) >= 2)
        report = runner.run(
            records(12), out=out, base_url=emu.url, api_key=emu.api_key, concurrency=2
        )
        sender.join()
        assert report.stop_reason == INTERRUPTED
        assert report.exit_code == 3 and not report.details.cancelled
        results = report.results()
        assert len(results) == 12
        assert 2 <= (results["status"] == "succeeded").sum() < 12
        assert set(results["status"]) == {"succeeded", "pending"}
        # Gracefully: the requests in flight were waited for, so nothing is a possible charge.
        assert set(report.ledger()["billing"]) == {"confirmed"}

        again = runner.run(records(12), out=out, base_url=emu.url, api_key=emu.api_key)
        assert (again.succeeded, again.stop_reason, again.exit_code) == (12, None, 0)
        prompts = [record.prompt for record in emu.requests]
        assert sorted(prompts) == sorted(f"fox {i}" for i in range(12))  # none sent twice


def test_a_second_interrupt_stops_the_run_at_once(tmp_path: Path) -> None:
    with runner.Emulator(latency_s=2.0) as emu:
        # The emulator records a request once answered: 0.5 s after the first 4 were, the
        # next 4 are surely in flight, for 1.5 s more.
        sender = interrupt_when(lambda: len(emu.requests) >= 4, times=2, after_s=0.5)
        report = runner.run(
            records(12),
            out=tmp_path / "out",
            base_url=emu.url,
            api_key=emu.api_key,
            concurrency=4,
        )
        sender.join()
    assert report.stop_reason == INTERRUPTED and report.details.cancelled
    assert len(report.results()) == 12
    assert "possible" in set(report.ledger()["billing"])  # the dropped requests


def raising_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "handler", [signal.default_int_handler, raising_keyboard_interrupt], ids=["python", "own"]
)
def test_an_interrupt_inside_the_handling_of_the_last_still_ends_the_run_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handler: Callable[[int, object], None]
) -> None:
    """The second interrupt lands while the first is being handled (here: as it is logged).
    It used to escape run() as a KeyboardInterrupt, the run going on in its thread, the
    folder locked. Now it stops the run at once, and run() returns once the run has ended;
    with Python's own handler or one of the program's, which raises KeyboardInterrupt."""
    warnings: list[str] = []

    def warning(message: str, *args: object) -> None:
        warnings.append(message)
        if len(warnings) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in this thread: here

    monkeypatch.setattr(library.log, "warning", warning)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        with runner.Emulator(latency_s=2.0) as emu:
            sender = interrupt_when(lambda: len(emu.requests) >= 2, after_s=0.2)
            report = runner.run(
                records(12),
                out=tmp_path / "out",
                base_url=emu.url,
                api_key=emu.api_key,
                concurrency=2,
            )
            sender.join()
            assert not [t for t in threading.enumerate() if t.name == "image-runner"]
            assert report.stop_reason == INTERRUPTED and report.details.cancelled
            assert signal.getsignal(signal.SIGINT) is handler  # put back
            # The folder is free: another run takes it, and finishes the rest.
            again = runner.run(records(12), out=tmp_path / "out", emulate=True)
            assert (again.succeeded, again.exit_code) == (12, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert any("stopping at once" in message for message in warnings)


def test_a_manifest_path_defaults_out_as_the_cli_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, records(2))
    report = runner.run("manifest.yaml", emulate=True)
    assert report.out == Path("output/manifest")
    assert report.succeeded == 2
    assert (tmp_path / "output" / "manifest" / "results.parquet").is_file()
    # A manifest loaded beforehand, and Options with keyword overrides.
    loaded = runner.load_manifest(manifest)
    plan = runner.run(loaded, tmp_path / "o2", options=runner.Options(emulate=True), dry_run=True)
    assert (plan.dry_run, plan.pending, plan.requests, plan.exit_code) == (True, 2, 0, 0)
    assert not (tmp_path / "o2").exists()  # a dry run writes nothing
    with pytest.raises(runner.RunnerError, match="a dry run writes no results"):
        plan.results()


def test_the_plan_still_reads_its_jobs_after_run_returns(tmp_path: Path) -> None:
    """run() used to close the jobs it read: the report's plan.todo then failed (IndexError,
    once past the spool's first chunk of 2,048 jobs)."""
    rows = [{"id": f"j{i}", "prompt": f"fox {i}", "size": "1280x544"} for i in range(3000)]
    plan = runner.run(rows, out=tmp_path / "out", dry_run=True)
    todo = plan.details.plan.todo
    assert len(todo) == 3000 and todo[2999].id == "j2999"
    assert [job.id for job in todo] == [row["id"] for row in rows]
    report = runner.run(records(3), out=tmp_path / "o2", emulate=True)
    assert [job.prompt for job in report.details.plan.todo] == ["fox 0", "fox 1", "fox 2"]


def test_an_invalid_row_raises_before_anything_is_written(tmp_path: Path) -> None:
    rows = [*records(2), {"prompt": "x", "size": "1280x544", "n": 2}]
    with pytest.raises(runner.ManifestError) as caught:
        runner.run(rows, out=tmp_path / "out", emulate=True)
    assert caught.value.issues[0].row.startswith("row 3")
    assert str(caught.value).startswith("jobs: 1 problem, nothing was sent:")
    assert not (tmp_path / "out").exists()


def test_errors_before_anything_is_sent(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="out= is needed"):
        runner.run(records(1))
    with pytest.raises(runner.CredentialsError, match="no API key"):
        runner.run(records(1), out=tmp_path / "out")
    with pytest.raises(runner.OptionsError, match="concurrency must be at least 1"):
        runner.run(records(1), out=tmp_path / "out", emulate=True, concurrency=0)
    assert not (tmp_path / "out").exists()


def test_a_failed_job_is_counted_and_exits_1(tmp_path: Path) -> None:
    rows = [*records(1), {"id": "refused", "prompt": "x [[faults:policy]]", "size": "1280x544"}]
    report = runner.run(rows, out=tmp_path / "out", emulate=True)
    assert (report.succeeded, report.failed, report.pending, report.exit_code) == (1, 1, 0, 1)
    assert report.confirmed_usd == pytest.approx(0.03) and report.possible_usd == 0
    failed = report.results().set_index("job_id").loc["refused"]
    assert failed["error_cause"] == "content_policy_violation"
    assert "failed=1" in repr(report) and "exit_code=1" in repr(report)


def test_ids_that_look_like_numbers_round_trip_and_the_ledger_merges(tmp_path: Path) -> None:
    """A plain read_csv made 001 and 1e5 floats and nan a NaN: the merge on job_id failed."""
    ids = ["001", "1e5", "nan", "2"]
    rows = [{"id": i, "prompt": f"fox {i}", "size": "1280x544"} for i in ids]
    report = runner.run(rows, out=tmp_path / "out", emulate=True)
    results, ledger = report.results(), report.ledger()
    assert list(results["job_id"]) == ids and sorted(ledger["job_id"]) == sorted(ids)
    merged = results.merge(ledger, on="job_id", suffixes=("", "_billed"))
    assert sorted(merged["job_id"]) == sorted(ids)
    assert str(ledger["attempt"].dtype) == "int64" and str(ledger["cost_usd"].dtype) == "float64"
    assert str(ledger["total_tokens"].dtype) == "Int64"  # empty cells: NA, not a text ""
    assert not ledger["finished_at"].isna().any()


def test_the_emulator_takes_its_settings_and_tells_what_it_saw(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        runner.Emulator(no_such_setting=1)
    with pytest.raises(ValueError, match="fault_rate"):
        runner.Emulator(fault_rate=2.0)
    bad: list[dict[str, Any]] = [
        {"latency_s": -1},
        {"latency_s": float("nan")},
        {"latency_jitter_s": "1"},
        {"seed": "x"},
        {"seed": True},
        {"fault_rate": "0.1"},
        {"rate_limit_rpm": "60"},
        {"rate_limit_burst": 2.5},
    ]
    for settings in bad:
        with pytest.raises(ValueError, match=next(iter(settings))):
            runner.Emulator(**settings)
    emulator = runner.Emulator(api_key="sk-emulated-0000000", script=("500",))
    with pytest.raises(RuntimeError, match="not running"):
        _ = emulator.url
    with emulator as emu:
        assert emu.url.startswith("http://127.0.0.1:") and emu.url.endswith("/v1")
        report = runner.run(records(1), out=tmp_path / "out", base_url=emu.url, api_key=emu.api_key)
    assert report.succeeded == 1
    assert [record.status for record in emu.requests] == [500, 200]  # the 500 was retried
    assert emu.billed_usd == pytest.approx(0.03)
