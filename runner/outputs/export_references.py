"""The reference images of an exported edit: checked against the run, copied into the dataset.

An edit's image is only explained by the images it was made from, so an export carries them:
each distinct file once, as ``references/<sha12>-<name>`` (the first 12 hex digits of its
sha256, then its file name with anything but letters, digits, ``.``, ``_`` and ``-`` made
``_``), so two references of one name never clash, and the ``references`` column of each row
gives their paths relative to the dataset's root, in upload order.

The checkpoint keeps the references' paths, not their bytes; but it keeps each job's content
hash, which covers the references' sha256s (:func:`runner.jobs.content_hash`). So a reference is
checked by hashing the job again with the file's current bytes: a match means the very bytes
the run sent. The response format is part of that hash and the checkpoint does not keep it, so
both formats are tried; a sha256 match on either is as good as the bytes themselves. A job whose
reference is missing, unreadable or changed since the run is not exported (its image would be
paired with the wrong reference) and its problem is reported.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Final

from runner.jobs import content_hasher
from runner.provider import RESPONSE_FORMATS
from runner.store.views import ExportJob

REFERENCES_DIR: Final = "references"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ReferenceCopies:
    """The references of one export: each file read and hashed once, copied once under
    ``root``."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._digests: dict[str, str | None] = {}  # path as recorded -> sha256, None: unreadable
        self._copied: dict[str, str] = {}  # path as recorded -> its path in the dataset

    @property
    def copied(self) -> int:
        return len(self._copied)

    def problem(self, job: ExportJob) -> str | None:
        """Why ``job``'s references are not those its image was made from, naming the job and
        the file; None when they are (or it has none)."""
        if not job.references:
            return None
        digests: list[str] = []
        for ref in job.references:
            digest = self._digest(ref)
            if digest is None:
                return f"{job.job_id}: its reference image {ref} is missing or unreadable"
            digests.append(digest)
        for response_format in RESPONSE_FORMATS:
            hasher = content_hasher(job.model, job.size, response_format, tuple(digests))
            if hasher(job.prompt, job.repeat_index) == job.content_hash:
                return None
        names = ", ".join(job.references)
        return f"{job.job_id}: its reference images ({names}) changed since the run"

    def place(self, job: ExportJob) -> tuple[tuple[str, ...], str | None]:
        """Copy ``job``'s references into the dataset (those not copied yet) and return their
        paths there; or, when a file changed since :meth:`problem` looked at it, the problem."""
        paths: list[str] = []
        for ref in job.references:
            placed = self._copied.get(ref)
            if placed is None:
                digest = self._digests[ref]
                assert digest is not None  # problem() came first and found every file
                name = f"{digest[:12]}-{_UNSAFE.sub('_', Path(ref).name)}"
                target = self._root / REFERENCES_DIR / name
                target.parent.mkdir(exist_ok=True)
                if not target.exists() and not _copy_verified(Path(ref), target, digest):
                    return (), f"{job.job_id}: its reference image {ref} changed during the export"
                placed = self._copied[ref] = f"{REFERENCES_DIR}/{name}"
            paths.append(placed)
        return tuple(paths), None

    def _digest(self, ref: str) -> str | None:
        if ref not in self._digests:
            try:
                with open(ref, "rb") as file:
                    self._digests[ref] = hashlib.file_digest(file, "sha256").hexdigest()
            except OSError:
                self._digests[ref] = None
        return self._digests[ref]


def _copy_verified(source: Path, target: Path, digest: str) -> bool:
    """Copy ``source`` to ``target``; False, leaving nothing, if it is not the file of
    sha256 ``digest`` (any more)."""
    try:
        copied: str | None = copy_hashing(source, target)
    except OSError:
        copied = None
    if copied == digest:
        return True
    target.unlink(missing_ok=True)
    return False


def copy_hashing(source: Path, target: Path) -> str:
    """Copy ``source`` to the new file ``target``; return the sha256 of what was copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()
