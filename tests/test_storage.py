"""The Location contract, passed by every backend alike: a local folder, S3 (moto's server on
loopback, reached through ``AWS_ENDPOINT_URL`` only) and a generic fsspec store (fsspec's
in-memory filesystem, standing for gs:// and az://, which need accounts)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from runner.errors import ChecksumMismatch, StorageError
from runner.images.files import is_temp_name
from runner.storage import LocalLocation, Location, open_location
from runner.storage.base import check_key

BACKENDS = ["local", "s3", "memory"]


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return open_location(tmp_path / "out")
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return open_location(f"s3://{bucket}/runs/nightly/")
    return open_location(f"memory://t-{uuid.uuid4().hex[:12]}/out")


def file_of(folder: Path, data: bytes, name: str = "upload.bin") -> tuple[Path, str]:
    path = folder / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_new_creates_and_reports_the_object(location: Location, tmp_path: Path) -> None:
    path, sha256 = file_of(tmp_path, b"first image bytes")
    result = location.put_new("images/a.png", path, sha256)
    assert result.created
    assert (result.info.key, result.info.size_bytes) == ("images/a.png", 17)
    assert result.info.checksum in {f"sha256:{sha256}", None}  # the memory store keeps none
    assert location.read_bytes("images/a.png") == b"first image bytes"
    info = location.info("images/a.png")
    assert info is not None and info.size_bytes == 17 and info.mtime_s
    assert path.read_bytes() == b"first image bytes"  # the source is left as it was


def test_stores_that_keep_a_checksum_report_the_sha256(tmp_path: Path, s3_bucket: str) -> None:
    for location in (LocalLocation(tmp_path), open_location(f"s3://{s3_bucket}")):
        path, sha256 = file_of(tmp_path, b"bytes")
        location.put_new("x.png", path, sha256)
        info = location.info("x.png")
        assert info is not None and info.checksum == f"sha256:{sha256}"


def test_a_second_create_never_overwrites(location: Location, tmp_path: Path) -> None:
    first, first_sha = file_of(tmp_path, b"the first writer's image", "one")
    second, second_sha = file_of(tmp_path, b"another", "two")
    assert location.put_new("images/a.png", first, first_sha).created
    again = location.put_new("images/a.png", second, second_sha)
    assert not again.created
    assert again.info.size_bytes == len(b"the first writer's image")
    assert again.info.checksum in {f"sha256:{first_sha}", None}
    assert location.read_bytes("images/a.png") == b"the first writer's image"
    assert [o.key for o in location.list("")] == ["images/a.png"]


def test_a_file_that_does_not_hash_as_expected_is_not_stored(
    location: Location, tmp_path: Path
) -> None:
    path, _ = file_of(tmp_path, b"damaged after it was hashed")
    with pytest.raises(ChecksumMismatch, match=r"images/a\.png"):
        location.put_new("images/a.png", path, hashlib.sha256(b"the original").hexdigest())
    assert location.info("images/a.png") is None
    assert list(location.list("")) == []


def test_put_overwrites_get_copy_delete(location: Location, tmp_path: Path) -> None:
    old, _ = file_of(tmp_path, b"old results", "old")
    new, _ = file_of(tmp_path, b"new results, longer", "new")
    location.put("results.parquet", old)
    info = location.put("results.parquet", new)
    assert info.size_bytes == len(b"new results, longer")
    assert location.read_bytes("results.parquet") == b"new results, longer"
    location.get("results.parquet", tmp_path / "down")
    assert (tmp_path / "down").read_bytes() == b"new results, longer"
    location.copy("results.parquet", "archive/results.parquet")
    assert location.read_bytes("archive/results.parquet") == b"new results, longer"
    location.delete("results.parquet")
    location.delete("results.parquet")  # already gone: nothing to do
    assert location.info("results.parquet") is None
    assert location.info("archive") is None  # a folder is not an object
    with pytest.raises(StorageError, match=r"results\.parquet"):
        location.read_bytes("results.parquet")
    with pytest.raises(StorageError, match=r"results\.parquet"):
        location.get("results.parquet", tmp_path / "down")


def test_list_reads_a_prefix_with_sizes(location: Location, tmp_path: Path) -> None:
    for key, data in {
        "images/a.png": b"a",
        "images/ab.png": b"ab",
        "images/b.png": b"bbb",
        "images/old/a.png": b"olda",
        "imagesque.txt": b"no",
        "results.csv": b"csv",
    }.items():
        location.put(key, file_of(tmp_path, data)[0])
    listed = {o.key: o.size_bytes for o in location.list("images/")}
    assert listed == {
        "images/a.png": 1,
        "images/ab.png": 2,
        "images/b.png": 3,
        "images/old/a.png": 4,
    }
    assert sorted(o.key for o in location.list("images/a")) == ["images/a.png", "images/ab.png"]
    assert len(list(location.list(""))) == 6
    assert list(location.list("nothing/")) == []


def test_keys_stay_inside_the_location(location: Location, tmp_path: Path) -> None:
    path, sha256 = file_of(tmp_path, b"x")
    for key in ("../escape.png", "/abs.png", "a//b.png", "images/./a.png", ""):
        with pytest.raises(ValueError, match="cannot name an object"):
            location.put_new(key, path, sha256)
    assert check_key("images/a.png") == "images/a.png"


def test_urls_are_normalised(tmp_path: Path, s3_bucket: str) -> None:
    assert open_location(tmp_path / "a" / ".." / "out").url == (tmp_path / "out").as_uri()
    assert open_location(f"file://{tmp_path}/out").url == (tmp_path / "out").as_uri()
    assert open_location(str(tmp_path / "out")).is_local
    remote = open_location(f"s3://{s3_bucket}/runs/nightly/")
    assert remote.url == f"s3://{s3_bucket}/runs/nightly" and not remote.is_local
    assert remote.local_path("images/a.png") is None


def test_a_local_create_is_linked_and_leaves_no_temp_file(tmp_path: Path) -> None:
    location = LocalLocation(tmp_path / "out")
    path, sha256 = file_of(tmp_path, b"image")
    location.put_new("images/a.png", path, sha256)
    staged = tmp_path / "out" / "images" / ".tmp-0123456789ab-a.png"
    staged.write_bytes(b"staged in place")
    result = location.put_new(
        "images/b.png", staged, hashlib.sha256(b"staged in place").digest().hex()
    )
    assert result.created and staged.stat().st_nlink == 2  # linked, not copied
    staged.unlink()
    names = [p.name for p in (tmp_path / "out" / "images").iterdir()]
    assert sorted(names) == ["a.png", "b.png"] and not any(map(is_temp_name, names))
    assert [o.key for o in location.list("images/")] == ["images/a.png", "images/b.png"]


def test_a_missing_extra_names_what_to_install() -> None:
    with pytest.raises(StorageError, match=r'pip install "image-runner\[gcs\]"'):
        open_location("gs://bucket/out")
    with pytest.raises(StorageError, match="unknown kind of location"):
        open_location("nosuchscheme://bucket/out")
    with pytest.raises(StorageError, match="names no bucket"):
        open_location("s3://")
