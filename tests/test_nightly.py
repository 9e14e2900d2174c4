"""Unattended runs: ``run --json``, the exit code of a folder in use, ``{date}`` in ``--out``,
``--notify``, and the README's cron line, run as cron would run it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import runner
from runner.cli.summary import SUMMARY_KEYS
from runner.core.options import dated
from runner.emulator import EmulatorConfig, EmulatorThread
from runner.outputs.notify import post_summary, webhook_problem
from runner.redact import register_secret
from tests.conftest import TEST_KEY, closed_port_url, write_manifest
from tests.test_cli import REPO, cli, env, run_cli, small_manifest

CANARY_KEY = "sk-canary-nightly-5f1e0c9a7b"


@pytest.fixture
def server() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(api_key=TEST_KEY)) as thread:
        yield thread


class Receiver:
    """A webhook on 127.0.0.1: keeps the bodies POSTed to it; answers ``status`` after
    ``delay_s``."""

    def __init__(self, *, status: int = 200, delay_s: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.raw.append(body)
                outer.bodies.append(json.loads(body))
                time.sleep(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def documented_keys() -> list[str]:
    """The summary's keys as the README's table in "Nightly runs" lists them."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Nightly runs\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| key | meaning |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z_.]+)` \|", table, flags=re.MULTILINE)


def flat_keys(summary: dict[str, Any]) -> list[str]:
    keys = []
    for name, value in summary.items():
        nested = SUMMARY_KEYS[name]
        if nested is None:
            keys.append(name)
        else:
            keys += [f"{name}.{key}" for key in nested]
            assert value is None or list(value) == list(nested), name
    return keys


def one_json(stdout: str) -> dict[str, Any]:
    """stdout as exactly one JSON document (``json.loads`` refuses anything after it)."""
    summary = json.loads(stdout)
    assert isinstance(summary, dict)
    assert flat_keys(summary) == documented_keys()
    return summary


def test_the_documented_keys_are_the_summarys() -> None:
    expected = [
        name if nested is None else f"{name}.{key}"
        for name, nested in SUMMARY_KEYS.items()
        for key in (nested or [None])
    ]
    assert documented_keys() == expected


def test_json_good_run(tmp_path: Path, server: EmulatorThread) -> None:
    out = tmp_path / "out"
    done = run_cli(
        "run", small_manifest(tmp_path), "--out", out, "--base-url", server.base_url, "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = one_json(done.stdout)
    assert summary["exit_code"] == 0 and summary["error"] is None
    assert summary["counts"] == {"succeeded": 3, "failed": 0, "pending": 0, "requests": 3}
    assert summary["spend_usd"] == {"confirmed": 0.09, "possible": 0.0}
    assert summary["paths"] == {
        "out": str(out),
        "images": str(out / "images"),
        "results": str(out / "results.parquet"),
        "ledger": str(out / "ledger.csv"),
        "report": str(out / "report.html"),
    }
    assert Path(summary["paths"]["report"]).is_file()
    timings = summary["timings"]
    started = datetime.fromisoformat(timings["started_at"])
    assert started <= datetime.fromisoformat(timings["finished_at"])
    assert 0 < timings["wall_s"] < 60
    assert "3 succeeded, 0 failed, 0 pending" in done.stderr  # the human summary, on stderr


def test_json_stopped_run(tmp_path: Path, server: EmulatorThread) -> None:
    args = ("--base-url", server.base_url, "--json", "--max-cost", "0.07", "--concurrency", "1")
    done = run_cli("run", small_manifest(tmp_path, 5), "--out", tmp_path / "out", *args)
    assert done.returncode == 3, done.stderr
    summary = one_json(done.stdout)
    assert summary["exit_code"] == 3
    assert "the budget of $0.07 is reached" in summary["stop_reason"]
    assert summary["counts"]["pending"] > 0
    assert "stopped:" in done.stderr


def test_json_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli("run", small_manifest(tmp_path), "--out", out, "--dry-run", "--json", key=None)
    assert done.returncode == 0, done.stderr
    summary = one_json(done.stdout)
    assert summary["dry_run"] is True
    assert summary["counts"] == {"succeeded": 0, "failed": 0, "pending": 3, "requests": 0}
    assert summary["paths"]["results"] is None and summary["paths"]["report"] is None
    assert "dry run: nothing was sent" in done.stderr
    assert not out.exists()


def test_json_manifest_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "size": "7x7"}])
    done = run_cli("run", manifest, "--out", tmp_path / "out", "--json", "--emulate")
    assert done.returncode == 2
    summary = one_json(done.stdout)
    assert summary["exit_code"] == 2 and summary["counts"] is None
    assert summary["error"] == done.stderr.strip()
    assert "nothing was sent" in summary["error"] and "size" in summary["error"]


