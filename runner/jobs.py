"""The job spec: one image to generate, validated and immutable. Data only, no I/O.

A job's id names its image file and its checkpoint rows. When the manifest gives none, the id is
derived from everything that determines the image (model, prompt, size, response format and the
bytes of the reference images), so reordering or extending a manifest never confuses resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.api import Endpoint

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

JobStatus = Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True)
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
    ``repeat``, which of the copies it is)."""
    content: dict[str, object] = {
        "model": model,
        "prompt": prompt,
        "size": size,
        "response_format": response_format,
        "images": image_sha256s,
    }
    if repeat_index is not None:
        content["repeat"] = repeat_index
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derive_job_id(prompt: str, content_hash: str) -> str:
    """A stable id from a job's content: a readable slug of the prompt plus a content hash."""
    digest = content_hash[:12]
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    slug = "-".join(words)[:60].strip("-")
    return f"{slug}-{digest}" if slug else f"job-{digest}"
