"""S3 and S3-compatible stores (MinIO, R2, moto): what :mod:`runner.storage.remote` does, plus
a checksum the store keeps, a HEAD that reports it, and a listing read page by page.

- **Conditional create with a checksum.** One ``PutObject`` with ``If-None-Match: *`` (a second
  writer gets 412, never an overwrite) and ``ChecksumSHA256`` set to the file's SHA-256: S3
  refuses bytes that do not hash to it, keeps it, and returns it. The answer's checksum is then
  compared with ours; a store that ignores checksums answers with an ETag only, the MD5 of a
  one-PUT object, which is compared with our MD5 instead. Images are far below the 5 GiB a
  PUT takes; results and ledgers, which may not be, go through :meth:`put` (multipart).
  A refused create is not trusted to say why: s3fs makes a 412 a ``FileExistsError`` only
  when the answer carries ``Condition: If-None-Match`` (else an ``OSError(EINVAL)``), and AWS
  answers a create racing another with 409 ``ConditionalRequestConflict`` (``OSError(EIO)``).
  So on any failure the key is looked at (a HEAD): an object there is the other writer's,
  adopted as if the store had said so; a 409 with nothing there is tried again, up to
  ``CONFLICT_RETRIES`` times.
- **HEAD** asks for the checksum (``ChecksumMode=ENABLED``), else S3 leaves it out.
- **LIST** is ``ListObjectsV2`` a page (1,000 keys) at a time, so planning and adoption read a
  million objects in a thousand requests, holding one page at a time; a listing has ETags, no
  SHA-256.

``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``) is read by botocore itself since 1.31, and
s3fs 2024.12 requires a newer one: nothing here passes an endpoint, so a config file's
``endpoint_url`` works as well.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from runner.errors import StorageError
from runner.storage.base import ObjectInfo, check_key
from runner.storage.remote import FsspecLocation, object_info

MAX_PUT_BYTES: Final = 5 * 2**30  # S3's limit for one PutObject
PAGE_KEYS: Final = 1000  # S3's largest page
CONFLICT_RETRIES: Final = 3  # a 409 means another create of the key was in progress
CONFLICT_PAUSE_S: Final = 0.05


class S3Location(FsspecLocation):
    """``bucket/prefix`` on S3, through s3fs's client (``fs.call_s3``)."""

    def __init__(self, fs: Any, scheme: str, root: str) -> None:
        super().__init__(fs, scheme, root)
        self._bucket, _, prefix = root.partition("/")
        self._prefix = f"{prefix}/" if prefix else ""

    def info(self, key: str) -> ObjectInfo | None:
        s3_key = self._key(key)
        try:
            head = self._fs.call_s3(
                "head_object", Bucket=self._bucket, Key=s3_key, ChecksumMode="ENABLED"
            )
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error("read", key, exc) from exc
        return object_info(key, head)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        folder = prefix.rpartition("/")[0]
        if folder:
            check_key(folder)
        cut = len(self._prefix)
        page: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._prefix + prefix}
        while True:
            try:
                answer = self._fs.call_s3("list_objects_v2", MaxKeys=PAGE_KEYS, **page)
            except Exception as exc:
                raise self._error("list", prefix or "/", exc) from exc
            for entry in answer.get("Contents", ()):
                yield object_info(entry["Key"][cut:], entry)
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return
            page["ContinuationToken"] = token

    def _create(self, key: str, local_path: Path, sha256: str) -> ObjectInfo:
        size_bytes = local_path.stat().st_size
        if size_bytes > MAX_PUT_BYTES:
            raise StorageError(
                f"{self.url}/{key}: {local_path.name} is {size_bytes} bytes, more than one S3 "
                "PUT takes (5 GiB); nothing was stored"
            )
        answer: dict[str, Any] = {}
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                answer = self._put_object(key, local_path, sha256)
            except FileExistsError:
                raise
            except Exception as exc:
                if self.info(key) is not None:
                    raise FileExistsError(f"{self.url}/{key} exists") from exc
                if not _is_conflict(exc) or attempt == CONFLICT_RETRIES:
                    raise
                time.sleep(CONFLICT_PAUSE_S * (attempt + 1))
            else:
                break
        self._fs.invalidate_cache(self._path(key))
        return object_info(key, {**answer, "size": size_bytes})

    def _put_object(self, key: str, local_path: Path, sha256: str) -> dict[str, Any]:
        """One ``PutObject`` of ``local_path`` at ``key`` if absent, with its SHA-256; the
        store's answer."""
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        answer: dict[str, Any] = self._fs.call_s3(
            "put_object",
            Bucket=self._bucket,
            Key=self._key(key),
            Body=local_path.read_bytes(),
            IfNoneMatch="*",
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        return answer

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)


def _is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is S3's 409 (``ConditionalRequestConflict``), as s3fs passes it on."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(error.get("Code") == "ConditionalRequestConflict" or status == 409)
