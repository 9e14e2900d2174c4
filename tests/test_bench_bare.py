"""The bare loop of the benchmarks (:mod:`bench.bare`): by default it keeps nothing, as the
overhead and latency figures need; with a folder to write to (the 4K figure) it writes every
image it decoded, whole, one file each."""

from __future__ import annotations

from pathlib import Path

from bench.bare import fetch_all
from runner.emulator.render import noise_png_b64
from tests.conftest import MakeEmulator


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


async def test_the_bare_loop_writes_each_image_only_when_asked(
    tmp_path: Path, make_emulator: MakeEmulator
) -> None:
    emulator = await make_emulator(payload="noise")
    assert await fetch_all(emulator.base_url, jobs=3, concurrency=2, size="1280x544") == 3
    assert files(tmp_path) == {}
    images = await fetch_all(
        emulator.base_url, jobs=3, concurrency=2, size="1280x544", write_dir=tmp_path
    )
    assert images == 3
    sent = noise_png_b64(1280, 544)[0]  # what the emulator answers every request with
    assert files(tmp_path) == {"0.png": sent, "1.png": sent, "2.png": sent}
