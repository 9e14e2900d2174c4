"""What the runner asks of an output location, whatever holds it: the :class:`Location`
protocol, the :class:`ObjectInfo` it reports, and the key and checksum rules all backends share.

A location is a root (a local folder, or ``s3://bucket/prefix``) holding objects named by
*keys*: relative POSIX paths such as ``images/shot-1.png`` or ``results.parquet``. Keys are
checked here once (:func:`check_key`), so no backend ever builds a path outside its root.

Checksums are strings tagged with their algorithm, ``sha256:<hex>`` or ``md5:<hex>``, because
stores report different ones: S3 keeps the SHA-256 sent with an upload, but a listing gives
only ETags (the MD5 of an object written in one PUT), and a local folder has none stored at
all. Two checksums compare only when their algorithms agree (:func:`checksums_agree`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from runner.images.files import COPY_CHUNK_BYTES

_KEY_PART = re.compile(r"[^/\x00]+")


@dataclass(frozen=True)
class ObjectInfo:
    """One object as its store describes it. ``checksum`` is tagged (``sha256:…``,
    ``md5:…``) or None when the store reports none; ``mtime_s`` is POSIX seconds."""

    key: str
    size_bytes: int
    checksum: str | None
    mtime_s: float | None = None


@dataclass(frozen=True)
class PutResult:
    """What :meth:`Location.put_new` did: ``created`` the object, or found one there already
    (``created`` False), left untouched; ``info`` describes the object now at the key."""

    created: bool
    info: ObjectInfo


class Location(Protocol):
    """An output location: a local folder or an object store, seen as keys and objects.

    Every method blocks (disk or network): async callers run them in a worker thread. Errors
    are :class:`~runner.errors.StorageError` (a missing object included), never a backend's
    own, and never name a credential.
    """

    @property
    def url(self) -> str:
        """The normalised URL that identifies the location (a run's identity): ``file:///abs``
        for a folder, ``scheme://bucket/prefix`` without a trailing slash otherwise."""
        ...

    @property
    def is_local(self) -> bool:
        """Whether the objects are plain files on this machine (see :meth:`local_path`)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file that holds ``key`` when the location is a local folder, else None: readers
        (reports, exports) then open it in place instead of downloading a copy."""
        ...

    def put_new(self, key: str, local_path: Path, sha256: str) -> PutResult:
        """Create ``key`` from the file ``local_path`` only if no object has that key: an
        existing object is never overwritten (``created`` False, its info returned). The file
        must hash to ``sha256`` (hex) and the store must report the bytes it received as such,
        else :class:`~runner.errors.ChecksumMismatch` and no object is left."""
        ...

    def put(self, key: str, local_path: Path) -> ObjectInfo:
        """Write ``key`` from ``local_path``, replacing any object there, as atomically as the
        backend allows (readers see the old object or the new one, never half of one)."""
        ...

    def get(self, key: str, local_path: Path) -> None:
        """Download ``key`` into the file ``local_path`` (replaced)."""
        ...

    def read_bytes(self, key: str) -> bytes: ...

    def info(self, key: str) -> ObjectInfo | None:
        """The object at ``key``, or None when there is none."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, read a page at a time by listing
        (never one request per object), in no promised order."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing happens when it does not exist."""
        ...

    def copy(self, source_key: str, dest_key: str) -> None:
        """Copy ``source_key`` to ``dest_key`` (replaced), inside the store where it can."""
        ...


def location_url(out: str | Path) -> str:
    """The normalised URL of the location ``out`` names, which is a run's identity (the same
    folder named two ways is one run): a local path or ``file://`` URL as ``file://`` + its
    resolved absolute path; ``scheme://bucket/prefix`` with its scheme in lower case and no
    slash around ``bucket/prefix``. Pure text: no backend is imported."""
    if not is_remote(out):
        text = str(out)
        if text.lower().startswith("file://"):
            text = unquote(urlsplit(text).path)
        return Path(text).expanduser().resolve().as_uri()
    scheme, _, rest = str(out).partition("://")
    return f"{scheme.lower()}://{rest.strip('/')}"


def is_remote(out: str | Path) -> bool:
    """Whether ``out`` names an object store (``s3://``...), not a local folder."""
    if isinstance(out, Path):
        return False
    scheme, found, _ = out.partition("://")
    return bool(found) and scheme.lower() != "file"


def check_key(key: str) -> str:
    """``key`` if it is a relative POSIX path without ``.``/``..``/empty parts, else
    ``ValueError``: keys come from job ids and file names the runner makes, so a bad one is
    a bug, never a path outside the location."""
    parts = key.split("/")
    if not key or any(not _KEY_PART.fullmatch(p) or p in {".", ".."} for p in parts):
        raise ValueError(f"{key!r} cannot name an object: not a relative path of plain names")
    return key


def checksums_agree(a: str | None, b: str | None) -> bool | None:
    """Whether two tagged checksums are equal; None when they cannot be compared (either is
    missing, or their algorithms differ)."""
    if a is None or b is None:
        return None
    if a.split(":", 1)[0] != b.split(":", 1)[0]:
        return None
    return a == b


def file_digests(path: Path) -> tuple[int, str, str]:
    """Size, sha256 and md5 (hex) of a file, in one read: the MD5 for stores that report only
    that (an S3 ETag, GCS)."""
    sha256, md5, size_bytes = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            sha256.update(chunk)
            md5.update(chunk)
            size_bytes += len(chunk)
    return size_bytes, sha256.hexdigest(), md5.hexdigest()
