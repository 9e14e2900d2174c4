"""The emulator as the benchmarks use it: a child process, its base URL, its request records.

:class:`EmulatorProcess` starts ``python -m runner emulate --port 0 ARGS`` and reads the base
URL from the line it prints once it listens. Its ``GET /_emulator/stats?since=SEQ`` lists the
requests that arrived after the SEQth, each with ``received_at`` and ``answered_at``
(``time.time()`` in the emulator's process), so each run's records are read alone;
:func:`phase` turns the records of one run into the figures the throughput benchmarks need.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from bench.procs import REPO

_START_TIMEOUT_S = 30.0
_URL = re.compile(r"(http://\S+/v1)")


@dataclass(frozen=True)
class Phase:
    """The request phase of one run, from the emulator's books."""

    requests: int
    ok: int  # answered 200
    rate_limited: int  # refused by the emulator's rate limit
    span_s: float  # first request received to last request answered

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.span_s if self.span_s > 0 else 0.0


def phase(records: Sequence[dict[str, Any]]) -> Phase:
    if not records:
        return Phase(0, 0, 0, 0.0)
    first_s = min(float(r["received_at"]) for r in records)
    last_s = max(float(r["answered_at"]) for r in records)
    return Phase(
        requests=len(records),
        ok=sum(1 for r in records if r["status"] == 200),
        rate_limited=sum(1 for r in records if r["fault"] == "rate_limited"),
        span_s=last_s - first_s,
    )


class EmulatorProcess:
    """``with EmulatorProcess(["--latency", "1"]) as emulator:`` -> ``emulator.base_url``."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.args = ("-m", "runner", "emulate", "--port", "0", *args)
        self.base_url = ""
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<EmulatorProcess {self.base_url or 'stopped'} {' '.join(self.args[5:])}>"

    def __enter__(self) -> EmulatorProcess:
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            self.base_url = self._read_url(self._process)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._process = self._stderr = None

    def _read_url(self, process: subprocess.Popen[str]) -> str:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        match = _URL.search(line)
        if match is None:
            raise RuntimeError(f"the emulator did not start: {line!r} {self._errors()}")
        return match.group(1)

    def _errors(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-500:]

    def stats(self, since: int) -> dict[str, Any]:
        """The emulator's books, with the records of requests after the ``since``-th only."""
        url = self.base_url.removesuffix("/v1") + f"/_emulator/stats?since={since}"
        with urllib.request.urlopen(url, timeout=30.0) as response:
            stats: dict[str, Any] = json.load(response)
        return stats

    def mark(self) -> int:
        """How many requests arrived so far: pass it to :meth:`records_since` after a run."""
        return int(self.stats(since=sys.maxsize)["last_seq"])

    def records_since(self, mark: int) -> list[dict[str, Any]]:
        """The records of the requests that arrived after ``mark``, in arrival order."""
        records: list[dict[str, Any]] = self.stats(since=mark)["request_records"]
        return sorted(records, key=lambda record: int(record["seq"]))
