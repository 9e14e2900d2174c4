"""Shared fixtures: an emulator on a free loopback port, manifests and reference images on disk,
and a helper that runs the core exactly as the CLI does."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from PIL import Image

from runner.core.lifecycle import Run, RunOptions, RunReport
from runner.core.retry import RetryConfig
from runner.emulator import Emulator, EmulatorConfig
from runner.http.client import ClientConfig
from runner.jobs import _TOKEN, Job, content_hash
from runner.manifest.load import load_manifest
from tests import services

TEST_KEY = "sk-test-0123456789abcdef"

MakeEmulator = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Factory: ``await make_emulator(fault_rate=0.2, seed=1)`` starts one on a free port."""
    started: list[Emulator] = []

    async def make(**config: Any) -> Emulator:
        emulator = Emulator(EmulatorConfig(**config))
        await emulator.start("127.0.0.1", 0)
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> Emulator:
    return await make_emulator()


def make_ref(folder: Path, name: str, size: tuple[int, int] = (64, 48)) -> Path:
    """A small real reference image; the format follows the file's extension."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", size, (200, 80, 40)).save(path)
    return path


def write_manifest(
    folder: Path, jobs: list[dict[str, Any]], defaults: dict[str, Any] | None = None
) -> Path:
    path = folder / "manifest.yaml"
    doc: dict[str, Any] = {"jobs": jobs}
    if defaults:
        doc["defaults"] = defaults
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def make_job(
    job_id: str,
    prompt: str = "a picture",
    *,
    size: str | None = "1280x544",
    response_format: str = "b64_json",
    images: tuple[Path, ...] = (),
) -> Job:
    """A valid job, hashed as a manifest's would be, built with the constructor's private token
    (tests may); a reference need not exist (its path's sha256 stands in for its bytes')."""
    digest = content_hash(
        model="gpt-image-2-vip",
        prompt=prompt,
        size=size,
        response_format=response_format,
        image_sha256s=[hashlib.sha256(str(path).encode()).hexdigest() for path in images],
    )
    return Job(
        job_id, prompt, "gpt-image-2-vip", size, response_format, digest, images, _token=_TOKEN
    )


def options(out: Path, base_url: str, **overrides: Any) -> RunOptions:
    retry = RetryConfig(
        max_attempts=overrides.pop("max_attempts", 5),
        on_ambiguous=overrides.pop("on_ambiguous", "retry"),
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
        max_retry_after_s=overrides.pop("max_retry_after_s", 120.0),
    )
    concurrency = overrides.pop("concurrency", 4)
    client = ClientConfig(
        base_url=base_url,
        api_key=TEST_KEY,
        timeout_s=overrides.pop("timeout_s", 10.0),
        download_backoff_s=0.001,
    )
    assert not overrides, overrides
    return RunOptions(out_dir=out, client=client, retry=retry, concurrency=concurrency)


async def run_manifest(manifest: Path, out: Path, base_url: str, **overrides: Any) -> RunReport:
    return await Run(load_manifest(manifest), options(out, base_url, **overrides)).execute()


def closed_port_url() -> str:
    """A base URL on a loopback port nobody listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve a test server's ``app`` on a free loopback port; yield its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def db_rows(out: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        return list(db.execute(sql))
    finally:
        db.close()


def db_exec(out: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    db = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        with db:
            db.execute(sql, params)
    finally:
        db.close()


def folder_state(out: Path) -> dict[str, Any]:
    """Everything on disk under ``out``: each file and folder with its size and mtime, and the
    schema and rows of its checkpoint, dumped from a copy (opening the checkpoint in place may
    create its -wal and -shm files)."""
    files = {
        path.relative_to(out).as_posix(): (
            path.is_dir(),
            0 if path.is_dir() else path.stat().st_size,
            path.stat().st_mtime_ns,
        )
        for path in out.rglob("*")
    }
    dump: list[str] = []
    if (out / "checkpoint.sqlite").is_file():
        with tempfile.TemporaryDirectory() as copy:
            for name in ("checkpoint.sqlite", "checkpoint.sqlite-wal"):
                if (out / name).is_file():
                    shutil.copyfile(out / name, Path(copy) / name)
            db = sqlite3.connect(Path(copy) / "checkpoint.sqlite")
            try:
                dump = list(db.iterdump())
            finally:
                db.close()
    return {"files": files, "checkpoint": dump}


async def dry_run(manifest: Path, out: Path, base_url: str) -> RunReport:
    dry = dataclasses.replace(options(out, base_url), dry_run=True)
    return await Run(load_manifest(manifest), dry).execute()


def mixed_manifest(tmp_path: Path) -> Path:
    make_ref(tmp_path / "refs", "a.png", (64, 48))
    make_ref(tmp_path / "refs", "b.jpg", (48, 64))
    make_ref(tmp_path / "refs", "c.webp", (50, 50))
    return write_manifest(
        tmp_path,
        [
            {"id": "gen-b64", "prompt": "a red fox", "size": "1280x720"},
            {"id": "gen-url", "prompt": "a blue fox", "size": "848x1280", "response_format": "url"},
            {"prompt": "a fox without an id", "size": "1280x544"},
            {
                "id": "edit-three",
                "prompt": "Place image1 on image2 in the style of image3",
                "images": ["refs/a.png", "refs/b.jpg", "refs/c.webp"],
                "size": "2048x1152",
            },
            {
                "id": "edit-auto-url",
                "prompt": "Modify image1: make it blue",
                "images": ["refs/b.jpg"],
                "response_format": "url",
            },
        ],
        defaults={"model": "gpt-image-2-vip"},
    )


# --- real services for the scale-out tests (see tests/services.py) ------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[services.Postgres]:
    """One PostgreSQL cluster for the test session (per xdist worker)."""
    with services.start_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres: services.Postgres) -> str:
    """The URL (password included) of a fresh, empty database of the session's cluster."""
    return postgres.new_database()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[services.Moto]:
    """moto's S3 server for the test session, ``AWS_ENDPOINT_URL`` pointing at it."""
    with services.start_moto() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server: services.Moto) -> str:
    """A fresh, empty bucket's name on the session's moto server."""
    return moto_server.new_bucket()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, in their order (a stable sort): under ``pytest -n`` each process
    takes the next test as it finishes one, so the minutes-long chaos runs start at once, each
    in a process of its own, and the quick tests fill the others around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def open_worker(pg_url: str, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Workers (PostgreSQL stores) of the run at tmp_path/out, closed at the end."""
    from runner.store.postgres import open_pg_store

    opened: list[Any] = []

    def make() -> Any:
        opened.append(open_pg_store(pg_url, tmp_path / "out"))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def planned_jobs(store: Any, count: int) -> list[Job]:
    """``count`` jobs j00000... planned into ``store`` and queued, as a planning run leaves them."""
    jobs = [make_job(f"j{n:05d}", f"picture {n}") for n in range(count)]
    store.plan_jobs(jobs)
    store.queue([j.id for j in jobs])
    return jobs
