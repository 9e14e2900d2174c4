"""One write per image: the client's temp file is edited where it lies and renamed into place
when the provenance goes at its end (a PNG's chunks before IEND, or anywhere in a small file),
copied only when it must be (a large JPEG's comment after SOI); either way the file on disk is
the tagged image with the sha256 returned, and the folder's fsync is left to the caller when
asked."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from runner.images.files import IN_PLACE_TAIL_BYTES, rename_spliced, temp_path_for
from runner.images.saving import save_image
from runner.stages import counting
from tests.conftest import make_job


def answer(images: Path, fmt: str, *, noisy: bool = False) -> Path:
    """A temp file as the client leaves it; ``noisy``: too big to edit at its front in place."""
    images.mkdir(exist_ok=True)
    tmp = temp_path_for(images / "mug.part")
    if noisy:
        rng = random.Random(1)
        image = Image.frombytes("RGB", (1280, 544), rng.randbytes(1280 * 544 * 3))
    else:
        image = Image.new("RGB", (1280, 544), "teal")
    image.save(tmp, format=fmt)
    return tmp


def saved(tmp_path: Path, fmt: str, *, noisy: bool = False) -> tuple[Path, str, bool]:
    """Save an answer; (the file, the sha256 returned, whether it is the temp file renamed)."""
    images = tmp_path / "images"
    tmp = answer(images, fmt, noisy=noisy)
    inode = tmp.stat().st_ino
    info, sha256, relative = save_image(make_job("mug", "a mug"), tmp, images, tmp_path)
    path = tmp_path / relative
    assert sorted(p.name for p in images.iterdir()) == [path.name]  # no temp file left
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    return path, info.format, path.stat().st_ino == inode


def test_a_png_is_tagged_where_it_lies_and_renamed(tmp_path: Path) -> None:
    path, fmt, renamed = saved(tmp_path, "PNG", noisy=True)
    assert fmt == "png" and renamed  # large, but its edit is at its end
    with Image.open(path) as image:
        image.load()
        assert image.text["job_id"] == "mug" and image.text["size"] == "1280x544"


def test_a_large_jpeg_is_copied_with_its_comment(tmp_path: Path) -> None:
    path, fmt, renamed = saved(tmp_path, "JPEG", noisy=True)
    assert path.stat().st_size > IN_PLACE_TAIL_BYTES
    assert fmt == "jpeg" and not renamed
    with Image.open(path) as image:
        image.load()
        assert b'"job_id": "mug"' in image.info["comment"]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a_small_file_is_tagged_in_place_whatever_its_format(tmp_path: Path, fmt: str) -> None:
    path, _, renamed = saved(tmp_path, fmt)
    assert renamed
    with Image.open(path) as image:
        image.load()
        tag = image.info["comment"] if fmt == "JPEG" else image.info["xmp"]
        assert b"mug" in tag


def test_edits_in_place_replace_and_insert_in_file_order(tmp_path: Path) -> None:
    tmp, target = tmp_path / ".tmp-x-a.part", tmp_path / "a.bin"
    data = bytes(range(256)) * 100
    tmp.write_bytes(data)
    splices = [(25_000, 2, b"AB"), (25_010, 0, b"inserted"), (25_600, 0, b"Z")]
    sha256 = rename_spliced(target, tmp, splices)
    expected = data[:25_000] + b"AB" + data[25_002:25_010] + b"inserted" + data[25_010:] + b"Z"
    assert target.read_bytes() == expected and not tmp.exists()
    assert sha256 == hashlib.sha256(expected).hexdigest()


def test_edits_too_far_back_or_past_the_end_leave_the_file_to_the_copy(tmp_path: Path) -> None:
    tmp, target = tmp_path / ".tmp-x-a.part", tmp_path / "a.bin"
    data = os.urandom(IN_PLACE_TAIL_BYTES + 10)
    tmp.write_bytes(data)
    assert rename_spliced(target, tmp, [(2, 0, b"x")]) is None
    assert rename_spliced(target, tmp, [(len(data) + 5, 0, b"x")]) is None
    assert tmp.read_bytes() == data and not target.exists()


@pytest.mark.parametrize("sync_folder", [True, False])
def test_the_folder_is_fsynced_unless_the_caller_does_it(tmp_path: Path, sync_folder: bool) -> None:
    images = tmp_path / "images"
    tmp = answer(images, "PNG")
    with counting() as times:
        save_image(make_job("mug", "a mug"), tmp, images, tmp_path, sync_folder=sync_folder)
    assert times.calls.get("fsync folder", 0) == (1 if sync_folder else 0)
    assert times.calls["fsync file"] == 1
