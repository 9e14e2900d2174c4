"""The job spec: one image to generate, validated and immutable. Data only, no I/O.

A job's id names its image file and its checkpoint rows. When the manifest gives none, the id is
derived from everything that determines the image (model, prompt, size, response format and the
bytes of the reference images), so reordering or extending a manifest never confuses resume.

Jobs are made by :mod:`runner.manifest` (:func:`~runner.manifest.load_manifest`,
:func:`~runner.manifest.load_jobs`) and nothing else: it checks every row, reports every
problem with its row and field, and computes the content hash from the fields it hashes. A job
whose hash is not that of its fields would break resume silently (a prompt changed with the old
hash kept is taken for done, with the old prompt's image), so the constructor, and with it
``dataclasses.replace``, refuses any caller without the package's private token
(:class:`TypeError`). With it (the tests' jobs), the constructor checks every field
(:class:`ValueError`): the rules the validator applies in words for a manifest's author, which a
test holds to these. The spool rebuilds the jobs it holds without the constructor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from json.encoder import encode_basestring
from pathlib import Path
from typing import Final, Literal

from runner.provider import (
    AUTO_SIZE,
    MODELS,
    MODELS_WITHOUT_SIZE,
    RESPONSE_FORMATS,
    SIZES,
    Endpoint,
)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")

JobStatus = Literal["pending", "succeeded", "failed"]


def _valid_shapes() -> frozenset[tuple[str, str | None, str, bool]]:
    """Every (model, size, response format, has references) a job may be sent with: a model
    without sizes takes none; an edit without a size is sent as ``auto``, a generation's size
    may be left to the provider."""
    shapes: set[tuple[str, str | None, str, bool]] = set()
    for model in MODELS:
        for response_format in RESPONSE_FORMATS:
            for edit in (False, True):
                if model in MODELS_WITHOUT_SIZE:
                    sizes: tuple[str | None, ...] = (None,)
                else:
                    sizes = (*SIZES, AUTO_SIZE if edit else None)
                shapes.update((model, size, response_format, edit) for size in sizes)
    return frozenset(shapes)


VALID_SHAPES: Final = _valid_shapes()

# What the constructor asks for (see the module's docstring). Private to the package and its
# tests: a user who finds it has gone out of their way.
_TOKEN: Final = object()


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a run may walk a million of them
class Job:
    id: str
    prompt: str
    model: str
    size: str | None  # None: the provider's default tier; "auto": edits follow the reference
    response_format: str
    content_hash: str  # of everything that shapes the image; see content_hash()
    images: tuple[Path, ...] = ()  # reference images, resolved, in upload order
    row: str = ""  # where the job came from, for messages: "row 3 (line 12)"
    variant: str = ""  # which expansion of a matrix row: "style=watercolor #2"
    # What a matrix row made this job of, for the dataset's columns (not hashed: the prompt and
    # the repeat index are, through content_hash): its variables' values as the manifest gives
    # them, the copy number of a row with ``repeat``, and the row's prompt template.
    vars: tuple[tuple[str, str | int | float], ...] = ()
    repeat_index: int | None = None
    template: str = ""
    _token: dataclasses.InitVar[object] = None  # _TOKEN, or the job is made by hand: refused

    def __post_init__(self, _token: object) -> None:
        if _token is not _TOKEN:
            raise TypeError(
                "a Job is not built by hand: get jobs from runner.load_jobs (records, a "
                "DataFrame) or runner.load_manifest (a file), which check them and compute "
                "their content hash; to change a job, change its record and load it again"
            )
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"invalid job {self.id!r}: {problem}")

    def _problem(self) -> str | None:
        if not isinstance(self.id, str) or not JOB_ID_RE.fullmatch(self.id):
            return "id must be 1-128 of A-Z a-z 0-9 . _ - and not start with a dot"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            return "prompt must be non-blank text"
        if type(self.images) is not tuple or not all(isinstance(p, Path) for p in self.images):
            return "images must be a tuple of Paths"
        if (self.model, self.size, self.response_format, bool(self.images)) not in VALID_SHAPES:
            kind = "an edit" if self.images else "a generation"
            return (
                f"model {self.model!r}, size {self.size!r} and response_format "
                f"{self.response_format!r} are no valid combination for {kind}"
            )
        if not isinstance(self.content_hash, str) or not _SHA256_RE.fullmatch(self.content_hash):
            return (
                "content_hash must be the sha256 (64 hex digits) of what shapes the image, "
                "as content_hash() computes it: resume depends on it"
            )
        if not isinstance(self.row, str) or not isinstance(self.variant, str):
            return "row and variant must be text"
        if type(self.vars) is not tuple or not all(
            isinstance(name, str) and isinstance(value, str | int | float)
            for name, value in self.vars
        ):
            return "vars must be a tuple of (name, text or number) pairs"
        if self.repeat_index is not None and not (
            isinstance(self.repeat_index, int) and self.repeat_index >= 1
        ):
            return "repeat_index must be None or a whole number from 1"
        if not isinstance(self.template, str):
            return "template must be text"
        return None

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
    hasher = content_hasher(model, size, response_format, tuple(image_sha256s))
    return hasher(prompt, repeat_index)


class ContentHasher:
    """:func:`content_hash` for the jobs that share a model, size, response format and
    references: all of them, or nearly, in a manifest of millions.

    The hashed text is ``json.dumps(content, sort_keys=True, ensure_ascii=False)`` of a mapping
    of those fields and the prompt. Its bytes must never change: derived ids and resume depend
    on them (a test pins them against ``json.dumps``). It is spelled out here because this runs
    once per job, where ``json.dumps`` would take three times as long: the text before the
    prompt and after it is the same for the jobs sharing this hasher, so a hash of the first is
    kept (and copied) and the second is kept as bytes.
    """

    __slots__ = ("_head", "_tail")

    def __init__(
        self, model: str, size: str | None, response_format: str, image_sha256s: tuple[str, ...]
    ) -> None:
        images = ", ".join(map(encode_basestring, image_sha256s))
        head = f'{{"images": [{images}], "model": {encode_basestring(model)}, "prompt": '
        size_json = "null" if size is None else encode_basestring(size)
        tail = f', "response_format": {encode_basestring(response_format)}, "size": {size_json}}}'
        self._head = hashlib.sha256(head.encode())
        self._tail = tail.encode()

    def __call__(self, prompt: str, repeat_index: int | None = None) -> str:
        digest = self._head.copy()
        digest.update(encode_basestring(prompt).encode())
        if repeat_index is not None:
            digest.update(f', "repeat": {int(repeat_index)}'.encode())
        digest.update(self._tail)
        return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def content_hasher(
    model: str, size: str | None, response_format: str, image_sha256s: tuple[str, ...]
) -> ContentHasher:
    """The (shared) :class:`ContentHasher` of jobs with these fields."""
    return ContentHasher(model, size, response_format, image_sha256s)


def derive_job_id(prompt: str, content_hash: str) -> str:
    """A stable id from a job's content: a readable slug of the prompt plus a content hash."""
    digest = content_hash[:12]
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    slug = "-".join(words)[:60].strip("-")
    return f"{slug}-{digest}" if slug else f"job-{digest}"
