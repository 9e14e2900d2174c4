"""Manifests, YAML or CSV, turned into validated :class:`~runner.jobs.Job` specs.

Validation happens before any request and reports every problem of every row together, each
with its row and field, so one round of fixes is enough. Nothing here touches the network.

YAML: a mapping with ``jobs`` (a list of mappings) and optional ``defaults`` (any job field but
``id``). CSV: a header row naming some of ``id,prompt,size,model,response_format,images``
(``prompt`` required), reference images separated by ``|``. Reference image paths are relative to
the manifest's folder.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner import matrix
from runner.api import (
    AUTO_SIZE,
    DEFAULT_MODEL,
    MODELS,
    MODELS_WITHOUT_SIZE,
    REFERENCE_MAX_BYTES,
    REJECTED_FIELDS,
    RESPONSE_FORMATS,
    SIZE_SET,
)
from runner.errors import ManifestError, ManifestIssue
from runner.images import ImageInvalid, inspect_image
from runner.jobs import JOB_ID_RE, Job, content_hash, derive_job_id

JOB_FIELDS = ("id", "prompt", "size", "model", "response_format", "images", "vars", "repeat")
CSV_COLUMNS = ("id", "prompt", "size", "model", "response_format", "images", "repeat")
JOB_RESPONSE_FORMAT = "b64_json"  # the runner's default: no CDN expiry, no second download
MANIFEST_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class _RawJob:
    row: str
    fields: dict[str, Any]
    explicit: set[object] = field(default_factory=set)  # keys the row set, not the defaults


class _LineMap(dict[Any, Any]):
    line = 0


class _Loader(yaml.CSafeLoader):
    """``yaml.SafeLoader`` that remembers the line of every mapping, for error messages, and
    notes keys given twice in one mapping (plain PyYAML silently keeps the last)."""

    duplicate_keys: list[tuple[int, str]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                if key in seen:
                    self.duplicate_keys.append((key_node.start_mark.line + 1, str(key)))
                seen.add(key)
        mapping = _LineMap(super().construct_mapping(node, deep=deep))
        mapping.line = node.start_mark.line + 1
        return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def load_manifest(path: Path) -> list[Job]:
    """Read and validate a manifest; raise :class:`ManifestError` listing every problem."""
    source = str(path)
    issues: list[ManifestIssue] = []
    raw_jobs = _read(path, issues)
    checker = _ReferenceChecker()
    jobs: list[Job] = []
    for raw in raw_jobs:
        jobs += _validate(raw, path.parent, checker, issues)
    _check_unique_ids(raw_jobs, jobs, issues)
    if issues:
        raise ManifestError(source, issues)
    return jobs


def _read(path: Path, issues: list[ManifestIssue]) -> list[_RawJob]:
    try:
        size_bytes = path.stat().st_size
    except OSError as exc:
        issues.append(ManifestIssue("file", "", f"cannot read: {exc.strerror}"))
        return []
    if size_bytes > MANIFEST_MAX_BYTES:
        issues.append(ManifestIssue("file", "", f"is {size_bytes} bytes, over the 64 MiB limit"))
        return []
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return _read_yaml(path, issues)
        if suffix == ".csv":
            return _read_csv(path, issues)
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(ManifestIssue("file", "", f"cannot read: {exc}"))
        return []
    issues.append(ManifestIssue("file", "", "must end in .yaml, .yml or .csv"))
    return []


def _read_yaml(path: Path, issues: list[ManifestIssue]) -> list[_RawJob]:
    with open(path, encoding="utf-8") as f:
        loader = _Loader(f)  # a (C) SafeLoader subclass: no tags
        loader.duplicate_keys = []
        try:
            doc = loader.get_single_data()
        except yaml.YAMLError as exc:
            issues.append(ManifestIssue("file", "", f"is not valid YAML: {exc}"))
            return []
        finally:
            loader.dispose()
    for line, key in loader.duplicate_keys:
        issues.append(ManifestIssue(f"line {line}", key, "is given twice in one mapping"))
    if not isinstance(doc, Mapping):
        issues.append(ManifestIssue("file", "", "must be a mapping with a 'jobs' list"))
        return []
    for key in doc:
        if key not in ("jobs", "defaults"):
            issues.append(ManifestIssue("top level", str(key), "unknown key"))
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        issues.append(ManifestIssue("defaults", "", "must be a mapping of job fields"))
        defaults = {}
    for key in defaults:
        if key == "id":
            issues.append(ManifestIssue("defaults", "id", "ids are per job, not a default"))
        else:
            _check_key(issues, "defaults", key)
    jobs = doc.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        issues.append(ManifestIssue("top level", "jobs", "must be a non-empty list of jobs"))
        return []
    raw_jobs = []
    for index, entry in enumerate(jobs, start=1):
        line = getattr(entry, "line", 0)
        row = f"job {index} (line {line})" if line else f"job {index}"
        if not isinstance(entry, Mapping):
            issues.append(ManifestIssue(row, "", "must be a mapping with at least a prompt"))
            continue
        merged = {k: v for k, v in defaults.items() if k != "id"}
        merged.update(entry)
        raw_jobs.append(_RawJob(row, merged, set(entry)))
    return raw_jobs


def _read_csv(path: Path, issues: list[ManifestIssue]) -> list[_RawJob]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        try:
            header = next(reader)
        except StopIteration:
            issues.append(ManifestIssue("header", "", "the file is empty"))
            return []
        except csv.Error as exc:
            issues.append(ManifestIssue("header", "", f"is not valid CSV: {exc}"))
            return []
        columns = [name.strip() for name in header]
        for name in columns:
            if name not in CSV_COLUMNS:
                _check_key(issues, "header", name)
        if "prompt" not in columns:
            issues.append(ManifestIssue("header", "prompt", "the prompt column is required"))
        if len(set(columns)) != len(columns):
            issues.append(ManifestIssue("header", "", "a column is named twice"))
        if any(i.row == "header" for i in issues):
            return []
        raw_jobs = []
        for number, cells in enumerate(_csv_rows(reader, issues), start=1):
            line, values = cells
            row = f"row {number} (line {line})"
            if len(values) > len(columns):
                issues.append(ManifestIssue(row, "", "has more cells than the header has columns"))
                continue
            fields: dict[str, Any] = {}
            for name, value in zip(columns, values, strict=False):
                if value.strip() == "":
                    continue
                fields[name] = _csv_cell(name, value)
            raw_jobs.append(_RawJob(row, fields, set(fields)))
    if not raw_jobs and not issues:
        issues.append(ManifestIssue("file", "", "has a header but no jobs"))
    return raw_jobs


def _csv_cell(column: str, value: str) -> object:
    if column == "images":
        return [part.strip() for part in value.split("|")]
    if column == "repeat":
        return int(value) if value.strip().isdigit() else value
    return value


def _csv_rows(
    reader: Iterator[list[str]], issues: list[ManifestIssue]
) -> Iterator[tuple[int, list[str]]]:
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            issues.append(ManifestIssue("file", "", f"is not valid CSV: {exc}"))
            return
        if any(v.strip() for v in values):
            yield reader.line_num, values  # type: ignore[attr-defined]


def _check_key(issues: list[ManifestIssue], row: str, key: object) -> None:
    if not isinstance(key, str):
        issues.append(ManifestIssue(row, _show(key), "unknown key (keys are text)"))
    elif key in REJECTED_FIELDS:
        issues.append(
            ManifestIssue(row, str(key), "is rejected by the API (one image per call; no quality)")
        )
    elif key not in JOB_FIELDS or (row == "header" and key not in CSV_COLUMNS):
        issues.append(ManifestIssue(row, str(key), f"unknown key (known: {', '.join(JOB_FIELDS)})"))


class _ReferenceChecker:
    """Checks each distinct reference image once and remembers its sha256 or its problem."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[str | None, str | None]] = {}

    def check(self, path: Path) -> tuple[str | None, str | None]:
        """Return ``(sha256, None)`` for a good image, ``(None, problem)`` otherwise."""
        if path not in self._seen:
            self._seen[path] = self._check(path)
        return self._seen[path]

    @staticmethod
    def _check(path: Path) -> tuple[str | None, str | None]:
        try:
            if not path.exists():
                return None, f"does not exist ({path})"
            if not path.is_file():
                return None, f"is not a file ({path})"
            size_bytes = path.stat().st_size
            if size_bytes > REFERENCE_MAX_BYTES:
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


