"""Files on disk, written so that a crash leaves the old state or the new file, never half of one.

Results are written as the crash-safe recipe asks: a temp file in the same folder, fsync,
``os.replace``, fsync the folder. An image that came back as a temp file is edited where it
lies and renamed into place when its edits touch only its end (:func:`rename_spliced`: one
write of the image, not two), else streamed across with its edits (:func:`write_atomic_copy`);
never loaded whole, and hashed on the way. This module also finds a job's image whatever its
format, and hashes files.

Every temp file the runner makes is named by :func:`temp_path_for`, ``.tmp-<random>-<final
name>``: a name no final file can have, since a job id never starts with a dot. A marker inside
the name would not do: ``shot.tmp-1`` is a valid id, and the start-up sweep would delete its
image as a leftover, so that every run paid for it again.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Final

from runner.provider import EXTENSIONS
from runner.stages import timed

TEMP_PREFIX: Final = ".tmp-"
# What earlier versions named their temp files: ``<final name>.tmp-<12 or 8 hex digits>``. A final
# image ends in its extension, and no other file of an output folder ends so, so these are
# still safe to sweep.
_OLD_TEMP_NAME: Final = re.compile(r"\.tmp-(?:[0-9a-f]{12}|[0-9a-f]{8})\Z")
COPY_CHUNK_BYTES = 1 << 20
# How much of a file's end :func:`rename_spliced` rewrites to edit it where it lies.
IN_PLACE_TAIL_BYTES = 1 << 16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old state or the new file.

    A leftover temp file (see :func:`temp_path_for`) is the only trace a crash can leave;
    :func:`remove_temp_files` deletes those on the next start. ``durable=False`` skips the
    fsyncs, for caches that are checked when read (a power cut may then leave the file empty,
    never half of another).
    """
    with atomic_file(path, durable=durable) as f:
        f.write(data)


def write_atomic_copy(
    path: Path,
    source: Path,
    splices: Sequence[tuple[int, int, bytes]] = (),
    *,
    sync_folder: bool = True,
) -> str:
    """Copy ``source`` to ``path`` as :func:`write_atomic` does, streamed, with ``splices``
    applied: ``(offset, bytes removed, bytes inserted)`` in file order (see
    :class:`runner.images.provenance.Splice`). Return the sha256 of what was written.
    ``sync_folder``: as :func:`rename_spliced`'s."""
    with atomic_file(path, sync_folder=sync_folder) as out, timed("write"):
        return copy_spliced(out, source, splices)


def rename_spliced(
    path: Path,
    tmp: Path,
    splices: Sequence[tuple[int, int, bytes]] = (),
    *,
    sync_folder: bool = True,
) -> str | None:
    """Apply ``splices`` to the temp file ``tmp`` where it lies, fsync it and rename it onto
    ``path`` (in the same folder); return the sha256 of the file. The image is written once,
    by whoever streamed it into ``tmp``, instead of copied: possible when the edits all fall
    within the last :data:`IN_PLACE_TAIL_BYTES` of the file (a PNG's chunks, inserted before
    IEND; a small file's, wherever they are). None, with ``tmp`` untouched, when they do not:
    then :func:`write_atomic_copy` it. ``sync_folder=False`` leaves the folder's fsync, which
    makes the rename durable, to the caller (the checkpoint's group commit does it once per
    batch, before the successes it commits)."""
    with open(tmp, "r+b") as f:
        size_bytes = f.seek(0, os.SEEK_END)
        start = min((offset for offset, _, _ in splices), default=size_bytes)
        if not 0 <= size_bytes - start <= IN_PLACE_TAIL_BYTES:  # (past the end: the copy says)
            return None
        with timed("write"):
            f.seek(start)
            tail = bytearray(f.read())
            for offset, remove, insert in reversed(splices):  # from the end: offsets hold
                tail[offset - start : offset - start + remove] = insert
            f.seek(start)
            f.write(tail)
            f.truncate()
            digest = hashlib.sha256()
            f.seek(0)
            _copy(f, digest.update, start)
            digest.update(tail)
            f.flush()
        with timed("fsync file"):
            os.fsync(f.fileno())
    tmp.replace(path)
    if sync_folder:
        with timed("fsync folder"):
            fsync_dir(path.parent)
    return digest.hexdigest()


