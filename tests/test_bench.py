"""The benchmark harness's own logic, without running a benchmark (speed is for ``make bench``;
``python -m bench --quick`` is its smoke pass): the emulator child found by the URL line it
prints and read through its request records, a run's request phase from those records, the
runner's summary and a child's failure in one line, the figures' rows and the final table."""

from __future__ import annotations

import dataclasses
import json
import urllib.request

import pytest

from bench import __main__ as bench_main
from bench.emulator import EmulatorProcess, Phase, phase
from bench.figures import Row, median_row, runs_text
from bench.procs import API_KEY, Finished, succeeded
from runner.cli.parser import build_parser, emulator_config_from
from runner.emulator import RATE_LIMITED


def test_the_emulator_child_is_found_by_its_url_and_its_records_are_read() -> None:
    with EmulatorProcess() as emulator:
        assert emulator.base_url.startswith("http://127.0.0.1:")
        assert emulator.base_url.endswith("/v1")
        mark = emulator.mark()
        body = {"model": "gpt-image-2-vip", "prompt": "a dot", "size": "1280x544"}
        request = urllib.request.Request(
            emulator.base_url + "/images/generations",
            data=json.dumps(body | {"response_format": "b64_json"}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30.0) as response:
            assert response.status == 200
        records = emulator.records_since(mark)
        assert emulator.records_since(emulator.mark()) == []
    assert [record["status"] for record in records] == [200]
    assert phase(records).ok == 1


def test_phase_counts_from_the_emulators_records() -> None:
    records = [
        {"received_at": 10.0, "answered_at": 10.5, "status": 200, "fault": None},
        {"received_at": 10.2, "answered_at": 10.3, "status": 429, "fault": RATE_LIMITED},
        {"received_at": 10.4, "answered_at": 10.4, "status": 500, "fault": "500"},
        {"received_at": 11.0, "answered_at": 12.0, "status": 200, "fault": None},
    ]
    got = phase(records)
    assert got == Phase(requests=4, ok=2, rate_limited=1, span_s=2.0)
    assert got.ok_per_s == 1.0
    assert phase([]) == Phase(0, 0, 0, 0.0)
    assert phase([]).ok_per_s == 0.0


CHILD = Finished(
    args=("-m", "runner", "run"),
    exit_code=0,
    timeout_s=300.0,
    timed_out=False,
    wall_s=1.0,
    peak_rss_bytes=150_000_000,
    stdout="",
    stderr="",
)


def test_a_childs_summary_and_failure() -> None:
    done = dataclasses.replace(CHILD, stdout="planned\njobs:      200: 198 succeeded, 2 failed\n")
    assert (done.ok, succeeded(done), done.peak_rss_mb) == (True, 198, 150.0)
    assert succeeded(dataclasses.replace(CHILD, stdout="nothing to say")) is None
    crashed = dataclasses.replace(CHILD, exit_code=3, stderr="Traceback ...\nRuntimeError: boom\n")
    assert not crashed.ok
    assert crashed.failure() == "exit 3: RuntimeError: boom"
    killed = dataclasses.replace(CHILD, exit_code=-15, timed_out=True)
    assert not killed.ok
    assert killed.failure() == "killed at its 300 s time limit"


def test_median_row(capsys: pytest.CaptureFixture[str]) -> None:
    def row(values: list[float], problems: list[str]) -> Row:
        return median_row(
            "figure",
            ">= 2",
            values,
            problems,
            describe=lambda v: f"{v:.1f}",
            meets=lambda v: v >= 2,
        )

    assert row([1.0, 3.0, 2.5], []) == Row("figure", "2.5", ">= 2", True)
    assert row([1.0, 1.4], ["run 3: 5 of 10 images"]) == Row(
        "figure", "1.2; 1 incomplete run(s) left out", ">= 2", False
    )
    assert "WARNING run 3: 5 of 10 images" in capsys.readouterr().out
    assert row([], ["run 1: exit 1", "run 2: exit 3"]) == Row(
        "figure", "no complete run: run 2: exit 3", ">= 2", None
    )
    assert runs_text([1.0, 0.984], ".2f") == "runs: 1.00, 0.98"


def test_the_final_table(capsys: pytest.CaptureFixture[str]) -> None:
    bench_main._print_table(
        [
            Row("overhead: runner / bare throughput", "0.05", ">= 0.5", False),
            Row("memory", "299 MB", "< 500 MB", True),
            Row("scale", "error: boom", "-", None),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " figure                             ",
        " measured    ",
        " target   ",
        " meets? ",
    ]
    assert set(lines[1]) == {"|", "-", " "}
    assert [line.split("|")[4].strip() for line in lines[2:]] == ["NO", "yes", "n/a"]
    assert len({len(line) for line in lines}) == 1  # the columns line up


@pytest.mark.parametrize("argv", [["nope"], ["--repeat", "0"]])
def test_the_command_line_refuses_unknown_figures_and_no_repeats(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(argv)
    assert exit_info.value.code == 2
    assert "python -m bench: error:" in capsys.readouterr().err


def test_the_emulators_jitter_and_retry_after_flags_reach_its_config() -> None:
    # The rate-limit figure's 0.2-0.4 s answers and the faults figure's 1 s Retry-After.
    args = ["emulate", "--latency", "0.2", "--latency-jitter", "0.2", "--retry-after", "1"]
    config = emulator_config_from(build_parser().parse_args(args))
    assert (config.latency_s, config.latency_jitter_s, config.retry_after_s) == (0.2, 0.2, 1.0)
