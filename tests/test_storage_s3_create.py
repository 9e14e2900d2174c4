"""S3's conditional create when the store's refusal does not say why (against moto's server):
a 412 without its ``Condition`` header, or a 409 ``ConditionalRequestConflict``, as s3fs
passes them on. The refusals are raised by a subclass's one ``PutObject``; every other call
goes to the real server."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any

import pytest

from runner.errors import StorageError
from runner.storage import open_location
from runner.storage.s3 import CONFLICT_RETRIES, S3Location


class Refusing(S3Location):
    """S3 whose first ``refusals`` creates fail with ``error``; with ``other``, another
    writer's object is put at the key just before each refusal."""

    def __init__(self, bucket: str, error: OSError, refusals: int, *, other: bytes = b"") -> None:
        import s3fs  # type: ignore[import-untyped]

        super().__init__(s3fs.S3FileSystem(skip_instance_cache=True), "s3", f"{bucket}/out")
        self.error, self.refusals, self.other, self.calls = error, refusals, other, 0

    def _put_object(self, key: str, local_path: Path, sha256: str) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.refusals:
            if self.other:
                self._fs.pipe_file(self._path(key), self.other)
            raise self.error
        return super()._put_object(key, local_path, sha256)


def source(tmp_path: Path, data: bytes = b"mine") -> tuple[Path, str]:
    path = tmp_path / "src"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def conflict() -> OSError:
    from botocore.exceptions import ClientError

    error = OSError(errno.EIO, "ConditionalRequestConflict")
    error.__cause__ = ClientError(
        {
            "Error": {"Code": "ConditionalRequestConflict", "Message": "in progress"},
            "ResponseMetadata": {"HTTPStatusCode": 409},
        },
        "PutObject",
    )
    return error


def test_a_412_without_its_condition_header_is_an_object_there(
    s3_bucket: str, tmp_path: Path
) -> None:
    location = Refusing(s3_bucket, OSError(errno.EINVAL, "PreconditionFailed"), 1, other=b"theirs")
    path, sha256 = source(tmp_path)
    result = location.put_new("images/a.png", path, sha256)
    assert not result.created
    assert open_location(f"s3://{s3_bucket}/out").read_bytes("images/a.png") == b"theirs"


def test_a_409_conflict_is_tried_again_and_creates(s3_bucket: str, tmp_path: Path) -> None:
    location = Refusing(s3_bucket, conflict(), CONFLICT_RETRIES)
    path, sha256 = source(tmp_path)
    result = location.put_new("images/a.png", path, sha256)
    assert result.created and location.calls == CONFLICT_RETRIES + 1
    assert result.info.checksum == f"sha256:{sha256}"
    assert location.read_bytes("images/a.png") == b"mine"


def test_a_409_that_lasts_or_another_refusal_is_a_storage_error(
    s3_bucket: str, tmp_path: Path
) -> None:
    path, sha256 = source(tmp_path)
    lasting = Refusing(s3_bucket, conflict(), CONFLICT_RETRIES + 1)
    with pytest.raises(StorageError):
        lasting.put_new("images/a.png", path, sha256)
    assert lasting.calls == CONFLICT_RETRIES + 1
    other = Refusing(s3_bucket, OSError(errno.EINVAL, "InvalidArgument"), 1)
    with pytest.raises(StorageError):
        other.put_new("images/b.png", path, sha256)
    assert other.calls == 1 and other.info("images/b.png") is None
