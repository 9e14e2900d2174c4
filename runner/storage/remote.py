"""Object stores through fsspec (``s3://``, ``gs://``, ``az://``) as a
:class:`~runner.storage.base.Location`.

fsspec and its backends (s3fs, gcsfs, adlfs) are optional extras, imported only when a URL
names one: a missing one is a :class:`~runner.errors.StorageError` that says which extra to
install. Credentials are the backend's standard chain (environment, config files, instance
roles): nothing here reads or passes one, and the secrets of that chain found in the
environment are registered with :mod:`runner.redact`, so that no log record shows them either.

Every backend error becomes a :class:`~runner.errors.StorageError` naming the object and what
to check, its text masked by :func:`runner.redact.redact`.

The conditional create is the backend's own (``mode="create"``: If-None-Match on S3,
``ifGenerationMatch=0`` on GCS, no overwrite on Azure); its checksum is checked against what
the store reports after the write (:meth:`FsspecLocation._verify_stored`). S3 does more, see
:mod:`runner.storage.s3`.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.errors import ChecksumMismatch, StorageError
from runner.redact import redact, register_secret
from runner.storage.base import (
    ObjectInfo,
    PutResult,
    check_key,
    checksums_agree,
    file_digests,
    location_url,
)

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
# The secrets of the standard chains that can sit in the environment.
_SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
)


def open_remote(url: str) -> FsspecLocation:
    """The location of ``scheme://bucket/prefix`` (a trailing slash is dropped)."""
    scheme, _, root = location_url(url).partition("://")
    if not root:
        raise StorageError(f"{scheme}://: the output location names no bucket ({scheme}://BUCKET)")
    for name in _SECRET_VARIABLES:
        register_secret(os.environ.get(name, ""))
    install = f'pip install "image-runner[{EXTRAS.get(scheme, scheme)}]"'
    try:
        import fsspec  # type: ignore[import-untyped]

        fs = fsspec.filesystem(scheme)
    except ImportError as exc:
        raise StorageError(
            f"{scheme}://{root}: this kind of location needs an optional package ({exc.name}): "
            f"{install}"
        ) from None
    except ValueError:
        known = "s3://, gs://, az:// or a local folder"
        raise StorageError(f"{scheme}://{root}: unknown kind of location; use {known}") from None
    if scheme in {"s3", "s3a"}:
        from runner.storage.s3 import S3Location

        return S3Location(fs, scheme, root)
    return FsspecLocation(fs, scheme, root)


