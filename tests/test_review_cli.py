"""``image-runner review``: decisions from the command line (checked whole before any is
written), and the app served until Ctrl-C, in a real process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
import webbrowser
from pathlib import Path

import pytest

from runner.cli.main import main
from runner.emulator import Emulator
from runner.store import open_store
from tests.reviewing import item_of, made_run, shots

JOBS = [*shots(6), {"id": "banned", "prompt": "a forbidden thing [[faults:policy]]"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    return await made_run(tmp_path, emulator.base_url, JOBS)


def test_approve_and_reject_for_scripts(
    out: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["review", str(out), "--approve", "shot-01", "shot-02", "--reject", "shot-04"]
    assert main([*argv, "--reviewer", "ada"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "approved shot-01 (version 1) as ada",
        "approved shot-02 (version 1) as ada",
        "rejected shot-04 (version 1) as ada",
    ]
    assert [item_of(out, i).review for i in ("shot-01", "shot-02", "shot-04", "shot-03")] == [
        "approved", "approved", "rejected", "unreviewed",
    ]  # fmt: skip
    assert item_of(out, "shot-04").reviewed_by == "ada"
    # Without --reviewer: the user the process runs as.
    monkeypatch.setenv("LOGNAME", "grace")
    assert main(["review", str(out), "--reject", "shot-01", "--approve", "shot-03"]) == 0
    assert "rejected shot-01 (version 1) as grace" in capsys.readouterr().out
    assert item_of(out, "shot-01").reviewed_by == "grace"


@pytest.mark.parametrize(
    ("argv", "problems"),
    [
        (["--approve", "shot-01", "nope"], ["nope: no such job"]),
        (["--reject", "banned", "shot-01"], ["banned: is failed; only a finished image"]),
        (["--approve", "shot-01", "--reject", "shot-01"], ["shot-01: both approved and rejected"]),
        (["--approve", "x1", "--reject", "banned"], ["x1: no such job", "banned: is failed"]),
    ],
)
def test_a_bad_id_writes_none(
    out: Path, capsys: pytest.CaptureFixture[str], argv: list[str], problems: list[str]
) -> None:
    assert main(["review", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {out}: nothing was recorded:\n")
    for problem in problems:
        assert problem in captured.err
    assert item_of(out, "shot-01").review == "unreviewed"


def test_a_folder_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review", str(tmp_path), "--approve", "a"]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_decisions_while_a_run_holds_the_folder(out: Path) -> None:
    run = open_store(out)  # the lock and a writer, as a run has them
    try:
        assert main(["review", str(out), "--reject", "shot-02", "--reviewer", "ada"]) == 0
        found = run.views().review_item("shot-02")
        assert found is not None and found.review == "rejected"
    finally:
        run.close()


def test_serves_until_interrupted_and_opens_the_browser(
    out: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The browser is opened once the app listens, on a private file that redirects to the
    printed address: the token is never on a command line, where ``ps`` shows it to every
    user. Ctrl-C (raised here by the browser's stand-in) stops it with exit 0 and removes the
    file. (That it serves there: below.)"""
    opened: list[tuple[str, str, int, int]] = []

    def file_of(url: str) -> Path:
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))

    def browser(url: str) -> bool:
        path = file_of(url)
        modes = (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777)
        opened.append((url, path.read_text(encoding="utf-8"), *modes))
        raise KeyboardInterrupt

    monkeypatch.setattr(webbrowser, "open", browser)
    assert main(["review", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    ((opened_url, page, file_mode, dir_mode),) = opened
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{32}", printed[0])
    assert printed == [
        f"review: {url} (Ctrl-C to stop)",
        "review: stopped; every decision was saved as it was taken",
    ]
    token = url.rsplit("=", 1)[1]
    assert opened_url.startswith("file://") and token not in opened_url
    assert (file_mode, dir_mode) == (0o600, 0o700)
    assert f'<meta http-equiv="refresh" content="0;url={url}">' in page
    assert not file_of(opened_url).parent.exists()


def test_the_command_serves_in_its_own_process(out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "runner", "review", str(out), "--no-browser"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = re.fullmatch(r"review: (\S+) \(Ctrl-C to stop\)\n", line)
        assert url, line
        with urllib.request.urlopen(url.group(1)) as response:
            assert response.status == 200 and b"image-runner review" in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_port_in_use_is_an_error(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["review", str(out), "--no-browser", "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
