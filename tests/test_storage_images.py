"""save_image_to: an image verified and tagged as save_image does it, created in a local folder
or in S3 (moto) only if absent; an image already there adopted, never overwritten; a bad answer
leaving no object and no file behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from runner.errors import ImageWriteError
from runner.images.files import temp_path_for
from runner.images.verify import ImageInvalid, WrongSize
from runner.jobs import Job
from runner.storage import Location, open_location, save_image_to
from tests.conftest import make_job


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return open_location(tmp_path / "out")
    return open_location(f"s3://{request.getfixturevalue('s3_bucket')}/run")


def job(job_id: str = "mug") -> Job:
    return make_job(job_id, "a mug, café light", size="1280x544")


def answer(folder: Path, size: tuple[int, int] = (1280, 544), colour: str = "teal") -> Path:
    """A temp file as the client leaves it."""
    folder.mkdir(exist_ok=True)
    tmp = temp_path_for(folder / "mug.part")
    Image.new("RGB", size, colour).save(tmp, format="PNG")
    return tmp


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("*") if p.is_file())


def test_an_image_is_created_tagged(location: Location, tmp_path: Path) -> None:
    tmp = answer(tmp_path / "client")
    saved = save_image_to(location, job(), tmp)
    assert (saved.key, saved.adopted) == ("images/mug.png", False)
    assert (saved.image.format, saved.image.width, saved.image.height) == ("png", 1280, 544)
    data = location.read_bytes("images/mug.png")
    assert hashlib.sha256(data).hexdigest() == saved.sha256
    (tmp_path / "got.png").write_bytes(data)
    with Image.open(tmp_path / "got.png") as image:
        assert image.text["job_id"] == "mug" and image.text["prompt"] == "a mug, café light"
    assert not tmp.exists()
    (tmp_path / "got.png").unlink()
    local = location.local_path("images/mug.png")
    assert leftovers(tmp_path) == ([] if local is None else [local.name])


def test_a_second_write_adopts_the_first_image(location: Location, tmp_path: Path) -> None:
    first = save_image_to(location, job(), answer(tmp_path / "client", colour="teal"))
    before = location.read_bytes("images/mug.png")
    again = save_image_to(location, job(), answer(tmp_path / "client", colour="red"))
    assert again.adopted and (again.key, again.sha256) == (first.key, first.sha256)
    assert again.image == first.image
    assert location.read_bytes("images/mug.png") == before
    assert [o.key for o in location.list("")] == ["images/mug.png"]
    assert len(leftovers(tmp_path / "client")) == 0


def test_a_truncated_answer_is_invalid_and_leaves_nothing(
    location: Location, tmp_path: Path
) -> None:
    tmp = answer(tmp_path / "client")
    tmp.write_bytes(tmp.read_bytes()[:-200])
    with pytest.raises(ImageInvalid):
        save_image_to(location, job(), tmp)
    assert list(location.list("")) == []
    assert leftovers(tmp_path) == []


def test_a_wrong_size_is_refused(location: Location, tmp_path: Path) -> None:
    with pytest.raises(WrongSize):
        save_image_to(location, job(), answer(tmp_path / "client", size=(1024, 1024)))
    assert list(location.list("")) == []


def test_a_broken_object_in_place_is_never_overwritten(location: Location, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    location.put("images/mug.png", broken)
    with pytest.raises(ImageWriteError, match=r"images/mug\.png is already there but"):
        save_image_to(location, job(), answer(tmp_path / "client"))
    assert location.read_bytes("images/mug.png") == broken.read_bytes()
    assert leftovers(tmp_path / "client") == []


def test_a_store_that_refuses_raises_image_write_error(tmp_path: Path, s3_bucket: str) -> None:
    location = open_location("s3://no-such-bucket-for-the-runner/run")
    tmp = answer(tmp_path / "client")
    with pytest.raises(ImageWriteError, match="mug: cannot store"):
        save_image_to(location, job(), tmp)
    assert leftovers(tmp_path) == []
