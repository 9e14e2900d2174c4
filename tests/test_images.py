"""Images from files: full decodes (JPEG, WebP; a PNG is checked without one) are capped at
:data:`MAX_FULL_DECODES` at once whatever the number of threads, a file verifies like its
bytes, and the streamed atomic copy applies its splices and leaves no temp file, even when it
fails."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from runner.images.files import remove_temp_files, write_atomic_copy
from runner.images.verify import MAX_FULL_DECODES, ImageInvalid, WrongSize, inspect_image


def png_file(folder: Path, size: tuple[int, int] = (64, 40), suffix: str = "png") -> Path:
    path = folder / f"a.{suffix}"
    Image.new("RGB", size, "olive").save(path)
    return path


def test_full_decodes_are_capped_across_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jpeg, png = png_file(tmp_path, suffix="jpg"), png_file(tmp_path)
    lock, running, most = threading.Lock(), [0], [0]
    real_load = ImageFile.ImageFile.load

    def slow_load(self: ImageFile.ImageFile) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return real_load(self)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    with ThreadPoolExecutor(max_workers=8) as threads:
        infos = list(threads.map(lambda _: inspect_image(jpeg), range(16)))
    assert {(i.format, i.width, i.height) for i in infos} == {("jpeg", 64, 40)}
    assert most[0] == MAX_FULL_DECODES
    most[0] = 0
    assert inspect_image(png).format == "png" and most[0] == 0  # no decode at all


def test_a_file_verifies_like_its_bytes(tmp_path: Path) -> None:
    path = png_file(tmp_path)
    assert inspect_image(path, (64, 40)) == inspect_image(path.read_bytes(), (64, 40))
    with pytest.raises(WrongSize):
        inspect_image(path, (64, 41))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ImageInvalid, match="does not decode"):
        inspect_image(path)
    path.write_bytes(b"GIF89a...")
    with pytest.raises(ImageInvalid, match="not a png"):
        inspect_image(path)


def test_the_copy_applies_splices_in_order(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: more than one copy chunk
    splices = [(0, 2, b"AB"), (10, 0, b"inserted"), (1_500_000, 100, b""), (2_097_152, 0, b"Z")]
    target = tmp_path / "dst"
    sha256 = write_atomic_copy(target, source, splices)
    data = source.read_bytes()
    expected = b"AB" + data[2:10] + b"inserted" + data[10:1_500_000] + data[1_500_100:] + b"Z"
    assert target.read_bytes() == expected
    assert sha256 == hashlib.sha256(expected).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_a_failed_copy_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    source.write_bytes(b"new" * 1000)
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="shrank"):  # edits that expect a longer file
        write_atomic_copy(target, source, [(5000, 0, b"x")])
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_the_sweep_removes_leftovers_never_an_image_whose_id_has_tmp_in_it(
    tmp_path: Path,
) -> None:
    """A job id may contain ``.tmp-``; its image is a final file. Temp files are named so that no
    valid id can produce them: ``.tmp-<hex>-<name>`` (ids never start with a dot), and, left
    by earlier versions, ``<name>.tmp-<hex>`` (a final image ends in its extension)."""
    images = [
        "shot.tmp-1.png",
        "a.tmp-123456789abc.png",
        "b.part.tmp-0123456789ab.webp",
        "c.tmp-.jpg",
    ]
    leftovers = [
        ".tmp-0123456789ab-shot.tmp-1.png",  # of write_atomic
        ".tmp-0123456789ab-shot.tmp-1.part",  # of a download
        "shot.png.tmp-0123456789ab",  # of write_atomic, by an earlier version
        "shot.part.tmp-0123456789ab",  # of a download, by an earlier version
        ".results.csv.tmp-01234567",  # of the results, by an earlier version
    ]
    for name in images + leftovers:
        (tmp_path / name).write_bytes(b"x")
    assert remove_temp_files(tmp_path) == len(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(images)
