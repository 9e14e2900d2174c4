"""Child processes of the benchmark, run to their end: timed, measured, their output kept.

:func:`run_child` starts ``python ARGS`` from the repository's root and reaps it with
``os.wait4``, which gives that child's own peak RSS (``ru_maxrss``), not the sum of all
children's; a child past its timeout is killed and reported as such. :func:`run_runner` and
:func:`run_bare` build the two clients' command lines: the real ``image-runner run`` and the
bare loop of :mod:`bench.bare`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.figures import MB

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench"
_POLL_S = 0.02
_KILL_GRACE_S = 5.0
_SUCCEEDED = re.compile(r"(\d+) succeeded")


@dataclass(frozen=True)
class Finished:
    """A child process that ended (or was killed at its timeout)."""

    args: tuple[str, ...]
    exit_code: int
    timeout_s: float
    timed_out: bool
    wall_s: float  # from start to exit, interpreter start-up included
    peak_rss_bytes: int
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / MB

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def failure(self) -> str:
        """Why it did not end well, in one line: the timeout, or the exit code and last words."""
        if self.timed_out:
            return f"killed at its {self.timeout_s:.0f} s time limit"
        last = (self.stderr.strip() or self.stdout.strip()).splitlines()[-1:] or [""]
        return f"exit {self.exit_code}: {last[0][:120]}"


def run_child(
    args: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> Finished:
    """Run ``python ARGS`` in the repository's root; wait at most ``timeout_s``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started_s = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        deadline_s = started_s + timeout_s
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now_s = time.perf_counter()
            if now_s > deadline_s and not timed_out:
                timed_out = True
                process.terminate()
            elif timed_out and now_s > deadline_s + _KILL_GRACE_S:
                process.kill()
            time.sleep(_POLL_S)
        wall_s = time.perf_counter() - started_s
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Finished(
            args=tuple(args),
            exit_code=process.returncode,
            timeout_s=timeout_s,
            timed_out=timed_out,
            wall_s=wall_s,
            peak_rss_bytes=usage.ru_maxrss * 1024,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def runner_env() -> dict[str, str]:
    """This environment, with the benchmark's key and none of the user's API settings."""
    dropped = ("IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY", "IMAGE_RUNNER_BASE_URL")
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    env["IMAGE_RUNNER_API_KEY"] = API_KEY
    return env


def run_runner(
    manifest: Path,
    out_dir: Path,
    base_url: str,
    *,
    concurrency: int,
    timeout_s: float,
    extra: Sequence[str] = (),
) -> Finished:
    """``image-runner run MANIFEST`` as a user runs it, without the progress bar."""
    args = ["-m", "runner", "run", str(manifest), "--out", str(out_dir)]
    args += ["--base-url", base_url, "--concurrency", str(concurrency), "--no-progress", *extra]
    return run_child(args, timeout_s=timeout_s, env=runner_env())


def run_bare(
    base_url: str, *, jobs: int, concurrency: int, size: str, timeout_s: float
) -> Finished:
    """The bare aiohttp loop of :mod:`bench.bare`, over the same jobs."""
    args = ["-m", "bench.bare", base_url, "--jobs", str(jobs)]
    args += ["--concurrency", str(concurrency), "--size", size]
    return run_child(args, timeout_s=timeout_s, env=runner_env())


def succeeded(finished: Finished) -> int | None:
    """The ``N succeeded`` of the runner's summary, if it printed one."""
    match = _SUCCEEDED.search(finished.stdout)
    return int(match.group(1)) if match else None
