"""The pool's counters, and how they reach ``on_progress``: at most a few times a second.

Every image moves the counters three or four times (sent, answered, saved, recorded); a copy of
them per move, handed to a progress bar that redraws, was a cost paid on the event loop for
every image, that nobody can see at 500 images a second. :class:`ProgressReporter` hands over a
copy at most every :data:`REPORT_INTERVAL_S`: the first change at once, later ones by a timer
that sends the counters as they are when it fires, so no change waits longer than the
interval. A failure is sent at once (the CLI tells the first failure of each cause, and a
second cause must not hide the first), and :meth:`ProgressReporter.flush` sends what the
timer has not yet sent when the run ends, so the last report is the final count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from runner.stages import timed

REPORT_INTERVAL_S: Final = 0.2


@dataclass
class Progress:
    """The pool's counters; ``on_progress`` gets a copy (see :class:`ProgressReporter`)."""

    succeeded: int = 0
    failed: int = 0
    retrying: int = 0
    in_flight: int = 0
    requests: int = 0
    confirmed_micro_usd: int = 0
    possible_micro_usd: int = 0
    # The cause and message of the latest failed attempt ("not_sent", "connection refused to
    # 127.0.0.1:9"), so that a run going wrong says why while it goes on.
    last_error: tuple[str, str] | None = None


class ProgressReporter:
    """Sends copies of ``counters`` to ``on_progress``: call :meth:`changed` after every change
    (:meth:`failed` after a failure's), :meth:`flush` at the end. Use on the event loop."""

    def __init__(
        self,
        counters: Progress,
        on_progress: Callable[[Progress], None],
        *,
        interval_s: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self.sent = 0  # reports handed over, for tests
        self._on_progress = on_progress
        self._interval_s = interval_s
        self._clock = clock
        self._next_s = float("-inf")  # no report before this time, but by the timer
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<ProgressReporter sent={self.sent} pending={self._timer is not None}>"

    def changed(self) -> None:
        if self._timer is not None:
            return  # the timer sends this change with the others
        now_s = self._clock()
        if now_s >= self._next_s:
            self._send(now_s)
        else:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._next_s - now_s, self._fire)

    def failed(self) -> None:
        """A failure was counted: sent at once, with its cause."""
        self._cancel_timer()
        self._send(self._clock())

    def flush(self) -> None:
        """Send what the timer has not sent yet."""
        if self._timer is not None:
            self._cancel_timer()
            self._send(self._clock())

    def _fire(self) -> None:
        self._timer = None
        self._send(self._clock())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send(self, now_s: float) -> None:
        self._next_s = now_s + self._interval_s
        self.sent += 1
        with timed("progress"):
            self._on_progress(dataclasses.replace(self.counters))
