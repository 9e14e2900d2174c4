"""Provenance in every written image: the metadata is readable with Pillow, the image still
decodes to the same pixels, and runs write it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from runner.emulator import Emulator
from runner.images import inspect_image
from runner.provenance import add_provenance
from tests.conftest import run_manifest, write_manifest

FIELDS = {
    "job_id": "mug-white",
    "prompt": 'A "white" mug <on> a desk, café light',
    "model": "gpt-image-2-vip",
    "size": "1280x720",
}


def encode(fmt: str, mode: str = "RGB", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (64, 40), (10, 120, 200, 128)[: len(mode)]).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.tobytes()


def test_png_gets_text_chunks() -> None:
    data = encode("PNG")
    tagged = add_provenance(data, "png", FIELDS)
    with Image.open(io.BytesIO(tagged)) as image:
        assert {k: image.text[k] for k in FIELDS} == FIELDS  # type: ignore[attr-defined]
        assert image.text["Software"] == "image-runner"  # type: ignore[attr-defined]
    assert pixels(tagged) == pixels(data)
    inspect_image(tagged, (64, 40))


def test_jpeg_gets_a_comment() -> None:
    data = encode("JPEG", quality=90)
    tagged = add_provenance(data, "jpeg", FIELDS)
    with Image.open(io.BytesIO(tagged)) as image:
        assert '"job_id": "mug-white"' in image.info["comment"].decode()
        assert "café" in image.info["comment"].decode()
    assert pixels(tagged) == pixels(data)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {"quality": 80}),
        ("RGB", {"lossless": True}),
        ("RGBA", {"lossless": True}),
        ("RGBA", {"quality": 80}),
    ],
)
def test_webp_gets_xmp(mode: str, options: dict[str, object]) -> None:
    data = encode("WEBP", mode, **options)
    tagged = add_provenance(data, "webp", FIELDS)
    with Image.open(io.BytesIO(tagged)) as image:
        xmp = image.info["xmp"]
        xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
        assert 'ir:job_id="mug-white"' in xmp and "&lt;on&gt;" in xmp
        assert image.mode == mode
    assert pixels(tagged) == pixels(data)
    inspect_image(tagged, (64, 40))


async def test_runs_write_provenance(tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [{"id": "lamp", "prompt": "a lamp", "size": "1280x544"}])
    await run_manifest(manifest, out, emulator.base_url)
    with Image.open(out / "images" / "lamp.png") as image:
        text = image.text  # type: ignore[attr-defined]
    assert text["job_id"] == "lamp" and text["prompt"] == "a lamp"
    assert text["model"] == "gpt-image-2-vip" and text["size"] == "1280x544"
