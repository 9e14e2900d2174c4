"""What the review app's tests share: a run with generations and edits (their references on
disk) made on the emulator, and a client of the app that sends its token as the page does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from runner.review import ReviewServer
from runner.review.server import TOKEN_HEADER
from runner.store import open_read_only
from runner.store.views import ReviewItem
from tests.conftest import make_ref, run_manifest, write_manifest

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "teal", "pink")


def shots(count: int) -> list[dict[str, Any]]:
    """``count`` jobs ``shot-00``...; every third an edit of one reference, every sixth of
    two (``refs/vase.png``, ``refs/table.jpg``)."""
    jobs: list[dict[str, Any]] = []
    for i in range(count):
        job: dict[str, Any] = {"id": f"shot-{i:02d}", "prompt": f"a {COLOURS[i % 8]} vase, {i}"}
        if i % 3 == 0:
            job["images"] = ["refs/vase.png", "refs/table.jpg"] if i % 6 == 0 else ["refs/vase.png"]
            job["size"] = "auto"
        else:
            job["size"] = "1280x720"
        jobs.append(job)
    return jobs


async def made_run(folder: Path, base_url: str, jobs: list[dict[str, Any]]) -> Path:
    """Run ``jobs`` into ``folder/out`` (references made under ``folder/refs``)."""
    make_ref(folder / "refs", "vase.png", (64, 48))
    make_ref(folder / "refs", "table.jpg", (48, 64))
    manifest = write_manifest(folder, jobs)
    await run_manifest(manifest, folder / "out", base_url, max_attempts=1)
    return folder / "out"


def item_of(out: Path, job_id: str) -> ReviewItem:
    """The job as the checkpoint has it now, read as any other view would."""
    store = open_read_only(out)
    try:
        found = store.views().review_item(job_id)
    finally:
        store.close()
    assert found is not None, job_id
    return found


@asynccontextmanager
async def client_of(server: ReviewServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A session that sends the token in the header of every request, as the page sends it to
    the API; its requests are relative to the server."""
    headers = {TOKEN_HEADER: server.token}
    async with aiohttp.ClientSession(server.origin, headers=headers) as session:
        yield session


async def post_decision(
    session: aiohttp.ClientSession, job_id: str, decision: str, version: int | None = None
) -> tuple[int, dict[str, Any]]:
    body = {"job_id": job_id, "decision": decision, "version": version}
    async with session.post("/api/review", json=body) as response:
        return response.status, await response.json()
