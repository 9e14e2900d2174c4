"""The built-in emulator as the Python API offers it: a context manager to rehearse runs offline,
in a notebook or a script.

``with runner.Emulator(fault_rate=0.1, seed=1) as emu:`` serves the emulator on a free loopback
port until the block ends; pass ``base_url=emu.url, api_key=emu.api_key`` to :func:`runner.run`,
then look at what it received (``emu.requests``) and billed (``emu.billed_usd``). A plain
``with`` serves it from a loop of its own in a background thread, so it works where a loop
already runs in the calling thread (Jupyter), and lets :func:`runner.run`, whose run has a loop
of its own too, reach it; ``async with`` serves it on the running loop, for :func:`runner.arun`.
``runner.run(..., emulate=True)`` needs none of this: it starts an emulator for the run.

One pairing cannot work: ``async with`` in a notebook cell, then the synchronous
:func:`runner.run`, which blocks the loop the emulator answers on while it waits, so every
request would time out and be booked as a possible charge. :func:`runner.run` asks
:func:`served_by_the_callers_loop` first, and refuses.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Final

from runner.core.options import EMULATOR_KEY
from runner.emulator import Emulator as EmulatorServer
from runner.emulator import EmulatorConfig, EmulatorThread, RequestRecord

# The emulators served by ``async with`` blocks now open, by URL: the loop each answers on.
_SERVED_ON_A_LOOP: Final[dict[str, asyncio.AbstractEventLoop]] = {}


def served_by_the_callers_loop(base_url: str) -> bool:
    """Whether ``base_url`` is an emulator of an ``async with`` block served by the event loop
    running in the calling thread: a caller that blocks this thread leaves it unanswered."""
    loop = _SERVED_ON_A_LOOP.get(base_url.rstrip("/"))
    if loop is None:
        return False
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False


class Emulator:
    """The built-in emulator of the images API on ``host:port`` (0: a free port) while in a
    ``with`` or ``async with`` block. ``settings`` are those of
    :class:`~runner.emulator.EmulatorConfig`: ``latency_s``, ``fault_rate``, ``fault_kinds``,
    ``seed``, ``rate_limit_rpm``, ``payload``, ... (the defaults answer every valid request at
    once, correctly); an unknown one raises ``TypeError``, a bad value ``ValueError``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self.config = EmulatorConfig(**settings)
        self._address = (host, port)
        self._thread: EmulatorThread | None = None
        self._server: EmulatorServer | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """The base URL to pass as ``base_url``: ``http://127.0.0.1:<port>/v1``."""
        if not self._url:
            raise RuntimeError("the emulator is not running: use it in a with block")
        return self._url

    @property
    def api_key(self) -> str:
        """A key the emulator accepts (it takes any unless its ``api_key`` setting names one)."""
        return self.config.api_key or EMULATOR_KEY

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, in order; it stays readable after the block."""
        return self._served().requests

    @property
    def billed_usd(self) -> float:
        """What the emulator billed: $0.03 an image it generated, faults after the work too."""
        return self._served().billed_usd

    def __repr__(self) -> str:
        received = len(self._server.requests) if self._server else 0
        return f"Emulator(url={self._url or None!r}, requests={received})"

    def __enter__(self) -> Emulator:
        self._thread = EmulatorThread(self.config, *self._address)
        self._server = self._thread.emulator
        self._url = self._thread.__enter__().base_url
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._thread.__exit__(exc_type, exc, traceback)
        self._thread, self._url = None, ""

    async def __aenter__(self) -> Emulator:
        self._server = EmulatorServer(self.config)
        self._url = await self._server.start(*self._address)
        _SERVED_ON_A_LOOP[self._url.rstrip("/")] = asyncio.get_running_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _SERVED_ON_A_LOOP.pop(self._url.rstrip("/"), None)
        if self._server is not None:
            await self._server.stop()
        self._url = ""

    def _served(self) -> EmulatorServer:
        if self._server is None:
            raise RuntimeError("the emulator has not run yet: use it in a with block")
        return self._server