def copy_spliced(
    out: BinaryIO, source: Path, splices: Sequence[tuple[int, int, bytes]] = ()
) -> str:
    """Stream ``source`` into ``out`` with ``splices`` applied; return the sha256 of what was
    written. The one copy loop of :func:`write_atomic_copy` and of the object-storage saver
    (:mod:`runner.storage.images`), which stages its copy before uploading it."""
    digest = hashlib.sha256()
    with open(source, "rb") as src:

        def put(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        pos = 0
        for offset, remove, insert in splices:
            _copy(src, put, offset - pos)
            put(insert)
            src.seek(remove, os.SEEK_CUR)
            pos = offset + remove
        _copy(src, put, None)
    return digest.hexdigest()


def _copy(src: BinaryIO, put: Callable[[bytes], None], size_bytes: int | None) -> None:
    """Pass the next ``size_bytes`` of ``src`` (all that is left: None) to ``put``."""
    left = size_bytes
    while left is None or left > 0:
        chunk = src.read(COPY_CHUNK_BYTES if left is None else min(left, COPY_CHUNK_BYTES))
        if not chunk:
            if left is not None:
                raise OSError(f"{getattr(src, 'name', 'the file')} shrank while it was copied")
            return
        put(chunk)
        if left is not None:
            left -= len(chunk)


@contextmanager
def atomic_file(
    path: Path, *, durable: bool = True, sync_folder: bool = True
) -> Iterator[BinaryIO]:
    """A new file to write, in binary, renamed onto ``path`` when the block ends well (deleted
    if it raises): :func:`write_atomic` for what is written piece by piece. ``sync_folder``:
    as :func:`rename_spliced`'s."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            if durable:
                f.flush()
                with timed("fsync file"):
                    os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable and sync_folder:
        with timed("fsync folder"):
            fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A new temp file's path beside ``path``, to be renamed onto it: ``.tmp-<random>-<name>``."""
    return path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is that of a temp file of this version or an earlier one, never that of
    a finished image or of another file the runner keeps."""
    # The substring first: the regular expression costs a second a million names.
    return name.startswith(TEMP_PREFIX) or (
        TEMP_PREFIX in name and _OLD_TEMP_NAME.search(name) is not None
    )


def remove_temp_files(folder: Path, *, min_age_s: float = 0.0) -> int:
    """Delete the temp files an interrupted write left in ``folder``; return how many.

    ``min_age_s``: only those not modified for that long. Workers sharing the folder (a shared
    state) write theirs while another process plans: an answer being streamed is modified as
    it comes, and one older than a worker's lease (with a margin) is no live worker's. One
    that vanishes meanwhile (its writer finished it) is no error."""
    removed = 0
    if folder.is_dir():
        oldest_mtime_s = time.time() - min_age_s
        # os.scandir, not Path.iterdir: no Path made for each of a million images.
        with os.scandir(folder) as entries:
            for entry in entries:
                if not is_temp_name(entry.name) or not entry.is_file():
                    continue
                try:
                    if min_age_s > 0 and entry.stat().st_mtime > oldest_mtime_s:
                        continue
                    Path(entry.path).unlink()
                except FileNotFoundError:
                    continue
                removed += 1
    return removed


def find_image(folder: Path, job_id: str) -> Path | None:
    """The final image file of a job, whatever its format, if one exists."""
    for ext in EXTENSIONS.values():
        candidate = folder / f"{job_id}.{ext}"
        if candidate.is_file():
            return candidate
    return None