def test_a_folder_in_use_exits_4(tmp_path: Path) -> None:
    with EmulatorThread(EmulatorConfig(latency_s=0.5)) as server:
        out = tmp_path / "out"
        args = ("run", small_manifest(tmp_path, 6), "--out", out, "--base-url", server.base_url)
        first = subprocess.Popen(
            cli(*args, "--no-progress", "--concurrency", "1"), env=env(), stdout=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while not server.emulator.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        second = run_cli(*args, "--json")
        first.communicate(timeout=60)
    assert second.returncode == 4
    summary = one_json(second.stdout)
    assert summary["exit_code"] == 4
    assert "in use by another image-runner run" in summary["error"]
    assert first.returncode == 0


def test_dated_fills_date_and_datetime_in_utc() -> None:
    night = datetime(2026, 11, 29, 2, 0, 41, tzinfo=UTC)
    assert dated("out/n-{date}", night) == Path("out/n-2026-11-29")
    assert dated(Path("{datetime}/x"), night) == Path("2026-11-29T0200Z/x")
    assert dated("{x}-{date}", night) == Path("{x}-2026-11-29")
    assert ":" not in str(dated("{datetime}"))


def test_out_with_date_in_the_cli_and_in_python(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    done = run_cli("run", small_manifest(tmp_path), "--out", tmp_path / "n-{date}", "--emulate")
    assert done.returncode == 0, done.stderr
    days = {f"{moment:%Y-%m-%d}" for moment in (before, datetime.now(UTC))}
    assert [p.name for p in tmp_path.glob("n-*")] in [[f"n-{day}"] for day in days]
    report = runner.run(small_manifest(tmp_path), tmp_path / "p-{datetime}", emulate=True)
    assert report.succeeded == 3
    assert re.fullmatch(r"p-\d{4}-\d\d-\d\dT\d{4}Z", report.out.name)
    assert report.out.is_dir()


def test_notify_posts_the_summary_without_the_key(tmp_path: Path) -> None:
    with (
        EmulatorThread(EmulatorConfig(api_key=CANARY_KEY)) as server,
        Receiver() as hook,
    ):
        args = ("--base-url", server.base_url, "--json", "--notify", hook.url)
        done = run_cli(
            "run", small_manifest(tmp_path), "--out", tmp_path / "o", *args, key=CANARY_KEY
        )
    assert done.returncode == 0, done.stderr
    [body] = hook.bodies
    text = body.pop("text")
    assert body == json.loads(done.stdout)
    assert text.startswith("image-runner: ") and "\n" not in text
    assert "3 succeeded, 0 failed, 0 pending" in text and text.endswith("exit 0")
    assert CANARY_KEY.encode() not in hook.raw[0]


def test_notify_also_when_stopped_and_when_refused(tmp_path: Path, server: EmulatorThread) -> None:
    (tmp_path / "bad").mkdir()
    bad = write_manifest(tmp_path / "bad", [{"id": "a"}])
    with Receiver() as hook:
        stop = ("--max-cost", "0.04", "--concurrency", "1", "--notify", hook.url)
        args = ("--out", tmp_path / "o", "--base-url", server.base_url, *stop)
        stopped = run_cli("run", small_manifest(tmp_path), *args)
        refused = run_cli("run", bad, "--out", tmp_path / "b", "--emulate", "--notify", hook.url)
    assert (stopped.returncode, refused.returncode) == (3, 2)
    assert [body["exit_code"] for body in hook.bodies] == [3, 2]
    assert "stopped: the budget of $0.04 is reached" in hook.bodies[0]["text"]
    assert "nothing was sent" in hook.bodies[1]["text"]


def test_a_failing_webhook_never_changes_the_exit_code(tmp_path: Path) -> None:
    url = closed_port_url()
    done = run_cli(
        "run", small_manifest(tmp_path), "--out", tmp_path / "o", "--emulate", "--notify", url
    )
    assert done.returncode == 0
    assert "notify: the webhook at 127.0.0.1 could not be reached" in done.stderr
    assert "the exit code is unchanged" in done.stderr
    with Receiver(status=500) as hook:
        failed = run_cli(
            "run",
            small_manifest(tmp_path),
            "--out",
            tmp_path / "o",
            "--emulate",
            "--notify",
            hook.url,
        )
    assert failed.returncode == 0
    assert "notify: the webhook at 127.0.0.1 answered 500" in failed.stderr


def test_a_slow_webhook_is_given_up_on() -> None:
    with Receiver(delay_s=3) as hook:
        started = time.monotonic()
        problem = post_summary(hook.url, {"text": "x"}, timeout_s=0.3)
    assert time.monotonic() - started < 2
    assert problem == "the webhook at 127.0.0.1 did not answer within 0.3 s"


def test_the_webhook_body_is_masked() -> None:
    register_secret(CANARY_KEY)
    with Receiver() as hook:
        assert post_summary(hook.url, {"stop_reason": f"refused {CANARY_KEY}"}) is None
    assert CANARY_KEY.encode() not in hook.raw[0]
    assert hook.bodies == [{"stop_reason": "refused [REDACTED]"}]


def test_only_http_webhooks(tmp_path: Path) -> None:
    assert webhook_problem("file:///etc/passwd") is not None
    assert webhook_problem("https://hooks.slack.com/services/T/B/x") is None
    done = run_cli("run", small_manifest(tmp_path), "--emulate", "--notify", "file:///etc/passwd")
    assert done.returncode == 2 and "--notify" in done.stderr


def test_the_readmes_cron_line_runs(tmp_path: Path) -> None:
    """The command of the README's crontab line, as cron's ``sh`` runs it, in a folder laid out
    as the README says, against the emulator: one run, one JSON line, one notification."""
    readme = (REPO / "README.md").read_text()
    [line] = re.findall(r"^0 2 \* \* \* .+$", readme, flags=re.MULTILINE)
    command = line.split(maxsplit=5)[5]
    command = command.replace("cd /srv/catalog", f"cd {shlex.quote(str(tmp_path))}")
    runner_cmd = f"{shlex.quote(sys.executable)} -m runner run --emulate"
    command = command.replace("image-runner run", runner_cmd)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "logs").mkdir()
    small_manifest(tmp_path / "jobs").rename(tmp_path / "jobs" / "nightly.yaml")
    with Receiver() as hook:
        (tmp_path / "nightly.env").write_text(
            f"IMAGE_RUNNER_API_KEY={CANARY_KEY}\nWEBHOOK_URL={hook.url}\n"
        )
        done = subprocess.run(["sh", "-c", command], env=env(key=None), timeout=120)
    assert done.returncode == 0, (tmp_path / "logs" / "nightly.err").read_text()
    [summary] = map(json.loads, (tmp_path / "logs" / "nightly.jsonl").read_text().splitlines())
    assert summary["counts"]["succeeded"] == 3
    assert re.fullmatch(r"output/nightly-\d{4}-\d\d-\d\d", summary["paths"]["out"])
    assert (tmp_path / summary["paths"]["report"]).is_file()
    assert (tmp_path / "logs" / "nightly.log").is_file()
    assert [body["exit_code"] for body in hook.bodies] == [0]