class FsspecLocation:
    """``root`` (``bucket/prefix``) on the fsspec filesystem ``fs``."""

    def __init__(self, fs: Any, scheme: str, root: str) -> None:
        self._fs = fs
        self._scheme = scheme
        self._root = root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self._root}"

    @property
    def is_local(self) -> bool:
        return False

    def local_path(self, key: str) -> Path | None:
        return None

    def put_new(self, key: str, local_path: Path, sha256: str) -> PutResult:
        check_key(key)
        size_bytes, sha256_hex, md5_hex = file_digests(local_path)
        if sha256_hex != sha256:
            raise ChecksumMismatch(
                f"{local_path.name} hashes to sha256 {sha256_hex}, not {sha256} as expected: it "
                f"changed after it was written; nothing was stored at {self.url}/{key}"
            )
        try:
            stored = self._create(key, local_path, sha256_hex)
        except FileExistsError:
            existing = self.info(key)
            if existing is None:  # deleted since: a retry would race again, so say so
                raise StorageError(f"{self.url}/{key} existed, then vanished: run again") from None
            return PutResult(False, existing)
        except Exception as exc:
            raise self._error("store", key, exc) from exc
        self._verify_stored(stored, size_bytes, sha256_hex, md5_hex)
        return PutResult(True, stored)

    def put(self, key: str, local_path: Path) -> ObjectInfo:
        path = self._path(key)
        try:
            self._fs.put_file(str(local_path), path)
        except Exception as exc:
            raise self._error("store", key, exc) from exc
        stored = self.info(key)
        if stored is None:
            raise StorageError(f"{self.url}/{key} is missing right after it was written: run again")
        return stored

    def get(self, key: str, local_path: Path) -> None:
        path = self._path(key)
        try:
            self._fs.get_file(path, str(local_path))
        except Exception as exc:
            raise self._error("read", key, exc) from exc

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data: bytes = self._fs.cat_file(path)
        except Exception as exc:
            raise self._error("read", key, exc) from exc
        return data

    def info(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            found = self._fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error("read", key, exc) from exc
        return None if found.get("type") == "directory" else object_info(key, found)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        folder = prefix.rpartition("/")[0]
        base = f"{self._root}/{check_key(folder)}" if folder else self._root
        try:
            found = self._fs.find(base, detail=True)
        except Exception as exc:
            raise self._error("list", prefix or "/", exc) from exc
        cut = len(self._root) + 1
        for path, entry in sorted(found.items()):
            key = path.strip("/")[cut:]
            if key.startswith(prefix) and entry.get("type") != "directory":
                yield object_info(key, entry)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._error("delete", key, exc) from exc

    def copy(self, source_key: str, dest_key: str) -> None:
        source, dest = self._path(source_key), self._path(dest_key)
        try:
            self._fs.copy(source, dest)
        except Exception as exc:
            raise self._error("copy", f"{source_key} to {dest_key}", exc) from exc

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def _create(self, key: str, local_path: Path, sha256: str) -> ObjectInfo:
        """Upload only if absent (``FileExistsError`` otherwise); what the store now reports."""
        self._fs.put_file(str(local_path), self._path(key), mode="create")
        stored = self.info(key)
        if stored is None:
            raise StorageError(f"{self.url}/{key} is missing right after it was written: run again")
        return stored

    def _verify_stored(self, stored: ObjectInfo, size_bytes: int, sha256: str, md5: str) -> None:
        """Compare what the store reports of an object just created with what was sent; on a
        difference, delete it (it is this write's own) and raise ChecksumMismatch."""
        problem = verify_reported(stored, size_bytes, sha256, md5)
        if problem:
            self.delete(stored.key)
            raise ChecksumMismatch(f"{self.url}/{stored.key}: {problem}; the object was removed")

    def _error(self, verb: str, key: str, exc: BaseException) -> StorageError:
        where = f"{self.url}/{key}"
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, FileNotFoundError):
            missing = "no such object" if verb in {"read", "copy"} else "no such bucket"
            return StorageError(
                f"cannot {verb} {where}: {missing}; check the bucket's name in the location"
            )
        if isinstance(exc, PermissionError):
            return StorageError(
                f"cannot {verb} {where}: access denied; check the credentials the "
                f"{self._scheme} standard chain finds (environment, config files, instance role)"
            )
        return StorageError(f"cannot {verb} {where}: {redact(f'{type(exc).__name__}: {exc}')}")


def verify_reported(stored: ObjectInfo, size_bytes: int, sha256: str, md5: str) -> str | None:
    """What is wrong with an object the store reports as ``stored``, sent as ``size_bytes``
    bytes hashing to ``sha256`` and ``md5`` (hex); None when nothing is. A store that reports
    no checksum is judged by the size."""
    if stored.size_bytes != size_bytes:
        return f"the store holds {stored.size_bytes} bytes, but {size_bytes} were sent"
    expected = f"md5:{md5}" if (stored.checksum or "").startswith("md5:") else f"sha256:{sha256}"
    if checksums_agree(stored.checksum, expected) is False:
        return f"the store reports checksum {stored.checksum}, but what was sent is {expected}"
    return None


def object_info(key: str, entry: dict[str, Any]) -> ObjectInfo:
    """An :class:`ObjectInfo` from an fsspec ``info``/``find`` entry, or a boto3 object."""
    size_bytes = int(entry.get("size", entry.get("Size", entry.get("ContentLength", 0))))
    return ObjectInfo(key, size_bytes, reported_checksum(entry), _mtime_s(entry))


def _mtime_s(entry: dict[str, Any]) -> float | None:
    """The modification time under whichever name the backend uses (S3, Azure, GCS, fsspec's
    own), as a datetime, an ISO string or seconds."""
    for name in ("LastModified", "last_modified", "updated", "mtime", "created"):
        value = entry.get(name)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


def reported_checksum(entry: dict[str, Any]) -> str | None:
    """The strongest checksum a store reports: S3's SHA-256, GCS's MD5, else an S3 ETag when
    it is an MD5 (one PUT, no ``-parts`` suffix)."""
    for name, algorithm in (("ChecksumSHA256", "sha256"), ("md5Hash", "md5")):
        value = entry.get(name)
        if isinstance(value, str) and value:
            try:
                return f"{algorithm}:{base64.b64decode(value, validate=True).hex()}"
            except binascii.Error:
                return None
    etag = str(entry.get("ETag", entry.get("etag", ""))).strip('"').lower()
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return f"md5:{etag}"
    return None