def _validate(
    raw: _RawJob, base: Path, checker: _ReferenceChecker, issues: list[ManifestIssue]
) -> list[Job]:
    """The jobs one row stands for (several for a matrix or ``repeat``), or none if invalid."""
    row, fields = raw.row, raw.fields
    before = len(issues)

    def problem(name: str, message: str) -> None:
        issues.append(ManifestIssue(row, name, message))

    for key in fields:
        if key in raw.explicit:
            _check_key(issues, row, key)

    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problem("prompt", "is required and must be non-blank text")

    model = fields.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or model not in MODELS:
        problem("model", f"{_show(model)} is not a known model ({', '.join(MODELS)})")
        model = DEFAULT_MODEL  # go on checking the other fields

    response_format = fields.get("response_format", JOB_RESPONSE_FORMAT)
    if not isinstance(response_format, str) or response_format not in RESPONSE_FORMATS:
        problem("response_format", f"{_show(response_format)} must be url or b64_json")

    images: list[Path] = []
    image_sha256s: list[str] = []
    refs = fields.get("images", [])
    if refs is None:
        refs = []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        problem("images", "must be a list of file paths")
        refs = []
    for ref in refs:
        try:
            path = (base / ref).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL, symlink loop
            problem("images", f"{_show(ref)} is not a usable path: {exc}")
            continue
        digest, error = checker.check(path)
        if error is not None:
            problem("images", f"{ref} {error}")
        elif digest is not None:
            images.append(path)
            image_sha256s.append(digest)

    size = fields.get("size")
    if size is not None and not isinstance(size, str):
        problem("size", f"{_show(size)} must be text like 2048x2048")
    elif model in MODELS_WITHOUT_SIZE:
        if size is not None:
            problem("size", f"{model} takes no size; remove it or use gpt-image-2-vip")
    elif size == AUTO_SIZE:
        if not refs:
            problem("size", "auto is only for edits (jobs with images); pick one of the 30 sizes")
    elif size is not None and size not in SIZE_SET:
        near = size.lower().replace("\u00d7", "x")
        hint = " (use a lowercase ASCII x)" if near in SIZE_SET else ""
        problem("size", f"{_show(size)} is not one of the 30 sizes{hint}")
    if size is None and refs and model not in MODELS_WITHOUT_SIZE:
        size = AUTO_SIZE

    job_id = fields.get("id")
    if job_id is not None and (not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id)):
        problem(
            "id",
            f"{_show(job_id)} must be 1-128 of A-Z a-z 0-9 . _ - and not start with a dot",
        )

    vars_, repeat = fields.get("vars"), fields.get("repeat")
    if isinstance(prompt, str):
        for name, message in matrix.check(vars_, repeat, prompt):
            problem(name, message)

    if len(issues) > before:
        return []
    assert isinstance(prompt, str)
    jobs = []
    for variant in matrix.expand(prompt, vars_, repeat):
        digest = content_hash(
            model=model,
            prompt=variant.prompt,
            size=size,
            response_format=response_format,
            image_sha256s=image_sha256s,
            repeat_index=variant.repeat_index,
        )
        if job_id is None:
            variant_id = derive_job_id(variant.prompt, digest)
        else:
            variant_id = "-".join(filter(None, [job_id, variant.id_suffix]))
            if not JOB_ID_RE.fullmatch(variant_id):
                where = f"{row} [{variant.label}]"
                issues.append(ManifestIssue(where, "id", f"{variant_id!r} is over 128 characters"))
                continue
        jobs.append(
            Job(
                id=variant_id,
                prompt=variant.prompt,
                model=model,
                size=size,
                response_format=response_format,
                images=tuple(images),
                row=row,
                content_hash=digest,
                variant=variant.label,
            )
        )
    return jobs


