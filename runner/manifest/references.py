"""Reference images checked for the validator: each distinct path resolved once, each distinct
file read, sized and decoded once, its sha256 (part of the content hash) or its problem kept.

A catalog of a million rows may name the same few images; checking them once a row would read
and decode them a million times. Paths are relative to a base folder: the manifest's, or the
one :func:`runner.manifest.load_jobs` was given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from runner.images.verify import ImageInvalid, inspect_image
from runner.manifest.read import show
from runner.provider import REFERENCE_MAX_BYTES


class References:
    """The checked reference images of one manifest (or set of records)."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._refs: dict[str, tuple[Path, str] | str] = {}  # as written -> check(ref)
        self._files: dict[Path, tuple[str | None, str | None]] = {}  # resolved -> _check(path)

    def check(self, ref: str) -> tuple[Path, str] | str:
        """``(absolute path, sha256)`` of a good image; otherwise its problem, naming ``ref``."""
        known = self._refs.get(ref)
        if known is None:
            known = self._refs[ref] = self._check_ref(ref)
        return known

    def _check_ref(self, ref: str) -> tuple[Path, str] | str:
        try:
            path = (self._base / ref).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL, symlink loop
            return f"{show(ref)} is not a usable path: {exc}"
        if path not in self._files:  # two spellings of one path: one read
            self._files[path] = _check(path)
        digest, problem = self._files[path]
        return (path, digest) if digest is not None else f"{ref} {problem}"


def _check(path: Path) -> tuple[str | None, str | None]:
    try:
        if not path.exists():
            return None, f"does not exist ({path})"
        if not path.is_file():
            return None, f"is not a file ({path})"
        size_bytes = path.stat().st_size
        if size_bytes > REFERENCE_MAX_BYTES:  # refused before it is read and decoded
            return None, f"is {size_bytes / 1e6:.1f} MB, over the 10 MB limit"
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror}"
    except ValueError as exc:
        return None, f"is not a usable path: {exc}"
    try:
        inspect_image(data)
    except ImageInvalid as exc:
        return None, str(exc)
    return hashlib.sha256(data).hexdigest(), None
