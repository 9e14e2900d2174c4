"""The API key never leaves the process in anything the runner writes, and manifest values
cannot place files outside the output folder."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runner.emulator import EmulatorConfig, EmulatorThread
from runner.redact import RedactingFilter, redact, register_secret
from tests.conftest import closed_port_url, write_manifest
from tests.test_cli import env, run_cli

CANARY = f"sk-canary-{uuid.uuid4().hex}"


def assert_nowhere(folder: Path, *texts: str) -> None:
    for text in texts:
        assert CANARY not in text
    for path in folder.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def manifest(tmp_path: Path, faults: str = "") -> Path:
    directive = f" [[faults:{faults}]]" if faults else ""
    jobs = [{"id": f"j{i}", "prompt": f"p{i}{directive}", "size": "1280x544"} for i in range(3)]
    return write_manifest(tmp_path, jobs)


def test_redact_masks_registered_secrets_and_key_shapes() -> None:
    register_secret("my-own-token-123")
    text = redact("key my-own-token-123 and sk-abcdefghijkl and sk-proj-XYZ_123456")
    assert "my-own-token-123" not in text and "sk-abcdefghijkl" not in text
    assert "sk-proj-XYZ_123456" not in text
    assert text.count("[REDACTED]") == 3


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    register_secret(CANARY)
    logger = logging.getLogger("runner.test")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="runner.test"):
        logger.info("sending with %s", CANARY)
    assert CANARY not in caplog.text and "[REDACTED]" in caplog.text


@pytest.mark.parametrize(
    ("server_key", "faults", "exit_code"),
    [
        (CANARY, "", 0),  # success
        (CANARY, "500_noretry", 1),  # failed jobs, errors recorded
        (CANARY, "reset,reset,reset,reset,reset", 1),  # ambiguous, possible charges
        ("sk-the-right-key-0000", "", 3),  # 401: the server echoes the wrong key back
    ],
    ids=["success", "failed", "ambiguous", "refused"],  # not the canary: random per process
)
def test_canary_key_is_in_no_output(
    tmp_path: Path, server_key: str, faults: str, exit_code: int
) -> None:
    with EmulatorThread(EmulatorConfig(api_key=server_key)) as server:
        out = tmp_path / "out"
        done = run_cli(
            "run",
            manifest(tmp_path, faults),
            "--out",
            out,
            "--base-url",
            server.base_url,
            "-v",
            "--max-attempts",
            "5",
            key=CANARY,
        )
    assert done.returncode == exit_code, done.stderr
    assert_nowhere(out, done.stdout, done.stderr)
    assert (out / "results.csv").is_file()


def test_canary_key_is_in_no_output_when_the_api_is_unreachable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli(
        "run",
        manifest(tmp_path),
        "--out",
        out,
        "--base-url",
        closed_port_url(),
        "--max-attempts",
        "2",
        key=CANARY,
    )
    assert done.returncode == 1
    assert (
        "NotSent" in (out / "results.csv").read_text()
        or "not_sent" in (out / "results.csv").read_text()
    )
    assert_nowhere(out, done.stdout, done.stderr)


def test_images_stay_inside_the_output_folder(tmp_path: Path) -> None:
    """Ids are the only manifest value in an output path, and hostile ones are refused."""
    hostile = ["../escape", "/etc/passwd", "..", ".hidden", "a/b", "a\\b", "a\0b"]
    jobs = [{"id": bad, "prompt": "x", "size": "1280x544"} for bad in hostile]
    done = run_cli("validate", write_manifest(tmp_path, jobs))
    assert done.returncode == 2
    assert done.stderr.count("field id") == len(hostile)


def run_cli_with_default_provider(
    default_url: str, *args: str | Path, key: str | None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The real command, but with the built-in default provider at ``default_url`` (a loopback
    emulator), so that a test sees whatever would have gone to the third-party host."""
    script = (
        "import sys\n"
        "import runner.http.credentials\n"
        "runner.http.credentials.DEFAULT_BASE_URL = sys.argv.pop(1)\n"
        "from runner.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    environ = env(key)
    environ.pop("OPENAI_BASE_URL", None)  # only what the test sets
    return subprocess.run(
        [sys.executable, "-c", script, default_url, *map(str, args)],
        env={**environ, **extra},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_openai_key_alone_is_refused_and_sent_nowhere(tmp_path: Path) -> None:
    with EmulatorThread() as default_provider:
        done = run_cli_with_default_provider(
            default_provider.base_url,
            "run",
            manifest(tmp_path),
            "--out",
            tmp_path / "out",
            "--no-progress",
            key=None,
            OPENAI_API_KEY=CANARY,
        )
        assert done.returncode == 2, done.stderr
        assert "OPENAI_BASE_URL" in done.stderr and "IMAGE_RUNNER_API_KEY" in done.stderr
        assert default_provider.emulator.requests == []
        assert not (tmp_path / "out").exists()
        assert CANARY not in done.stdout + done.stderr

        # The same key as IMAGE_RUNNER_API_KEY does go to the default provider: the redirect
        # above works, and the refusal is what kept the requests away.
        allowed = run_cli_with_default_provider(
            default_provider.base_url,
            "run",
            manifest(tmp_path),
            "--out",
            tmp_path / "out",
            "--no-progress",
            key=CANARY,
        )
        assert allowed.returncode == 0, allowed.stderr
        assert len(default_provider.emulator.requests) == 3


def test_an_openai_key_goes_to_openai_base_url(tmp_path: Path) -> None:
    with (
        EmulatorThread() as default_provider,
        EmulatorThread(EmulatorConfig(api_key=CANARY)) as openai_url,  # 401 for any other key
    ):
        done = run_cli_with_default_provider(
            default_provider.base_url,
            "run",
            manifest(tmp_path),
            "--out",
            tmp_path / "out",
            "--no-progress",
            key=None,
            OPENAI_API_KEY=CANARY,
            OPENAI_BASE_URL=openai_url.base_url,
        )
        assert done.returncode == 0, done.stderr
        assert len(openai_url.emulator.requests) == 3
        assert all(r.status == 200 for r in openai_url.emulator.requests)  # the key was right
        assert default_provider.emulator.requests == []
    assert_nowhere(tmp_path / "out", done.stdout, done.stderr)
