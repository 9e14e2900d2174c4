"""runner.logs: -v / -vv on stderr, --log-file as JSON lines, and redaction that holds for the
runner's own handlers and for a library user's."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import runner  # noqa: F401  (importing the package installs the redaction)
from runner.emulator import EmulatorConfig, EmulatorThread
from runner.logs import JsonLinesFormatter, setup_logging
from runner.redact import register_secret
from tests.conftest import write_manifest
from tests.test_cli import REPO, run_cli

CANARY = f"sk-canary-{uuid.uuid4().hex}"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("runner")
    saved = (list(root.handlers), root.level, list(ours.handlers), ours.level)
    yield
    setup_logging(0)  # closes the handlers it made
    root.handlers[:], ours.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    ours.setLevel(saved[3])


def format_one(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonLinesFormatter().format(record)
    assert "\n" not in line
    entry: dict[str, Any] = json.loads(line)
    return entry


def make_record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("runner.core.pool", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_utc_timestamp_level_logger_message_and_extra_fields() -> None:
    record = make_record(
        "job %s: retrying in %.2f s", "j1", 0.5, job_id="j1", attempt=2, delay_s=0.5
    )
    entry = format_one(record)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "runner.core.pool"
    assert entry["message"] == "job j1: retrying in 0.50 s"
    assert (entry["job_id"], entry["attempt"], entry["delay_s"]) == ("j1", 2, 0.5)
    ts = datetime.fromisoformat(entry["ts"])
    assert entry["ts"].endswith("Z") and ts.utcoffset() == timedelta(0)
    assert abs(ts.timestamp() - record.created) < 0.001
    assert not {"args", "msg", "levelno", "pathname", "exc_info"} & set(entry)


def test_json_line_carries_the_exception_and_odd_values_as_text() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record("failed", path=Path("/x/y"))
        record.exc_info = sys.exc_info()
    entry = format_one(record)
    assert "ValueError: boom" in entry["exc"]
    assert entry["path"] == "/x/y"


def test_json_line_is_redacted() -> None:
    register_secret(CANARY)
    record = make_record("key %s", CANARY, error=f"refused {CANARY}")
    line = JsonLinesFormatter().format(record)
    assert CANARY not in line and "[REDACTED]" in line


def test_a_library_users_own_handler_never_sees_the_key() -> None:
    """No CLI, no setup_logging: a handler on the root logger, as an application adds one, gets
    records of runner.* loggers with the key masked, in the message, the extra fields and the
    traceback."""
    register_secret(CANARY)
    seen: list[logging.LogRecord] = []
    stream = io.StringIO()
    collect = logging.StreamHandler(stream)
    collect.setFormatter(logging.Formatter("%(name)s %(message)s"))
    collect.emit = lambda record, emit=collect.emit: (seen.append(record), emit(record))  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(collect)
    child = logging.getLogger("runner.core.pool.deep")  # a child of a child: no filter of its own
    level = child.level
    child.setLevel(logging.DEBUG)
    try:
        child.info("sending with %s", CANARY)
        child.warning("answered", extra={"error": f"bad key {CANARY}", "n": 3})
        try:
            raise RuntimeError(f"header was Bearer {CANARY}")
        except RuntimeError:
            child.exception("request failed")
    finally:
        root.removeHandler(collect)
        child.setLevel(level)
    assert len(seen) == 3
    text = stream.getvalue()
    assert "sending with [REDACTED]" in text and "RuntimeError" in text
    assert CANARY not in text
    for record in seen:
        assert all(CANARY not in str(value) for value in vars(record).values()), record
    assert seen[1].__dict__["n"] == 3


def test_with_no_logging_configured_warnings_still_reach_stderr_once_and_masked() -> None:
    """Python prints warnings to stderr when no handler is configured (its last resort); the
    redaction, itself a handler on ``runner``, keeps that, masked."""
    script = (
        "import logging, sys\n"
        "import runner\n"
        "from runner.redact import register_secret\n"
        "register_secret(sys.argv[1])\n"
        "logging.getLogger('runner.core.pool').warning('refused key %s', sys.argv[1])\n"
        "logging.getLogger('runner.core.pool').info('not shown: below the last resort level')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, CANARY],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "refused key [REDACTED]\n"


@pytest.mark.parametrize(
    ("verbosity", "stderr_level", "enabled"),
    [(0, logging.WARNING, logging.WARNING), (1, logging.INFO, logging.INFO), (2, 10, 10)],
)
def test_verbosity_sets_the_runner_level_and_stderr(
    restore_logging: None, verbosity: int, stderr_level: int, enabled: int
) -> None:
    setup_logging(verbosity)
    child = logging.getLogger("runner.core.pool")
    assert child.isEnabledFor(enabled)
    assert not child.isEnabledFor(enabled - 1)
    stderr = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is sys.stderr]
    assert [h.level for h in stderr] == [stderr_level]


def test_log_file_gets_info_even_without_v_and_is_private(
    restore_logging: None, tmp_path: Path
) -> None:
    path = tmp_path / "run.log"
    setup_logging(0, path)
    logging.getLogger("runner.core.pool").info("one", extra={"job_id": "a"})
    setup_logging(0, path)  # a second setup replaces the handlers and appends to the file
    logging.getLogger("runner.core.pool").info("two")
    logging.getLogger("runner.core.pool").debug("not at this level")
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["message"] for e in entries] == ["one", "two"]
    assert entries[0]["job_id"] == "a"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- the command line -----------------------------------------------------------------------


def test_v_counts_on_every_command(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "p", "size": "1280x544"}])
    assert run_cli("validate", manifest, "-vv").returncode == 0
    assert run_cli("validate", manifest, "-v", "--log-file", tmp_path / "v.log").returncode == 0


def test_unwritable_log_file_is_a_usage_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "p", "size": "1280x544"}])
    done = run_cli("validate", manifest, "--log-file", tmp_path / "missing" / "run.log")
    assert done.returncode == 2
    assert "log file" in done.stderr


def test_v_and_log_file_record_retries_possible_charges_and_the_stop(tmp_path: Path) -> None:
    """Run 1: a 503 then a reset, then the image (two retries, one possible charge). Run 2, same
    folder and log file: a job out of quota stops the run (exit 3). The log file holds both
    runs as JSON lines; the key is nowhere."""
    log_file = tmp_path / "run.log"
    job = {"id": "flaky", "prompt": "a lamp [[faults:503,reset]]", "size": "1280x544"}
    quota = {"id": "broke", "prompt": "a chair [[faults:quota]]", "size": "1280x544"}
    outputs: list[str] = []
    with EmulatorThread(EmulatorConfig(api_key=CANARY)) as server:
        for jobs, expected in (([job], 0), ([job, quota], 3)):
            done = run_cli(
                "run",
                write_manifest(tmp_path, jobs),
                "--out",
                tmp_path / "out",
                "--base-url",
                server.base_url,
                "--no-progress",
                "-v",
                "--log-file",
                log_file,
                key=CANARY,
            )
            assert done.returncode == expected, done.stderr
            outputs += [done.stdout, done.stderr]
    text = log_file.read_text()
    assert CANARY not in text and all(CANARY not in output for output in outputs)
    entries = [json.loads(line) for line in text.splitlines()]
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= set(entry)
        assert datetime.fromisoformat(entry["ts"]).tzinfo is not None
    ours = [e for e in entries if e["logger"].startswith("runner.")]

    retries = [e for e in ours if "delay_s" in e]
    assert [(e["job_id"], e["cause"]) for e in retries][:1] == [("flaky", "server_error")]
    assert len(retries) == 2 and all(e["delay_s"] > 0 for e in retries)
    assert all(e["level"] == "INFO" for e in retries)

    possible = [e for e in ours if e.get("billing") == "possible" and "delay_s" not in e]
    assert [(e["job_id"], e["attempt"]) for e in possible] == [("flaky", 2)]

    stops = [e for e in ours if "stop_reason" in e]
    assert len(stops) == 1 and "insufficient_quota" in stops[0]["stop_reason"]

    # -v shows the same records on stderr (run 1's stderr, then run 2's)
    assert "retrying in" in outputs[1] and "possible charge" in outputs[1]
    assert "stopping:" in outputs[3]
    assert datetime.now(UTC) >= datetime.fromisoformat(entries[-1]["ts"])
