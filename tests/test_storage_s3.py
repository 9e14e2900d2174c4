"""What S3 adds to the Location contract, against moto's server: a listing read page by page,
concurrent creates of one key, the checksum comparison for stores that report only an ETag,
and no credential in any error, traceback or log record."""

from __future__ import annotations

import hashlib
import logging
import threading
import traceback
from pathlib import Path

import pytest

from runner.errors import StorageError
from runner.storage import ObjectInfo, open_location
from runner.storage.remote import reported_checksum, verify_reported
from runner.storage.s3 import PAGE_KEYS

SECRET = "testing-secret-key-5d2e"  # set by tests/services.py start_moto


def test_a_listing_of_2500_objects_reads_every_page(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs  # type: ignore[import-untyped]

    count = 2500
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(
        {f"{s3_bucket}/out/images/{i:05d}.png": b"x" * (i % 7) for i in range(count)}
        | {f"{s3_bucket}/out/results.csv": b"r", f"{s3_bucket}/other/images/a.png": b"o"}
    )
    location = open_location(f"s3://{s3_bucket}/out")
    listed = list(location.list("images/"))
    assert count > 2 * PAGE_KEYS
    assert len(listed) == count
    assert {o.key: o.size_bytes for o in listed} == {
        f"images/{i:05d}.png": i % 7 for i in range(count)
    }
    assert listed[3].checksum == f"md5:{hashlib.md5(b'xxx').hexdigest()}"  # a listing's ETag


def test_concurrent_creates_of_one_key_leave_one_object(s3_bucket: str, tmp_path: Path) -> None:
    location = open_location(f"s3://{s3_bucket}")
    sources = []
    for i in range(8):
        path = tmp_path / f"w{i}"
        path.write_bytes(f"writer {i}".encode())
        sources.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    created: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda p=p, s=s: created.append(location.put_new("images/a.png", p, s).created)
        )
        for p, s in sources
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(created) == [False] * 7 + [True]
    stored = location.read_bytes("images/a.png")
    assert stored in {p.read_bytes() for p, _ in sources}
    info = location.info("images/a.png")
    assert info is not None and info.checksum == f"sha256:{hashlib.sha256(stored).hexdigest()}"


def test_an_etag_only_store_is_checked_by_md5() -> None:
    data = b"sent"
    sha256, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    etag_only = reported_checksum({"ETag": f'"{md5}"'})
    assert etag_only == f"md5:{md5}"
    assert verify_reported(ObjectInfo("k", 4, etag_only), 4, sha256, md5) is None
    damaged = reported_checksum({"ETag": f'"{hashlib.md5(b"sent!").hexdigest()}"'})
    assert "checksum" in (verify_reported(ObjectInfo("k", 4, damaged), 4, sha256, md5) or "")
    assert "bytes" in (verify_reported(ObjectInfo("k", 5, None), 4, sha256, md5) or "")
    assert reported_checksum({"ETag": '"0123-2"'}) is None  # multipart: not an MD5
    assert verify_reported(ObjectInfo("k", 4, None), 4, sha256, md5) is None  # size only


def test_no_credential_in_errors_or_logs(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = tmp_path / "f"
    source.write_bytes(b"data")
    sha256 = hashlib.sha256(b"data").hexdigest()
    missing = open_location("s3://no-such-bucket-for-the-runner/out")
    present = open_location(f"s3://{s3_bucket}/out")
    attempts = [
        lambda: missing.put_new("images/a.png", source, sha256),
        lambda: missing.put("results.csv", source),
        lambda: missing.read_bytes("results.csv"),
        lambda: missing.get("results.csv", tmp_path / "down"),
        lambda: list(missing.list("images/")),
        lambda: missing.copy("a", "b"),
        lambda: present.read_bytes("nothing-here"),
        lambda: present.copy("nothing-here", "b"),
    ]
    texts = []
    for attempt in attempts:
        with pytest.raises(StorageError) as caught:
            attempt()
        assert "out/" in str(caught.value)  # names the object
        texts.append(str(caught.value))
        texts.append(repr(caught.value))
        texts.append("".join(traceback.format_exception(caught.value)))
    texts.append(caplog.text)
    texts.extend(str(r.__dict__) for r in caplog.records)
    assert not [t for t in texts if SECRET in t]
