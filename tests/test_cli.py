"""``image-runner`` as a user runs it: a subprocess against an emulator on a loopback port."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.cli.parser import build_parser, emulator_config_from
from runner.core.options import Options
from runner.emulator import EmulatorConfig, EmulatorThread
from tests.conftest import TEST_KEY, closed_port_url, make_ref, write_manifest

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "runner", *map(str, args)]


def env(key: str | None = TEST_KEY, **extra: str) -> dict[str, str]:
    dropped = ("IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY", "IMAGE_RUNNER_BASE_URL")
    values = {k: v for k, v in os.environ.items() if k not in dropped}
    if key is not None:
        values["IMAGE_RUNNER_API_KEY"] = key
    values["PYTHONPATH"] = str(REPO)
    return {**values, **extra}


def run_cli(
    *args: str | Path, key: str | None = TEST_KEY, cwd: Path | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), env=env(key, **extra), cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def server() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(api_key=TEST_KEY)) as thread:
        yield thread


def small_manifest(tmp_path: Path, count: int = 3, prefix: str = "img") -> Path:
    jobs = [
        {"id": f"{prefix}-{i}", "prompt": f"picture {i}", "size": "1280x544"} for i in range(count)
    ]
    return write_manifest(tmp_path, jobs)


def test_run_then_rerun_sends_nothing(tmp_path: Path, server: EmulatorThread) -> None:
    out = tmp_path / "out"
    manifest = small_manifest(tmp_path)
    first = run_cli("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "3 succeeded, 0 failed, 0 pending" in first.stdout
    assert "$0.09 confirmed + $0.00 possible" in first.stdout
    assert len(server.emulator.requests) == 3

    again = run_cli("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert len(server.emulator.requests) == 3
    assert "0 requests this run" in again.stdout


def test_base_url_from_environment_and_default_out_folder(
    tmp_path: Path, server: EmulatorThread
) -> None:
    manifest = small_manifest(tmp_path, 1)
    done = run_cli(
        "run", manifest, "--no-progress", cwd=tmp_path, IMAGE_RUNNER_BASE_URL=server.base_url
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "output" / "manifest" / "images" / "img-0.png").is_file()
    assert (tmp_path / "output" / "manifest" / "results.parquet").is_file()
    # One of each, said in the singular.
    assert "jobs:      1: 1 succeeded, 0 failed, 0 pending" in done.stdout
    assert "; 1 request this run" in done.stdout
    validated = run_cli("validate", manifest)
    assert "manifest.yaml: 1 job (1 generation, 0 edits), $0.03 at $0.03 an image" in (
        validated.stdout
    )


def test_openai_api_key_is_the_fallback(tmp_path: Path, server: EmulatorThread) -> None:
    manifest = small_manifest(tmp_path, 1)
    done = run_cli(
        "run",
        manifest,
        "--out",
        tmp_path / "o",
        "--base-url",
        server.base_url,
        "--no-progress",
        key=None,
        OPENAI_API_KEY=TEST_KEY,
    )
    assert done.returncode == 0, done.stderr


def test_invalid_manifest_exits_2_and_sends_nothing(tmp_path: Path, server: EmulatorThread) -> None:
    make_ref(tmp_path / "refs", "ok.png")
    manifest = write_manifest(
        tmp_path,
        [
            {"id": "fine", "prompt": "fine", "size": "1280x544"},
            {"id": "bad-size", "prompt": "x", "size": "2048X2048"},
            {"id": "bad-ref", "prompt": "x", "images": ["refs/missing.png"]},
            {"id": "bad/id", "prompt": "x"},
            {"prompt": "x", "n": 2},
        ],
    )
    done = run_cli("run", manifest, "--out", tmp_path / "out", "--base-url", server.base_url)
    assert done.returncode == 2
    for row in ("job 2", "job 3", "job 4", "job 5"):
        assert row in done.stderr
    assert "job 1 " not in done.stderr
    assert server.emulator.requests == []
    assert not (tmp_path / "out").exists()


def test_missing_key_is_a_usage_error(tmp_path: Path, server: EmulatorThread) -> None:
    done = run_cli("run", small_manifest(tmp_path), "--base-url", server.base_url, key=None)
    assert done.returncode == 2
    assert "IMAGE_RUNNER_API_KEY" in done.stderr
    assert server.emulator.requests == []


def test_failed_job_exits_1_and_refused_key_exits_3(tmp_path: Path, server: EmulatorThread) -> None:
    manifest = write_manifest(
        tmp_path, [{"id": "p", "prompt": "a [[faults:policy]]", "size": "1280x544"}]
    )
    done = run_cli(
        "run", manifest, "--out", tmp_path / "o1", "--base-url", server.base_url, "--no-progress"
    )
    assert done.returncode == 1
    assert "1 content_policy_violation" in done.stdout

    refused = run_cli(
        "run",
        small_manifest(tmp_path),
        "--out",
        tmp_path / "o2",
        "--base-url",
        server.base_url,
        "--no-progress",
        key="sk-wrong-key-000000",
    )
    assert refused.returncode == 3
    assert "API key was refused" in refused.stdout
    assert "sk-wrong-key-000000" not in refused.stdout + refused.stderr


def test_emulate_flag_runs_the_demo_offline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = run_cli(
        "run", REPO / "jobs" / "demo.yaml", "--emulate", "--out", out, "--no-progress", key=None
    )
    assert done.returncode == 0, done.stderr
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 8 and set(results["status"]) == {"succeeded"}
    assert len(list((out / "images").iterdir())) == 8


def run_args(tmp_path: Path, server: EmulatorThread, concurrency: int) -> tuple[str | Path, ...]:
    return (
        "run",
        small_manifest(tmp_path, 12),
        "--out",
        tmp_path / "out",
        "--base-url",
        server.base_url,
        "--no-progress",
        "--concurrency",
        str(concurrency),
    )


def start(args: tuple[str | Path, ...]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sigint_stops_gracefully_and_the_rerun_finishes(tmp_path: Path) -> None:
    with EmulatorThread(EmulatorConfig(latency_s=0.3)) as server:
        out = tmp_path / "out"
        args = run_args(tmp_path, server, concurrency=2)
        proc = start(args)
        deadline = time.monotonic() + 30
        while len(server.emulator.bills) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr
        assert "interrupted by SIGINT" in stdout
        results = pd.read_csv(out / "results.csv")
        assert len(results) == 12
        assert 2 <= (results["status"] == "succeeded").sum() < 12
        assert set(results["status"]) == {"succeeded", "pending"}

        again = subprocess.run(cli(*args), env=env(), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        prompts = [bill.prompt for bill in server.emulator.bills]
        assert sorted(prompts) == sorted(f"picture {i}" for i in range(12))  # none paid twice


def test_validate_prints_the_count(tmp_path: Path) -> None:
    done = run_cli("validate", REPO / "jobs" / "catalog.csv")
    assert done.returncode == 0
    assert "4 jobs" in done.stdout


def test_report_status_and_export_commands(tmp_path: Path, server: EmulatorThread) -> None:
    out = tmp_path / "out"
    manifest = small_manifest(tmp_path, 2)
    done = run_cli("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert (out / "report.html").is_file()  # every run writes it
    (out / "report.html").unlink()

    report = run_cli("report", out)
    assert report.returncode == 0 and (out / "report.html").is_file()
    status = run_cli("status", out)
    assert status.returncode == 0 and "finished" in status.stdout
    export = run_cli("export", out, tmp_path / "ds", "--format", "imagefolder")
    assert export.returncode == 0, export.stderr
    assert "exported 2 images" in export.stdout
    assert (tmp_path / "ds" / "train" / "metadata.jsonl").is_file()


def test_only_needs_retry_failed(tmp_path: Path) -> None:
    done = run_cli("run", small_manifest(tmp_path), "--emulate", "--only", "server_error")
    assert done.returncode == 2
    assert done.stderr == "error: --only narrows --retry-failed; add --retry-failed\n"


def test_second_sigint_stops_at_once_without_a_traceback(tmp_path: Path) -> None:
    # The emulator books a request after its latency: 4 booked means 4 more are in flight.
    with EmulatorThread(EmulatorConfig(latency_s=2.0)) as server:
        out = tmp_path / "out"
        args = run_args(tmp_path, server, concurrency=4)
        proc = start(args)
        deadline = time.monotonic() + 30
        while len(server.emulator.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # the next four are mid-flight now, for another 1.5 s
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 3, stderr
        assert "Traceback" not in stderr
        assert "stopped:   at once" in stdout
        ledger = pd.read_csv(out / "ledger.csv")
        assert (ledger["billing"] == "possible").sum() >= 1  # the dropped requests

        again = subprocess.run(cli(*args), env=env(), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert len(list((out / "images").iterdir())) == 12


@pytest.mark.parametrize(
    ("faults", "exit_code", "billing"),
    [
        ("503,429", 0, ["confirmed"]),  # answered, retryable
        ("reset", 0, ["possible", "confirmed"]),  # ambiguous, then retried
        ("drop", 0, ["possible", "confirmed"]),
        ("policy", 1, []),  # final for the job
        ("500_noretry", 1, []),
        ("badsize", 1, ["confirmed"]),
        ("401", 3, []),  # final for the run
        ("quota", 3, []),
    ],
)
def test_exit_code_and_ledger_per_failure_class(
    tmp_path: Path, server: EmulatorThread, faults: str, exit_code: int, billing: list[str]
) -> None:
    manifest = write_manifest(
        tmp_path, [{"id": "one", "prompt": f"x [[faults:{faults}]]", "size": "1280x544"}]
    )
    out = tmp_path / "out"
    done = run_cli("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert done.returncode == exit_code, done.stdout + done.stderr
    ledger = pd.read_csv(out / "ledger.csv").sort_values("attempt")
    assert list(ledger["billing"]) == billing


def test_never_sent_requests_fail_the_job_with_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base_url = closed_port_url()
    done = run_cli(
        "run",
        small_manifest(tmp_path, 1),
        "--out",
        out,
        "--base-url",
        base_url,
        "--max-attempts",
        "2",
        "--no-progress",
    )
    assert done.returncode == 1
    assert pd.read_csv(out / "ledger.csv").empty  # never sent: nothing billed
    assert "not_sent" in (out / "results.csv").read_text()
    # Said where it went wrong, as it happened and at the end, not only in results.csv.
    refused = "connection refused to " + base_url.removeprefix("http://").removesuffix("/v1")
    assert f"a request failed (not_sent): {refused}" in done.stderr
    assert f"failures:  1 not_sent ({refused})" in done.stdout


def test_a_base_url_without_v1_stops_with_a_hint_and_fails_no_job(
    tmp_path: Path, server: EmulatorThread
) -> None:
    out = tmp_path / "out"
    manifest = small_manifest(tmp_path)
    wrong = server.base_url.removesuffix("/v1")
    done = run_cli("run", manifest, "--out", out, "--base-url", wrong, "--no-progress")
    assert done.returncode == 3, done.stderr
    assert "wrong base URL?" in done.stdout and "check --base-url" in done.stdout
    assert "0 failed, 3 pending" in done.stdout
    again = run_cli("run", manifest, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "3 succeeded, 0 failed, 0 pending" in again.stdout


def test_second_run_on_a_busy_folder_is_refused(tmp_path: Path) -> None:
    with EmulatorThread(EmulatorConfig(latency_s=0.5)) as server:
        out = tmp_path / "out"
        args = (
            "run",
            small_manifest(tmp_path, 6),
            "--out",
            out,
            "--base-url",
            server.base_url,
            "--no-progress",
            "--concurrency",
            "1",
        )
        first = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not server.emulator.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        second = run_cli(*args)
        assert second.returncode == 4
        assert "in use by another image-runner run" in second.stderr
        first.communicate(timeout=60)
        assert first.returncode == 0
        assert len(server.emulator.bills) == 6


def test_budget_stop_exits_3_and_says_what_is_left(tmp_path: Path, server: EmulatorThread) -> None:
    out = tmp_path / "out"
    done = run_cli(
        "run",
        small_manifest(tmp_path, 5),
        "--out",
        out,
        "--base-url",
        server.base_url,
        "--no-progress",
        "--max-cost",
        "0.07",
    )
    assert done.returncode == 3
    assert "the budget of $0.07 is reached" in done.stdout
    assert "left to do: 3 jobs, $0.09" in done.stdout
    assert server.emulator.billed_usd == 0.06
    plan = run_cli(
        "run",
        small_manifest(tmp_path, 5),
        "--out",
        out,
        "--base-url",
        server.base_url,
        "--max-cost",
        "0.07",
        "--dry-run",
    )
    assert "$0.07 cap, $0.01 left: NOT enough: 0 images fit" in plan.stdout
    assert server.emulator.billed_usd == 0.06


def test_a_key_with_a_stray_newline_is_refused_before_sending(
    tmp_path: Path, server: EmulatorThread
) -> None:
    done = run_cli(
        "run", small_manifest(tmp_path), "--base-url", server.base_url, key=TEST_KEY + "\n"
    )
    assert done.returncode == 2 and "control characters" in done.stderr
    assert server.emulator.requests == []


@pytest.mark.parametrize(
    ("args", "extra", "said"),
    [
        (("--base-url", "ftp://x/v1"), {}, "error: --base-url must be an http(s) URL with a host"),
        ((), {"IMAGE_RUNNER_BASE_URL": "not a url"}, "error: IMAGE_RUNNER_BASE_URL must be an"),
    ],
)
def test_a_base_url_that_cannot_be_sent_to_exits_2_before_anything(
    tmp_path: Path, args: tuple[str, ...], extra: dict[str, str], said: str
) -> None:
    """It used to be tried: every attempt failed before leaving, each booked as a possible
    charge, exit 1."""
    out = tmp_path / "out"
    done = run_cli("run", small_manifest(tmp_path), "--out", out, *args, **extra)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not out.exists()


def test_a_dry_run_needs_no_key_and_writes_nothing(tmp_path: Path) -> None:
    """A dry run sends nothing, so it needs no key (and no --emulate); it prints the plan and
    writes nothing, not even the output folder or a checkpoint."""
    out = tmp_path / "out"
    planned = run_cli("run", small_manifest(tmp_path, 4), "--out", out, "--dry-run", key=None)
    assert planned.returncode == 0, planned.stderr
    assert "to do:     4 jobs (4 generations, 0 edits) = 4 images" in planned.stdout
    assert "spent:     $0.00 confirmed + $0.00 possible in this folder" in planned.stdout
    assert f"samples:   {out / 'images' / 'img-0'}.png" in planned.stdout
    assert not out.exists()


def run_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices["run"]
    return parser


def shown(default: object) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_run_help_shows_every_default() -> None:
    parser = run_parser()
    text = " ".join(parser.format_help().split())
    options = [a for a in parser._actions if a.option_strings]
    for action, after in zip(options, [*options[1:], None], strict=True):
        start = text.index(f"{', '.join(action.option_strings)} ")
        end = text.index(f" {after.option_strings[0]}", start) if after else len(text)
        help_text = text[start:end]
        if action.nargs == 0:  # a flag: off unless given
            assert "(default" not in help_text or action.dest == "help", help_text
        elif action.default is None:  # "not set": the help says what that means
            assert "(default: " in help_text, help_text
        else:
            assert f"(default: {shown(action.default)})" in help_text, help_text


def test_the_readme_table_of_run_options_matches_the_parser() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| option of `run` |") :]
    rows = {}
    for line in table[: table.index("\n\n")].splitlines()[2:]:
        cells = [cell.strip() for cell in line.replace("\\|", "/").strip("|").split("|")]
        rows[cells[0].strip("`").split()[0]] = cells
    actions = {
        ("-v" if a.dest == "verbose" else a.option_strings[-1]): a
        for a in run_parser()._actions
        if a.option_strings and a.dest != "help"
    }
    assert set(actions) == set(rows) - {"-vv"}  # -vv is -v given twice
    for option, action in actions.items():
        _, python_name, default, _ = rows[option]
        in_python = action.dest in Options.defaults() or option == "--out"
        assert python_name == (f"`{action.dest}`" if in_python else ""), option
        if action.nargs == 0:
            assert default == "off", option
        elif action.default is None:
            assert default in ("none", "every cause") or option in ("--out", "--base-url")
        else:
            assert default.strip("`") == shown(action.default), option


def test_emulate_help_lists_the_default_faults_whole_and_they_parse_back() -> None:
    """Joined with "," alone, argparse wrapped the default mid-kind ("50" / "2")."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(commands.choices["emulate"].format_help().split())
    kinds = EmulatorConfig().fault_kinds
    assert f"(default: {', '.join(kinds)})" in text
    defaults = emulator_config_from(build_parser().parse_args(["emulate"]))
    assert defaults.fault_kinds == kinds
    typed = build_parser().parse_args(["emulate", "--faults", "429 , reset,"])
    assert emulator_config_from(typed).fault_kinds == ("429", "reset")


def test_emulate_refuses_a_negative_latency(tmp_path: Path) -> None:
    done = run_cli("emulate", "--latency", "-1", "--port", "0")
    assert done.returncode == 2 and "latency_s must be at least 0, got -1.0" in done.stderr
