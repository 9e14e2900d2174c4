"""The one validator: a raw row in, the jobs it stands for (or its problems) out; and the check
that no id is used twice.

Every row of every source (YAML, CSV, Python records) goes through :meth:`Validator.jobs`, and
nothing else makes jobs (a :class:`~runner.jobs.Job`'s constructor refuses callers without the
package's private token; the spool only rebuilds the jobs made here), so a job's id and content
hash never depend on where it was written.
It runs once a row, up to millions of times, so its common case is cheap: the model, size and
response format of a row are checked together once per distinct combination and remembered
(a manifest has a few dozen), and the checks that only some rows need (references, a matrix,
``repeat``) run only on the rows that have them. A row's problems are all reported, each with
its field; a row with any problem makes no job.

The jobs come out packed (:data:`~runner.manifest.spool.Packed`), as the spool stores them:
building a :class:`~runner.jobs.Job` for each would cost more than the checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from runner.errors import ManifestIssue
from runner.jobs import JOB_ID_RE, VALID_SHAPES, ContentHasher, content_hasher, derive_job_id
from runner.manifest import matrix
from runner.manifest.read import KNOWN_KEYS, RawRow, check_key, show
from runner.manifest.references import References
from runner.manifest.spool import JobSpool, Packed
from runner.provider import (
    AUTO_SIZE,
    DEFAULT_MODEL,
    MODELS,
    MODELS_WITHOUT_SIZE,
    RESPONSE_FORMATS,
    SIZE_SET,
    SIZES,
)

JOB_RESPONSE_FORMAT: Final = "b64_json"  # the runner's default: no CDN expiry, no second download

# One object per model, size and format: rows then share them, in memory and in the spool.
_CANONICAL: Final = {text: text for text in (*MODELS, *SIZES, AUTO_SIZE, *RESPONSE_FORMATS)}
_ID_RULE: Final = "must be 1-128 of A-Z a-z 0-9 . _ - and not start with a dot"

# A row's model, size and response format as sent, and the content hasher of such jobs without
# references (with references, the hasher also depends on the images' bytes).
Shape = tuple[str, str | None, str, ContentHasher]


class Validator:
    """Validates the rows of one manifest, remembering what rows share (the checked shapes,
    the reference images) and whether the 30 sizes were listed in a message yet."""

    def __init__(self, base: Path) -> None:
        self._references = References(base)
        # (model, size, response format, has references) -> the shape; only valid ones
        self._shapes: dict[tuple[object, object, object, bool], Shape] = {}
        self._sizes_listed = False
        # A wrong size -> its message with the 30 sizes listed, and with "listed above": a typo
        # in the defaults (or a column of one) repeats on every row, and the guess behind the
        # message is an edit distance to each of the 30 sizes, 80 times the cost of the row.
        self._size_messages: dict[str, tuple[str, str]] = {}

    def jobs(self, raw: RawRow, issues: list[ManifestIssue]) -> list[Packed]:
        """The jobs one row stands for (several for a matrix or ``repeat``), or none if any of
        its fields is wrong: then every problem is added to ``issues``."""
        row, fields = raw.row, raw.fields
        before = len(issues)
        if raw.own_keys is not None and not KNOWN_KEYS.issuperset(raw.own_keys):
            for key in fields:
                if key in raw.own_keys:
                    check_key(issues, row, key)

        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt or prompt.isspace():
            issues.append(ManifestIssue(row, "prompt", "is required and must be non-blank text"))

        refs = fields.get("images")
        refs_ok = has_refs = False
        if refs is not None:
            refs_ok = isinstance(refs, list) and all(isinstance(r, str) and r for r in refs)
            has_refs = refs_ok and bool(refs)
        model = fields.get("model", DEFAULT_MODEL)
        size = fields.get("size")
        response_format = fields.get("response_format", JOB_RESPONSE_FORMAT)
        size_problem = None
        try:
            shape: Shape | None = self._shapes[model, size, response_format, has_refs]
        except (KeyError, TypeError):  # TypeError: a list or a mapping, which is no model
            shape, size_problem = self._shape(row, model, size, response_format, has_refs, issues)

        images: tuple[str, ...] = ()
        image_sha256s: tuple[str, ...] = ()
        if refs is not None:
            if not refs_ok:
                issues.append(ManifestIssue(row, "images", "must be a list of file paths"))
            elif refs:
                images, image_sha256s = self._check_references(row, refs, issues)
        if size_problem is not None:
            issues.append(ManifestIssue(row, "size", size_problem))

        job_id = fields.get("id")
        if job_id is not None and (not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id)):
            issues.append(ManifestIssue(row, "id", f"{show(job_id)} {_ID_RULE}"))

        vars_ = repeat = None
        if "vars" in fields or "repeat" in fields:  # most rows have neither
            vars_, repeat = fields.get("vars"), fields.get("repeat")
            if isinstance(prompt, str):
                for name, message in matrix.check(vars_, repeat, prompt):
                    issues.append(ManifestIssue(row, name, message))

        if len(issues) > before:
            return []
        assert shape is not None
        model, size, response_format, hasher = shape
        if image_sha256s:
            hasher = content_hasher(model, size, response_format, image_sha256s)
        if type(prompt) is not str:  # a str subclass (numpy's, from a DataFrame) does not pack
            prompt = str(prompt)
        if job_id is not None and type(job_id) is not str:
            job_id = str(job_id)
        if vars_ is None and repeat is None:  # most rows
            digest = hasher(prompt)
            if job_id is None:
                job_id = derive_job_id(prompt, digest)
            return [
                (
                    job_id,
                    prompt,
                    model,
                    size,
                    response_format,
                    digest,
                    images,
                    row,
                    "",
                    (),
                    None,
                    "",
                )
            ]
        jobs: list[Packed] = []
        for variant in matrix.expand(prompt, vars_, repeat):
            digest = hasher(variant.prompt, variant.repeat_index)
            if job_id is None:
                variant_id = derive_job_id(variant.prompt, digest)
            else:
                variant_id = "-".join(filter(None, [job_id, variant.id_suffix]))
                if not JOB_ID_RE.fullmatch(variant_id):
                    where = f"{row} [{variant.label}]"
                    message = f"{variant_id!r} is over 128 characters"
                    issues.append(ManifestIssue(where, "id", message))
                    continue
            fields_ = (variant_id, variant.prompt, model, size, response_format, digest, images)
            # Not hashed (the prompt and repeat index are): for the dataset's columns.
            template = prompt if vars_ is not None else ""
            jobs.append(
                (*fields_, row, variant.label, variant.values, variant.repeat_index, template)
            )
        return jobs

    def _shape(
        self,
        row: str,
        model: Any,
        size: Any,
        response_format: Any,
        has_refs: bool,
        issues: list[ManifestIssue],
    ) -> tuple[Shape | None, str | None]:
        """The model, size and response format a row's jobs are sent with, remembered; or, if
        any is wrong, None: the model's and the format's problems are added to ``issues``, the
        size's is returned, for the caller to add after the references' (the fields' order)."""
        problem = False
        if not isinstance(model, str) or model not in MODELS:
            message = f"{show(model)} is not a known model ({', '.join(MODELS)})"
            issues.append(ManifestIssue(row, "model", message))
            model = DEFAULT_MODEL  # go on checking the size as if for the default model
            problem = True
        if not isinstance(response_format, str) or response_format not in RESPONSE_FORMATS:
            message = f"{show(response_format)} must be url or b64_json"
            issues.append(ManifestIssue(row, "response_format", message))
            problem = True
        size_problem = self._size_problem(model, size, has_refs)
        if problem or size_problem is not None:
            return None, size_problem
        sent_size = size
        if size is None and has_refs and model not in MODELS_WITHOUT_SIZE:
            sent_size = AUTO_SIZE  # an edit without a size follows its reference
        # The rules above are a Job's, in words for a manifest's author.
        assert (model, sent_size, response_format, has_refs) in VALID_SHAPES
        sent = (
            _CANONICAL[model],
            None if sent_size is None else _CANONICAL[sent_size],
            _CANONICAL[response_format],
        )
        shape = (*sent, content_hasher(*sent, ()))
        self._shapes[model, size, response_format, has_refs] = shape
        return shape, None

    def _size_problem(self, model: str, size: object, has_refs: bool) -> str | None:
        """What is wrong with ``size`` for a job of ``model``, with or without references."""
        if size is not None and not isinstance(size, str):
            return f"{show(size)} must be text like 2048x2048"
        if model in MODELS_WITHOUT_SIZE:
            if size is None:
                return None
            return f"{model} takes no size; remove it or use gpt-image-2-vip"
        if size == AUTO_SIZE and not has_refs:
            return "auto is only for edits (jobs with images); pick one of the 30 sizes"
        if size is None or size == AUTO_SIZE or size in SIZE_SET:
            return None
        return self._not_a_size(size)

    def _check_references(
        self, row: str, refs: list[str], issues: list[ManifestIssue]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The resolved paths, as text, and the sha256s of a row's good reference images."""
        paths: list[str] = []
        sha256s: list[str] = []
        for ref in refs:
            checked = self._references.check(ref)
            if isinstance(checked, str):
                issues.append(ManifestIssue(row, "images", checked))
            else:
                paths.append(str(checked[0]))
                sha256s.append(checked[1])
        return tuple(paths), tuple(sha256s)

    def _not_a_size(self, size: str) -> str:
        """The message for a size that is none of the 30: the 30 sizes, listed in the first
        such message only (a typo in the defaults fails every job), and a guess for a near
        miss. Worked out once per distinct value."""
        messages = self._size_messages.get(size)
        if messages is None:
            messages = self._size_messages[size] = _not_a_size_messages(size)
        if self._sizes_listed:
            return messages[1]
        self._sizes_listed = True
        return messages[0]


def _not_a_size_messages(size: str) -> tuple[str, str]:
    """The message for a wrong ``size`` when the 30 sizes were not listed yet (it lists them),
    and when they were."""
    first: list[str] = []
    if size.lower().replace("\u00d7", "x") in SIZE_SET:
        first.append("use a lowercase ASCII x")
    guess = ""
    near = nearest_sizes(size)
    if near:
        guess = f"; did you mean {' or '.join(near)}?"

    def message(notes: list[str]) -> str:
        text = f"{show(size)} is not one of the 30 sizes"
        return f"{text} ({'; '.join(notes)}){guess}" if notes else text + guess

    return f"{message(first)}\n{SIZES_BY_TIER}", message(["listed above", *first])


# SIZES is 10 ratios at each tier, in order: 1K (fast), 2K (recommended), 4K (detail).
SIZES_BY_TIER: Final = "\n".join(
    f"    {tier}: {' '.join(SIZES[10 * i : 10 * i + 10])}"
    for i, tier in enumerate(("1K", "2K", "4K"))
)


def nearest_sizes(size: str) -> list[str]:
    """The sizes ``size`` was probably meant to be: another separator (``2048X2048``,
    ``2048*2048``, ``2048 x 2048``), width and height swapped, or a slip of one or two
    characters (``2048x2084``); several when they are equally near, none when nothing is."""
    numbers = re.findall(r"\d+", size)
    text = f"{numbers[0]}x{numbers[1]}" if len(numbers) == 2 else size.lower()
    if text in SIZE_SET:
        return [text]
    if len(numbers) == 2 and f"{numbers[1]}x{numbers[0]}" in SIZE_SET:
        return [f"{numbers[1]}x{numbers[0]}"]
    distances = {candidate: _distance(text, candidate) for candidate in SIZES}
    best = min(distances.values())
    return [s for s, d in distances.items() if d == best][:3] if best <= 2 else []


def _distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn ``a`` into ``b``."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            cost = char_a != char_b
            best = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                best = min(best, previous2[j - 2] + 1)
            current.append(best)
        previous2, previous = previous, current
    return previous[-1]


class UniqueIds:
    """Finds every id used twice (case-insensitively: on macOS and Windows "Mug.png" and
    "mug.png" are one file), explicit ones even on rows that failed other checks.

    One entry per id, small: the lowercased id and the job's position in the spool (the first
    user of an id is looked up there only when a second one turns up)."""

    def __init__(self, spooled: JobSpool) -> None:
        self.issues: list[ManifestIssue] = []
        self._spooled = spooled
        self._first: dict[str, int] = {}  # lowercased id -> position, or ~index in _unspooled
        self._unspooled: list[tuple[str, str]] = []  # (where, id) of rows without jobs

    def add(self, raw: RawRow, jobs: list[Packed], position: int) -> None:
        """The jobs of one row, spooled from ``position`` on; or, for a row that failed, the
        id it names."""
        first = self._first
        for job in jobs:
            if first.setdefault(job[0].lower(), position) != position:
                where = f"{job[7]} [{job[8]}]" if job[8] else job[7]
                self._collision(job[0], where, raw.sets("id"))
            position += 1
        if not jobs:
            row_id = raw.fields.get("id")
            if isinstance(row_id, str) and raw.sets("id"):
                self._unspooled.append((raw.row, row_id))
                ref = ~(len(self._unspooled) - 1)
                if first.setdefault(row_id.lower(), ref) != ref:
                    self._collision(row_id, raw.row, True)

    def _collision(self, job_id: str, where: str, explicit: bool) -> None:
        first = self._first[job_id.lower()]
        if first >= 0:
            job = self._spooled[first]
            first_where, first_id = job.where, job.id
        else:
            first_where, first_id = self._unspooled[~first]
        message = f"{job_id!r} is already used by {first_where}"
        if job_id != first_id:
            message += " (ids differ only in case)"
        elif not explicit:
            message += "; the two jobs are identical, give one an explicit id"
        self.issues.append(ManifestIssue(where, "id", message))
