"""Running an emulator outside the caller's event loop: on a thread of its own for tests and
benchmarks that run the CLI in a subprocess (:class:`EmulatorThread`), or until cancelled behind
``image-runner emulate`` (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import TracebackType

from runner.emulator.config import EmulatorConfig
from runner.emulator.server import Emulator

logger = logging.getLogger(__name__)


class EmulatorThread:
    """An :class:`Emulator` on its own event loop in a daemon thread, for subprocess tests.

    ``with EmulatorThread(config) as server:`` returns once the server listens; pass
    ``server.base_url`` to the runner, then read ``server.emulator.bills`` after it finished.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.emulator = Emulator(config)
        self.base_url = ""
        self._address = (host, port)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(timeout=10.0)
        if not self.base_url:
            raise RuntimeError("the emulator thread did not start listening")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10.0)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.base_url = await self.emulator.start(*self._address)
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.emulator.stop()


async def serve(
    config: EmulatorConfig,
    host: str,
    port: int,
    on_ready: Callable[[str], object] | None = None,
) -> None:
    """Run the emulator on ``host:port`` until cancelled (``image-runner emulate``).

    ``on_ready`` receives the base URL (``http://host:port/v1``) once the server listens, so the
    caller can show it even when ``port`` was 0. Cancelling the task stops the server cleanly.
    """
    emulator = Emulator(config)
    base_url = await emulator.start(host, port)
    logger.info("emulator listening on %s", base_url)
    if on_ready is not None:
        on_ready(base_url)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
