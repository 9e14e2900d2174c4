"""Where an image's time goes: nanoseconds per stage of the per-image path, counted only while
a benchmark asks.

The pool, the client, the savers and the group commit mark their stages with
``with timed("verify"):``. Nothing is counted unless :func:`counting` is active (in the process
of ``python -m bench breakdown``, which runs the core in-process for that), and then every
stage adds its time and its count to one :class:`StageTimes`, whatever thread it ran on. Off,
:func:`timed` hands back one shared do-nothing context manager: a global read and a ``with``,
a fraction of a microsecond an image.

Each stage gets its wall time (:func:`time.perf_counter_ns`) and the CPU time of the thread that
ran it (:func:`time.thread_time_ns`): on two cores, with the GIL, a saver thread's wall time is
mostly waiting for its turn, and its CPU time is what it costs; an fsync's wall time is the
disk's. The stages overlap (savers in threads, the commit in its own): the sum of their CPU
times is the work per image, to set against the wall time per image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType

_OFF: AbstractContextManager[None] = nullcontext()


class StageTimes:
    """Totals per stage: wall time, CPU time and the number of times it ran. Thread-safe."""

    def __init__(self) -> None:
        self.wall_ns: dict[str, int] = {}
        self.cpu_ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        shown = (f"{k}={v / 1e6:.1f}ms" for k, v in self.wall_ns.items())
        return f"<StageTimes {', '.join(shown)}>"

    def add(self, stage: str, wall_ns: int, cpu_ns: int) -> None:
        with self._lock:
            self.wall_ns[stage] = self.wall_ns.get(stage, 0) + wall_ns
            self.cpu_ns[stage] = self.cpu_ns.get(stage, 0) + cpu_ns
            self.calls[stage] = self.calls.get(stage, 0) + 1


_current: StageTimes | None = None


@contextmanager
def counting() -> Iterator[StageTimes]:
    """Count the stages run inside, in this process; the totals are read after the block."""
    global _current
    times = _current = StageTimes()
    try:
        yield times
    finally:
        _current = None


def timed(stage: str, *, whole_process: bool = False) -> AbstractContextManager[None]:
    """Time the block as ``stage`` while :func:`counting`, else do nothing: its wall time, and
    the CPU time of the calling thread (of the whole process: ``whole_process``)."""
    times = _current
    if times is None:
        return _OFF
    return _Timer(times, stage, time.process_time_ns if whole_process else time.thread_time_ns)


class _Timer:
    __slots__ = ("_cpu_clock", "_stage", "_started", "_times")

    def __init__(self, times: StageTimes, stage: str, cpu_clock: Callable[[], int]) -> None:
        self._times = times
        self._stage = stage
        self._cpu_clock = cpu_clock
        self._started = (0, 0)

    def __enter__(self) -> None:
        self._started = (time.perf_counter_ns(), self._cpu_clock())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        wall_ns, cpu_ns = self._started
        self._times.add(self._stage, time.perf_counter_ns() - wall_ns, self._cpu_clock() - cpu_ns)
