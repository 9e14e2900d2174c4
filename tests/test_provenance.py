"""Provenance in every written image: the metadata is readable with Pillow, the image still
decodes to the same pixels, and runs write it."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from runner.emulator import Emulator
from runner.images.files import write_atomic_copy
from runner.images.provenance import add_provenance, provenance_splices
from runner.images.verify import inspect_image
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


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("JPEG", "RGB", {"quality": 90}),
        ("WEBP", "RGB", {"quality": 80}),
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_a_file_is_tagged_as_it_is_copied(
    tmp_path: Path, fmt: str, mode: str, options: dict[str, object]
) -> None:
    """The pool's path: edits worked out from the file's headers, applied while streaming it to
    its final place, give the same bytes as tagging it in memory."""
    data = encode(fmt, mode, **options)
    source = tmp_path / "in.part.tmp-1"
    source.write_bytes(data)
    kind = inspect_image(source).format
    with open(source, "rb") as f:
        splices = provenance_splices(f, kind, FIELDS)
    target = tmp_path / "out.img"
    sha256 = write_atomic_copy(target, source, splices)
    assert target.read_bytes() == add_provenance(data, kind, FIELDS)
    assert sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.part.tmp-1", "out.img"]


def test_an_odd_png_cannot_be_tagged(tmp_path: Path) -> None:
    data = encode("PNG")
    iend = data.rindex(b"IEND") - 4
    with pytest.raises(ValueError, match="without an IEND"):
        provenance_splices(io.BytesIO(data[:iend]), "png", FIELDS)
