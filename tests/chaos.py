"""The scale-out acceptance harness: worker processes of one run against one emulator, one of
them killed with SIGKILL every few seconds and started again, and the books checked afterwards.

- :class:`ThreadedEmulator`: the emulator on its own event loop in a thread of the test process,
  so the test reads its books (every request with its arrival time and status, every bill)
  directly, while the workers are separate processes.
- :class:`Workers`: ``python -m runner`` processes (the planning ``run`` and ``work``-ers),
  started, killed and restarted; their output kept in files, to show when a test fails.
- :func:`max_over_limit`: how far the requests the emulator accepted ever went past its token
  bucket (the rate times the window plus the burst), over every window starting at a request.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.emulator import Emulator, EmulatorConfig

REPO = Path(__file__).resolve().parent.parent


class ThreadedEmulator:
    """An emulator served from a thread; ``url`` once started. Stop with :meth:`stop`."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.emulator = Emulator(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.emulator.start("127.0.0.1", 0), self._loop)
        future.result(timeout=30)
        self.url = self.emulator.base_url
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def accepted_times(self) -> list[float]:
        """When each request the rate limit let through arrived (``time.time()``), sorted."""
        return sorted(r.received_at for r in list(self.emulator.requests) if r.status != 429)

    @property
    def billed_usd(self) -> float:
        return self.emulator.billed_usd


def max_over_limit(times: Sequence[float], rate_per_min: float, burst: int) -> float:
    """The most requests any window ``[t_i, t_j]`` of accepted ``times`` held beyond what a token
    bucket of ``burst`` refilled at ``rate_per_min`` allows (``rate * (t_j - t_i) + burst``);
    <= 0 when the limit always held. A client that keeps under the limit scores <= 0 on the
    provider's own bucket; one request of clock jitter is allowed for by the caller."""
    rate = rate_per_min / 60
    worst = -float(burst)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            allowed = rate * (times[j] - start) + burst
            worst = max(worst, (j - i + 1) - allowed)
    return worst


@dataclass
class Workers:
    """Worker processes of one run; each slot's command is started again after a kill."""

    commands: list[list[str]]
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    kills: int = 0
    starts: int = 0

    def start_all(self) -> None:
        self.processes = [None] * len(self.commands)
        for slot in range(len(self.commands)):
            self.start(slot)

    def start(self, slot: int) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.logs / f"worker{slot}-{self.starts}.log", "wb")  # noqa: SIM115
        self.processes[slot] = subprocess.Popen(
            [sys.executable, "-m", "runner", *self.commands[slot]],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def alive(self) -> list[int]:
        return [s for s, p in enumerate(self.processes) if p is not None and p.poll() is None]

    def kill_one(self, rng: random.Random) -> int | None:
        """SIGKILL a random live worker and start its command again; its slot, or None."""
        live = self.alive()
        if not live:
            return None
        slot = rng.choice(live)
        process = self.processes[slot]
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self.kills += 1
        self.start(slot)
        return slot

    def wait(self, timeout_s: float) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for process in self.processes:
            if process is None:
                codes.append(None)
                continue
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def output(self) -> str:
        """Every worker's output, for a failing test's message (the last 3,000 characters of
        each)."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)
