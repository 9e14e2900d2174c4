"""The Chromium driver the page tests use: a click, a key and a reload reach a real page."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.chromium import Browser, BrowserError

PAGE = """<!doctype html><html><body>
<button id="b" style="margin-top: 1500px">press</button><p id="log"></p>
<script>
const log = (t) => { document.getElementById("log").textContent += t + ";"; };
document.getElementById("b").addEventListener("click", (e) => log("click:" + e.isTrusted));
addEventListener("keydown", (e) => log("key:" + e.key));
</script></body></html>"""


async def test_clicks_keys_and_reload_reach_the_page(tmp_path: Path) -> None:
    page_file = tmp_path / "page.html"
    page_file.write_text(PAGE)
    async with Browser(tmp_path) as browser:
        page = await browser.open(page_file.as_uri())
        await page.click("#b")  # below the fold: scrolled into view first
        await page.key("a")
        await page.key("ArrowRight")
        log = await page.wait_for("document.getElementById('log').textContent")
        # isTrusted: real input events, not a script's element.click()
        assert log == "click:true;key:a;key:ArrowRight;"
        assert await page.evaluate("Promise.resolve(6 * 7)") == 42
        await page.reload()
        assert await page.evaluate("document.getElementById('log').textContent") == ""
        shot = await page.screenshot(tmp_path / "shot.png")
        with Image.open(shot) as image:
            assert image.size == (1280, 900)
        try:
            await page.evaluate("no_such_name")
        except BrowserError as exc:
            assert "ReferenceError" in str(exc)
        else:
            raise AssertionError("an exception in the page was not raised")
