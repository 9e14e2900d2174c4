"""A local folder as a :class:`~runner.storage.base.Location`: plain files, as durable as
:mod:`runner.images.files` writes them.

The conditional create is a temp file (named by :func:`~runner.images.files.temp_path_for`,
so the start-up sweep knows it), fsynced, then ``os.link`` onto the final name: a link fails
when the name exists, where a rename would replace it, so two writers of one key leave the
first one's bytes. The folder is fsynced after, so the new name survives a power cut. A file
staged in the object's own folder (as :func:`runner.storage.images.save_image_to` does) is
linked in place, without a second copy.

A folder stores no checksum: :meth:`LocalLocation.info` hashes the file, and a listing reports
sizes only (hashing every file would be the full read a listing exists to avoid).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from runner.errors import ChecksumMismatch, StorageError
from runner.images.files import (
    COPY_CHUNK_BYTES,
    atomic_file,
    fsync_dir,
    is_temp_name,
    sha256_file,
    temp_path_for,
)
from runner.storage.base import ObjectInfo, PutResult, check_key


class LocalLocation:
    """The folder ``root`` (made if missing) as a location."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def __repr__(self) -> str:
        return f"LocalLocation({str(self.root)!r})"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    @property
    def is_local(self) -> bool:
        return True

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_new(self, key: str, local_path: Path, sha256: str) -> PutResult:
        final = self.local_path(key)
        in_place = local_path.parent == final.parent and is_temp_name(local_path.name)
        staged = local_path if in_place else temp_path_for(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if in_place:
                _fsync_file(staged)
                written = sha256_file(staged)
            else:
                written = _copy_durably(local_path, staged)
            if written != sha256:
                raise ChecksumMismatch(
                    f"{local_path.name} hashes to sha256 {written}, not {sha256} as expected: "
                    f"it changed after it was written; nothing was stored at {key}"
                )
            try:
                os.link(staged, final)
            except FileExistsError:
                return PutResult(False, self._info_of(key, final))
            fsync_dir(final.parent)
            return PutResult(True, self._info_of(key, final, sha256))
        except OSError as exc:
            raise self._error("store", key, exc) from exc
        finally:
            if not in_place:
                staged.unlink(missing_ok=True)

    def put(self, key: str, local_path: Path) -> ObjectInfo:
        final = self.local_path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(final) as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)
            return self._info_of(key, final)
        except OSError as exc:
            raise self._error("store", key, exc) from exc

    def get(self, key: str, local_path: Path) -> None:
        try:
            shutil.copyfile(self.local_path(key), local_path)
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.local_path(key).read_bytes()
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def info(self, key: str) -> ObjectInfo | None:
        path = self.local_path(key)
        try:
            return self._info_of(key, path) if path.is_file() else None
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        folder, _, start = prefix.rpartition("/")
        base = self.local_path(folder) if folder else self.root
        try:
            yield from self._walk(base, f"{folder}/" if folder else "", start)
        except OSError as exc:
            raise self._error("list", prefix or "/", exc) from exc

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        try:
            if path.is_file():
                path.unlink()
                fsync_dir(path.parent)
        except OSError as exc:
            raise self._error("delete", key, exc) from exc

    def copy(self, source_key: str, dest_key: str) -> None:
        try:
            self.put(dest_key, self.local_path(source_key))
        except StorageError as exc:
            raise StorageError(f"copying {source_key} to {dest_key}: {exc}") from exc

    def _walk(self, folder: Path, key_prefix: str, start: str) -> Iterator[ObjectInfo]:
        """Files under ``folder`` whose names start with ``start`` (at this level only), and
        everything below the matching subfolders; temp files are not objects."""
        if not folder.is_dir():
            return
        with os.scandir(folder) as entries:
            matching = sorted((e for e in entries if e.name.startswith(start)), key=_name)
        for entry in matching:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), f"{key_prefix}{entry.name}/", "")
            elif entry.is_file() and not is_temp_name(entry.name):
                stat = entry.stat()
                yield ObjectInfo(f"{key_prefix}{entry.name}", stat.st_size, None, stat.st_mtime)

    def _info_of(self, key: str, path: Path, sha256: str | None = None) -> ObjectInfo:
        """``path`` as an object, hashed unless its ``sha256`` is known (just written)."""
        stat = path.stat()
        digest = sha256 or sha256_file(path)
        return ObjectInfo(key, stat.st_size, f"sha256:{digest}", stat.st_mtime)

    def _error(self, verb: str, key: str, exc: OSError) -> StorageError:
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{self.root}: cannot {verb} {key}: there is no such file")
        return StorageError(f"{self.root}: cannot {verb} {key}: {exc.strerror or exc}")


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _copy_durably(source: Path, dest: Path) -> str:
    """Copy ``source`` to the new file ``dest``, fsynced; return its sha256."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dest, "xb") as out:
        while chunk := src.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
