"""Saving one image from the client's temp file: verified, of a size asked for or one of the 30,
tagged with provenance, written atomically with the sha256 of the file on disk, and the temp file
gone whatever happened."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import struct
from pathlib import Path

import pytest
from PIL import Image

from runner.errors import ImageWriteError
from runner.images import saving
from runner.images.files import is_temp_name, temp_path_for
from runner.images.saving import save_image
from runner.images.verify import ImageInvalid, WrongSize
from runner.jobs import Job
from runner.manifest.spool import restore
from tests.conftest import make_job


def job(size: str | None = "1280x544", job_id: str = "mug") -> Job:
    refs = (Path("/refs/mug.png"),) if size == "auto" else ()  # "auto" is for edits only
    return make_job(job_id, "a mug, café light", size=size, images=refs)


def answer(images: Path, size: tuple[int, int] = (1280, 544), fmt: str = "PNG") -> Path:
    """A temp file as the client leaves it in the images folder."""
    images.mkdir(exist_ok=True)
    tmp = temp_path_for(images / "mug.part")
    Image.new("RGB", size, "teal").save(tmp, format=fmt)
    return tmp


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_image_is_saved_tagged_with_its_sha256(tmp_path: Path) -> None:
    images = tmp_path / "images"
    tmp = answer(images)
    info, sha256, relative = save_image(job(), tmp, images, tmp_path)
    assert (info.format, info.width, info.height) == ("png", 1280, 544)
    assert relative == "images/mug.png" and names(images) == ["mug.png"]
    saved = tmp_path / relative
    assert sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()
    with Image.open(saved) as image:
        assert image.size == (1280, 544)
        assert image.text["job_id"] == "mug" and image.text["prompt"] == "a mug, café light"
        assert image.text["size"] == "1280x544"


def test_a_corrupt_answer_is_invalid_and_removed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    tmp = answer(images)
    tmp.write_bytes(tmp.read_bytes()[:300])  # a PNG cut short
    with pytest.raises(ImageInvalid) as info:
        save_image(job(), tmp, images, tmp_path)
    assert not isinstance(info.value, WrongSize)
    assert names(images) == []


@pytest.mark.parametrize(
    ("size", "made", "message"),
    [
        ("1280x544", (1280, 720), "is 1280x720, but 1280x544 was requested"),
        (None, (1000, 500), "is 1000x500, not one of the 30 sizes"),
        ("auto", (1000, 500), "is 1000x500, not one of the 30 sizes"),
    ],
)
def test_a_wrong_size_is_refused_and_removed(
    tmp_path: Path, size: str | None, made: tuple[int, int], message: str
) -> None:
    images = tmp_path / "images"
    tmp = answer(images, made)
    with pytest.raises(WrongSize, match=message):
        save_image(job(size), tmp, images, tmp_path)
    assert names(images) == []


def test_without_a_size_any_of_the_30_is_kept(tmp_path: Path) -> None:
    images = tmp_path / "images"
    info, _, relative = save_image(job(None), answer(images, (1280, 720)), images, tmp_path)
    assert (info.width, info.height) == (1280, 720) and relative == "images/mug.png"


def test_a_folder_that_refuses_the_image_is_an_image_write_error(tmp_path: Path) -> None:
    """The final name is taken by a folder, so the rename fails (as it would for root too)."""
    images = tmp_path / "images"
    tmp = answer(images)
    (images / "mug.png").mkdir()
    with pytest.raises(ImageWriteError, match="directory"):
        save_image(job(), tmp, images, tmp_path)
    assert names(images) == ["mug.png"] and (images / "mug.png").is_dir()


def test_an_image_write_error_removes_the_temp_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    tmp = answer(images)
    with pytest.raises(ImageWriteError):
        save_image(job(), tmp, tmp_path / "gone", tmp_path)  # no such folder to write into
    assert names(images) == []


def test_an_odd_container_is_kept_untagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A container the splicer cannot handle: the paid-for image is kept as it came."""

    def refuse(*args: object) -> list[object]:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(saving, "provenance_splices", refuse)
    images = tmp_path / "images"
    tmp = answer(images)
    data = tmp.read_bytes()
    with caplog.at_level(logging.WARNING, logger="runner.images.saving"):
        _, sha256, relative = save_image(job(), tmp, images, tmp_path)
    assert "no provenance written into mug" in caplog.text
    assert (tmp_path / relative).read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert not any(is_temp_name(name) for name in names(images))


def test_a_job_id_that_climbs_out_of_the_folder_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    """The validator never makes such a job; one rebuilt unchecked (as only the spool may) is
    refused before its id becomes a path, and its temp file is still removed."""
    out = tmp_path / "out"
    out.mkdir()
    images = out / "images"
    tmp = answer(images)
    escaping = restore(**{**dataclasses.asdict(job()), "id": "../../escape"})
    with pytest.raises(ValueError, match=re.escape("'../../escape' cannot name an image file")):
        save_image(escaping, tmp, images, out)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
