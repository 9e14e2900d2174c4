"""The job spec: one image to generate, validated and immutable. Data only, no I/O.

A job's id names its image file and its checkpoint rows. When the manifest gives none, the id is
derived from everything that determines the image (model, prompt, size, response format and the
bytes of the reference images), so reordering or extending a manifest never confuses resume.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Literal

from runner.provider import Endpoint

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

JobStatus = Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)  # slots: a run may walk a million of them
class Job:
    id: str
    prompt: str
    model: str
    size: str | None  # None: the provider's default tier; "auto": edits follow the reference
    response_format: str
    images: tuple[Path, ...] = ()  # reference images, resolved, in upload order
    row: str = ""  # where the job came from, for messages: "row 3 (line 12)"
    content_hash: str = ""  # of everything that shapes the image; see content_hash()
    variant: str = ""  # which expansion of a matrix row: "style=watercolor #2"

    @property
    def where(self) -> str:
        """Where the job comes from, for messages."""
        return f"{self.row} [{self.variant}]" if self.variant else self.row

    @property
    def endpoint(self) -> Endpoint:
        return "edits" if self.images else "generations"

    @property
    def expected_size(self) -> tuple[int, int] | None:
        """The (width, height) the image must have, when the request pins it."""
        if self.size is None or self.size == "auto":
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


def content_hash(
    *,
    model: str,
    prompt: str,
    size: str | None,
    response_format: str,
    image_sha256s: list[str],
    repeat_index: int | None = None,
) -> str:
    """A hash of everything that determines a job's image, reference bytes included (and, for
    ``repeat``, which of the copies it is).

    The hashed text is ``json.dumps(content, sort_keys=True, ensure_ascii=False)`` of a mapping
    of those fields. Its bytes must never change: derived ids and resume depend on them (a test
    pins them against ``json.dumps``). It is spelled out here because this runs once per job of
    manifests of millions, where ``json.dumps`` would take three times as long: the text before
    the prompt and after it is the same for most jobs of a manifest, so a hash of the first is
    kept (and copied) and the second is kept as bytes.
    """
    head, tail = _hash_parts(model, size, response_format, tuple(image_sha256s))
    digest = head.copy()
    digest.update(encode_basestring(prompt).encode())
    if repeat_index is not None:
        digest.update(f', "repeat": {int(repeat_index)}'.encode())
    digest.update(tail)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _hash_parts(
    model: str, size: str | None, response_format: str, image_sha256s: tuple[str, ...]
) -> tuple[hashlib._Hash, bytes]:
    images = ", ".join(map(encode_basestring, image_sha256s))
    head = f'{{"images": [{images}], "model": {encode_basestring(model)}, "prompt": '
    size_json = "null" if size is None else encode_basestring(size)
    tail = f', "response_format": {encode_basestring(response_format)}, "size": {size_json}}}'
    return hashlib.sha256(head.encode()), tail.encode()


def derive_job_id(prompt: str, content_hash: str) -> str:
    """A stable id from a job's content: a readable slug of the prompt plus a content hash."""
    digest = content_hash[:12]
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    slug = "-".join(words)[:60].strip("-")
    return f"{slug}-{digest}" if slug else f"job-{digest}"
