"""A real headless Chromium, driven over the DevTools protocol: for the pages a test must click.

``chromium --dump-dom`` shows what a page renders, not what it does when used. This driver
starts Debian's Chromium with ``--remote-debugging-port=0`` (the port it picks is read from the
``DevToolsActivePort`` file in its profile folder), speaks the protocol over aiohttp's websocket
client, and offers what the tests need: open a URL, evaluate JavaScript, wait for a condition,
click an element with real mouse events, press a key, take a screenshot. Everything stays on
127.0.0.1; the profile lives in the test's temporary folder.

    async with Browser(tmp_path) as browser:
        page = await browser.open(url)
        await page.click("button.reject")
        assert await page.evaluate("document.title") == "..."
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest

CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0

# Keys by their DOM name: (code, Windows virtual key code) for the ones that are not text.
_KEYS: dict[str, tuple[str, int]] = {
    "ArrowLeft": ("ArrowLeft", 37),
    "ArrowUp": ("ArrowUp", 38),
    "ArrowRight": ("ArrowRight", 39),
    "ArrowDown": ("ArrowDown", 40),
    "Enter": ("Enter", 13),
    "Escape": ("Escape", 27),
    "Backspace": ("Backspace", 8),
    "Tab": ("Tab", 9),
}


class BrowserError(AssertionError):
    """The page threw, or the browser did not answer: a test failure, with what happened."""


class Page:
    """One tab, attached over its own websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.console: list[str] = []  # console messages and uncaught exceptions, for asserts
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None:
                if not future.done():
                    future.set_result(data)
                continue
            method = data.get("method", "")
            if method == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("type"))) for a in args))
            elif method == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                self.console.append(f"uncaught: {text}")
            await self._events.put(data)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrowserError("the browser closed the connection"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command; its ``result``."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(future, COMMAND_TIMEOUT_S)
        except TimeoutError:
            raise BrowserError(f"{method}: no answer in {COMMAND_TIMEOUT_S:.0f} s") from None
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _event(self, method: str, within_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no {method} in {within_s:.0f} s")
            try:
                event = await asyncio.wait_for(self._events.get(), left)
            except TimeoutError:
                continue
            if event.get("method") == method:
                return event

    async def goto(self, url: str, within_s: float = 30.0) -> None:
        """Load ``url`` and wait for its load event."""
        while not self._events.empty():
            self._events.get_nowait()
        await self.send("Page.navigate", url=url)
        await self._event("Page.loadEventFired", within_s)

    async def reload(self, within_s: float = 30.0) -> None:
        while not self._events.empty():
            self._events.get_nowait()
        await self.send("Page.reload", ignoreCache=True)
        await self._event("Page.loadEventFired", within_s)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (a promise is awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within_s: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + within_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still falsy after {within_s:.0f} s: {expression}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """Click the first element matching ``selector`` with real mouse events, at its
        centre, after scrolling it into view (what a user's click does, handlers and all)."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2,"
            " w: r.width, h: r.height}; })()"
        )
        if not box:
            raise BrowserError(f"nothing matches {selector!r}")
        if not box["w"] or not box["h"]:
            raise BrowserError(f"{selector!r} is not visible (an empty box)")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left" if kind != "mouseMoved" else "none",
                clickCount=1 if kind != "mouseMoved" else 0,
            )

    async def key(self, key: str) -> None:
        """Press and release ``key``: a character ("a", "j") or a DOM key name ("ArrowRight")."""
        if key in _KEYS:
            code, vk = _KEYS[key]
            down: dict[str, Any] = {"key": key, "code": code, "windowsVirtualKeyCode": vk}
            if key == "Enter":
                down["text"] = "\r"  # as a keyboard types it: what activates a focused button
        elif len(key) == 1:
            upper = key.upper()
            code = f"Key{upper}" if upper.isalpha() else f"Digit{key}" if key.isdigit() else ""
            down = {"key": key, "code": code, "text": key, "windowsVirtualKeyCode": ord(upper)}
        else:
            raise ValueError(f"unknown key {key!r}")
        await self.send("Input.dispatchKeyEvent", type="keyDown", **down)
        up = {k: v for k, v in down.items() if k != "text"}
        await self.send("Input.dispatchKeyEvent", type="keyUp", **up)

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))
        return path

    async def set_viewport(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Browser:
    """A headless Chromium with its own profile under ``folder``; closed (killed) on exit."""

    def __init__(self, folder: Path, width: int = 1280, height: int = 900) -> None:
        self.profile = folder / "chromium-profile"
        self.size = (width, height)
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pages: list[Page] = []
        self.port = 0

    async def __aenter__(self) -> Browser:
        self._prepare()
        command = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
            f"--window-size={self.size[0]},{self.size[1]}", "about:blank",
        ]  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._session = aiohttp.ClientSession()
        try:
            self.port = await self._wait_for_port()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def _prepare(self) -> None:
        if not CHROMIUM.is_file():
            pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Chromium first")
        self.profile.mkdir(parents=True, exist_ok=True)

    def _read_port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.profile / "DevToolsActivePort").read_text().splitlines()[0])
        return None

    async def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise BrowserError(f"Chromium exited at start ({self._process.returncode})")
            port = self._read_port()
            if port is not None:
                return port
            await asyncio.sleep(0.05)
        raise BrowserError(f"Chromium did not start in {START_TIMEOUT_S:.0f} s")

    async def open(self, url: str) -> Page:
        """A new tab showing ``url``, loaded."""
        assert self._session is not None
        base = f"http://127.0.0.1:{self.port}"
        async with self._session.put(f"{base}/json/new?about:blank") as response:
            target = await response.json()
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        self._pages.append(page)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.set_viewport(*self.size)
        await page.goto(url)
        return page

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for page in self._pages:
            with contextlib.suppress(Exception):
                await page.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await asyncio.wait_for(self._process.wait(), 10)