def _show(value: object) -> str:
    """A short rendering of a manifest value for a message: never the whole of a nested value,
    which a YAML alias bomb makes enormous."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 80 else f"{text[:77]}..."
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_unique_ids(
    raw_jobs: list[_RawJob], jobs: list[Job], issues: list[ManifestIssue]
) -> None:
    """Every id used twice, explicit ones even on rows that failed other checks."""
    explicit = {raw.row: "id" in raw.explicit for raw in raw_jobs}
    valid_rows = {job.row for job in jobs}
    ids: list[tuple[str, str, str, bool]] = [  # (row, where, id, explicit)
        (job.row, job.where, job.id, explicit[job.row]) for job in jobs
    ]
    ids += [
        (raw.row, raw.row, raw.fields["id"], True)
        for raw in raw_jobs
        if raw.row not in valid_rows and explicit[raw.row] and isinstance(raw.fields["id"], str)
    ]
    order = {raw.row: index for index, raw in enumerate(raw_jobs)}
    ids.sort(key=lambda entry: order[entry[0]])  # stable: expansions keep their order
    # Case-insensitive: on macOS and Windows "Mug.png" and "mug.png" are one file.
    first: dict[str, tuple[str, str]] = {}
    for _, where, job_id, is_explicit in ids:
        key = job_id.lower()
        if key not in first:
            first[key] = (where, job_id)
            continue
        first_where, first_id = first[key]
        message = f"{job_id!r} is already used by {first_where}"
        if job_id != first_id:
            message += " (ids differ only in case)"
        elif not is_explicit:
            message += "; the two jobs are identical, give one an explicit id"
        issues.append(ManifestIssue(where, "id", message))
