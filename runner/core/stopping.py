"""Stopping work that must end before anything else touches what it uses: awaiting it to its
end through a cancel (:func:`to_the_end`), and a manifest whose walk ends once a stop is heard
(:class:`UntilStopped`), so that planning a large manifest in a thread stops between batches.
Used by :mod:`runner.core.lifecycle`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, overload

from runner.jobs import Job

T = TypeVar("T")


async def to_the_end(future: asyncio.Future[T], *, on_cancel: Callable[[], None]) -> T:
    """``await future``, except that a cancel does not abandon it: ``on_cancel`` is called (to
    make it end soon), the future is still awaited to its end, and only then is the cancel
    passed on. For work that must be over before anything else touches what it uses: a
    thread using the store, the books of a run."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
            on_cancel()
    if cancelled:
        if not future.cancelled():
            future.exception()  # retrieved: the cancel is what is passed on
        raise asyncio.CancelledError
    return future.result()


class PlanningStopped(Exception):
    """Raised in the planning thread when the run is stopped."""


class UntilStopped(Sequence[Job]):
    """The manifest's jobs as planning walks them: the walk ends with :class:`PlanningStopped`
    once ``stopping`` is set. Planning then stops within the batch it is collecting, which is
    not recorded (each batch is one transaction, begun once its last job is taken). Reading a
    job by its position, as the pool does later, is not checked."""

    def __init__(self, jobs: Sequence[Job], stopping: threading.Event) -> None:
        self._jobs = jobs
        self._stopping = stopping

    def __len__(self) -> int:
        return len(self._jobs)

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | Sequence[Job]:
        return self._jobs[index]

    def __iter__(self) -> Iterator[Job]:
        for job in self._jobs:
            if self._stopping.is_set():
                raise PlanningStopped
            yield job
