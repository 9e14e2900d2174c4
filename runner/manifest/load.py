"""Manifests, YAML or CSV, turned into validated :class:`~runner.jobs.Job` specs.

Validation happens before any request and reports every problem of every row together, each
with its row and field, so one round of fixes is enough. Nothing here touches the network.

YAML: a mapping with ``jobs`` (a list of mappings) and optional ``defaults`` (any job field but
``id``). CSV: a header row naming some of ``id,prompt,size,model,response_format,images``
(``prompt`` required), reference images separated by ``|``. Reference image paths are relative to
the manifest's folder.

Scale: a CSV manifest is read row by row, with no size limit; what it keeps in memory besides
the current row is one small entry per id, to find duplicates. A YAML manifest is parsed whole
(by libyaml), so it is limited to :data:`YAML_MAX_BYTES`. The validated jobs are packed into a
:class:`~runner.manifest.spool.JobSpool`: :func:`load_manifest` returns a
:class:`Manifest`, a read-only sequence of jobs that a run walks again (to plan, to send, to
write the results) without a million objects in memory and without reading the file again.
"""

from __future__ import annotations

import csv
import hashlib
import numbers
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import yaml

from runner.errors import ManifestError, ManifestIssue
from runner.images.files import ImageInvalid, inspect_image
from runner.jobs import JOB_ID_RE, Job, content_hash, derive_job_id
from runner.manifest import matrix
from runner.manifest.spool import JobSpool, Packed
from runner.provider import (
    AUTO_SIZE,
    DEFAULT_MODEL,
    MODELS,
    MODELS_WITHOUT_SIZE,
    REFERENCE_MAX_BYTES,
    REJECTED_FIELDS,
    RESPONSE_FORMATS,
    SIZE_SET,
    SIZES,
)

if TYPE_CHECKING:
    import pandas as pd

JOB_FIELDS = ("id", "prompt", "size", "model", "response_format", "images", "vars", "repeat")
CSV_COLUMNS = ("id", "prompt", "size", "model", "response_format", "images", "repeat")
JOB_RESPONSE_FORMAT = "b64_json"  # the runner's default: no CDN expiry, no second download
YAML_MAX_BYTES: Final = 64 * 1024 * 1024  # parsed whole; a larger manifest can be a CSV

_KNOWN_KEYS: Final = frozenset(JOB_FIELDS)
# One object per model, size and format: rows then share them, in memory and in the spool.
_CANONICAL: Final = {text: text for text in (*MODELS, *SIZES, AUTO_SIZE, *RESPONSE_FORMATS)}


class Manifest(JobSpool):
    """The validated jobs of a manifest, in manifest order: a read-only sequence of jobs."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source  # the manifest's path, or what load_jobs was told to call the jobs
        self.rows = 0  # manifest rows with jobs (a matrix row or a ``repeat`` stands for many)
        self.edits = 0  # jobs with reference images


class _RawJob(NamedTuple):
    row: str
    fields: dict[Any, Any]
    # The keys the row set itself (YAML: not those from the defaults), still to be checked;
    # None for a CSV row, whose every key is a column the header check already accepted.
    own_keys: Collection[object] | None

    def sets(self, key: str) -> bool:
        """Whether the row itself gives ``key``, rather than the defaults."""
        return key in (self.fields if self.own_keys is None else self.own_keys)


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


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; raise :class:`ManifestError` listing every problem."""
    return _load(str(path), path.parent, lambda issues: _read(path, issues))


def load_jobs(
    records: Iterable[Mapping[str, object]] | pd.DataFrame,
    *,
    base: Path | None = None,
    defaults: Mapping[str, object] | None = None,
    source: str = "jobs",
) -> Manifest:
    """Validate jobs given as Python records, exactly as the rows of a manifest are.

    ``records`` are mappings of job fields (a list of dicts, ``DataFrame.to_dict("records")``)
    or a pandas DataFrame, one job (or one matrix row) each. A cell that is None or NaN means
    "not set", as an empty CSV cell does, so ``defaults`` (any job field but ``id``, as in a
    YAML manifest) fill it. ``images`` may be a list of paths or one ``|``-separated string,
    relative to ``base`` (default: the current directory). The jobs get the same ids and content
    hashes as in the equivalent manifest; problems raise one :class:`ManifestError`, named
    ``source``, whose rows are ``row N``, counted from 1 in the order given.
    """
    folder = Path.cwd() if base is None else base
    return _load(source, folder, lambda issues: _read_records(records, defaults, issues))


def _load(
    source: str, base: Path, read: Callable[[list[ManifestIssue]], Iterator[_RawJob]]
) -> Manifest:
    issues: list[ManifestIssue] = []
    manifest = Manifest(source)
    checker = _ReferenceChecker(base)
    ids = _UniqueIds(manifest)
    try:
        for raw in read(issues):
            position = len(manifest)
            plain = _plain_job(raw)
            if plain is not None:  # most rows of a large manifest
                manifest.append_packed(plain)
                manifest.rows += 1
                ids.add_one(raw, plain[0], position)
                continue
            jobs = _validate(raw, checker, issues)
            for job in jobs:
                manifest.append(job)
                manifest.edits += bool(job.images)
            manifest.rows += bool(jobs)
            ids.add(raw, jobs, position)
    except OSError as exc:  # from the spool: its temporary file
        issues.append(ManifestIssue("file", "", f"cannot hold its jobs in a temporary file: {exc}"))
    issues += ids.issues  # after the rows' own problems, as a second round
    if issues:
        manifest.close()
        raise ManifestError(source, issues)
    return manifest


def _read_records(
    records: Iterable[Mapping[str, object]] | pd.DataFrame,
    defaults: Mapping[str, object] | None,
    issues: list[ManifestIssue],
) -> Iterator[_RawJob]:
    import pandas as pd  # here: the CLI never needs it

    inherited = _read_defaults(defaults or {}, issues)
    rows: Iterable[Mapping[Any, object]]
    rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else records
    for index, record in enumerate(rows, start=1):
        row = f"row {index}"
        if not isinstance(record, Mapping):
            issues.append(ManifestIssue(row, "", "must be a mapping with at least a prompt"))
            continue
        own = {
            key: _record_cell(key, value)
            for key, value in record.items()
            if not _is_unset(value, pd.NA, pd.NaT)
        }
        merged = dict(inherited)
        merged.update(own)
        yield _RawJob(row, merged, own.keys())


def _is_unset(value: object, na: object, nat: object) -> bool:
    """Whether a cell means "not set", as an empty CSV cell does: None, NaN, ``pd.NA`` or
    ``pd.NaT``. By identity: ``pd.NA`` has no truth value, and NaN is not equal to itself."""
    return (
        value is None
        or value is na
        or value is nat
        or (isinstance(value, float) and value != value)
    )


def _record_cell(key: object, value: object) -> object:
    """A record's cell as the validator takes it: pandas gives numpy numbers, and a whole
    column of ``repeat`` with a gap in it as floats; a CSV-like cell of images is split."""
    if key == "images":
        if isinstance(value, str):
            return [part.strip() for part in value.split("|")]
        if isinstance(value, tuple):
            return list(value)
    elif key == "repeat" and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def _read(path: Path, issues: list[ManifestIssue]) -> Iterator[_RawJob]:
    try:
        size_bytes = path.stat().st_size
    except OSError as exc:
        issues.append(ManifestIssue("file", "", f"cannot read: {exc.strerror}"))
        return
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            if size_bytes > YAML_MAX_BYTES:
                limit = f"{YAML_MAX_BYTES / 2**20:g} MiB"
                message = f"is {size_bytes} bytes, over the {limit} limit for YAML (use a CSV)"
                issues.append(ManifestIssue("file", "", message))
                return
            yield from _read_yaml(path, issues)
            return
        if suffix == ".csv":
            yield from _read_csv(path, issues)
            return
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(ManifestIssue("file", "", f"cannot read: {exc}"))
        return
    issues.append(ManifestIssue("file", "", "must end in .yaml, .yml or .csv"))


def _read_yaml(path: Path, issues: list[ManifestIssue]) -> Iterator[_RawJob]:
    with open(path, encoding="utf-8") as f:
        loader = _Loader(f)  # a (C) SafeLoader subclass: no tags
        loader.duplicate_keys = []
        try:
            doc = loader.get_single_data()
        except yaml.YAMLError as exc:
            issues.append(ManifestIssue("file", "", f"is not valid YAML: {exc}"))
            return
        finally:
            loader.dispose()
    for line, key in loader.duplicate_keys:
        issues.append(ManifestIssue(f"line {line}", key, "is given twice in one mapping"))
    if not isinstance(doc, Mapping):
        issues.append(ManifestIssue("file", "", "must be a mapping with a 'jobs' list"))
        return
    for key in doc:
        if key not in ("jobs", "defaults"):
            issues.append(ManifestIssue("top level", str(key), "unknown key"))
    inherited = _read_defaults(doc.get("defaults") or {}, issues)
    jobs = doc.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        issues.append(ManifestIssue("top level", "jobs", "must be a non-empty list of jobs"))
        return
    for index, entry in enumerate(jobs, start=1):
        line = getattr(entry, "line", 0)
        row = f"job {index} (line {line})" if line else f"job {index}"
        if not isinstance(entry, Mapping):
            issues.append(ManifestIssue(row, "", "must be a mapping with at least a prompt"))
            continue
        merged = dict(inherited)
        merged.update(entry)
        yield _RawJob(row, merged, entry.keys())


def _read_defaults(defaults: object, issues: list[ManifestIssue]) -> dict[Any, Any]:
    """The fields every job inherits, its keys checked once, against ``defaults``."""
    if not isinstance(defaults, Mapping):
        issues.append(ManifestIssue("defaults", "", "must be a mapping of job fields"))
        return {}
    for key in defaults:
        if key == "id":
            issues.append(ManifestIssue("defaults", "id", "ids are per job, not a default"))
        else:
            _check_key(issues, "defaults", key)
    return {k: v for k, v in defaults.items() if k != "id"}


def _read_csv(path: Path, issues: list[ManifestIssue]) -> Iterator[_RawJob]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        try:
            header = next(reader)
        except StopIteration:
            issues.append(ManifestIssue("header", "", "the file is empty"))
            return
        except csv.Error as exc:
            issues.append(ManifestIssue("header", "", f"is not valid CSV: {exc}"))
            return
        columns = [name.strip() for name in header]
        for name in columns:
            if name not in CSV_COLUMNS:
                _check_key(issues, "header", name)
        if "prompt" not in columns:
            issues.append(ManifestIssue("header", "prompt", "the prompt column is required"))
        if len(set(columns)) != len(columns):
            issues.append(ManifestIssue("header", "", "a column is named twice"))
        if any(i.row == "header" for i in issues):
            return
        # The loop below runs once a row, up to millions of times: kept lean.
        width = len(columns)
        text_only = _CSV_LISTS.isdisjoint(columns)
        number = 0  # rows that are not blank
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                issues.append(ManifestIssue("file", "", f"is not valid CSV: {exc}"))
                break
            fields: dict[str, Any] = {
                name: value if text_only else _csv_cell(name, value)
                for name, value in zip(columns, values, strict=False)
                if value and not value.isspace()  # an empty cell means "not set"
            }
            if len(values) > width:
                if fields or any(v and not v.isspace() for v in values[width:]):
                    number += 1
                    row = f"row {number} (line {reader.line_num})"
                    message = "has more cells than the header has columns"
                    issues.append(ManifestIssue(row, "", message))
                continue
            if fields:
                number += 1
                yield _RawJob(f"row {number} (line {reader.line_num})", fields, None)
    if not number and not issues:
        issues.append(ManifestIssue("file", "", "has a header but no jobs"))


_CSV_LISTS: Final = frozenset({"images", "repeat"})  # the cells that are not plain text


def _csv_cell(column: str, value: str) -> object:
    if column == "images":
        return [part.strip() for part in value.split("|")]
    if column == "repeat":
        return int(value) if value.strip().isdigit() else value
    return value


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
    """Resolves each distinct reference path and checks each distinct image once, remembering
    its sha256 or its problem: a catalog of a million rows may name the same few images."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._resolved: dict[str, Path | str] = {}  # as written -> resolved path, or a problem
        self._seen: dict[Path, tuple[str | None, str | None]] = {}

    def resolve(self, ref: str) -> Path | str:
        """The absolute path of ``ref`` (relative to the manifest), or why it is unusable."""
        resolved = self._resolved.get(ref)
        if resolved is None:
            try:
                resolved = (self._base / ref).resolve()
            except (OSError, ValueError, RuntimeError) as exc:  # NUL, symlink loop
                resolved = f"{_show(ref)} is not a usable path: {exc}"
            self._resolved[ref] = resolved
        return resolved

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


def _validate(raw: _RawJob, checker: _ReferenceChecker, issues: list[ManifestIssue]) -> list[Job]:
    """The jobs one row stands for (several for a matrix or ``repeat``), or none if invalid."""
    row, fields = raw.row, raw.fields
    before = len(issues)

    def problem(name: str, message: str) -> None:
        issues.append(ManifestIssue(row, name, message))

    if raw.own_keys is not None:
        for key in fields:
            if key in raw.own_keys:
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
        path = checker.resolve(ref)
        if isinstance(path, str):
            problem("images", path)
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
    assert isinstance(prompt, str) and isinstance(response_format, str)
    model, response_format = _CANONICAL[model], _CANONICAL[response_format]
    size = _CANONICAL.get(size, size) if isinstance(size, str) else None
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


def _plain_job(raw: _RawJob) -> Packed | None:
    """The job of a row that is certainly valid and stands for one job without references
    (most rows of a large manifest), made without the checks' bookkeeping, and packed for the
    spool; None for any other row, which :func:`_validate` then checks field by field. Must
    agree with it."""
    fields = raw.fields
    if raw.own_keys is None:  # CSV: every cell is text, but for these two
        if "images" in fields or "repeat" in fields:
            return None
    elif (
        "images" in fields
        or "vars" in fields
        or "repeat" in fields
        or not _KNOWN_KEYS.issuperset(raw.own_keys)
        or not all(type(value) is str for value in fields.values())
    ):
        return None
    prompt = fields.get("prompt")
    model = _PLAIN_MODELS.get(fields.get("model", DEFAULT_MODEL))
    response_format = _PLAIN_FORMATS.get(fields.get("response_format", JOB_RESPONSE_FORMAT))
    size = fields.get("size")
    job_id = fields.get("id")
    if not prompt or prompt.isspace() or model is None or response_format is None:
        return None
    if size is not None:
        size = _PLAIN_SIZES.get(size)  # not "auto": a job without references has no use for it
        if size is None or model in MODELS_WITHOUT_SIZE:
            return None
    if job_id is None:
        digest = _plain_content_hash(model, prompt, size, response_format)
        job_id = derive_job_id(prompt, digest)
    elif JOB_ID_RE.fullmatch(job_id):
        digest = _plain_content_hash(model, prompt, size, response_format)
    else:
        return None
    return (job_id, prompt, model, size, response_format, (), raw.row, digest, "")


def _plain_content_hash(model: str, prompt: str, size: str | None, response_format: str) -> str:
    return content_hash(
        model=model, prompt=prompt, size=size, response_format=response_format, image_sha256s=[]
    )


_PLAIN_MODELS: Final = {model: model for model in MODELS}
_PLAIN_FORMATS: Final = {response_format: response_format for response_format in RESPONSE_FORMATS}
_PLAIN_SIZES: Final = {size: size for size in SIZES}


class _UniqueIds:
    """Finds every id used twice (case-insensitively: on macOS and Windows "Mug.png" and
    "mug.png" are one file), explicit ones even on rows that failed other checks.

    One entry per id, small: the lowercased id and the job's position in the spool (the first
    user of an id is looked up there only when a second one turns up)."""

    def __init__(self, spooled: JobSpool) -> None:
        self.issues: list[ManifestIssue] = []
        self._spooled = spooled
        self._first: dict[str, int] = {}  # lowercased id -> position, or ~index in _unspooled
        self._unspooled: list[tuple[str, str]] = []  # (where, id) of rows without jobs

    def add_one(self, raw: _RawJob, job_id: str, position: int) -> None:
        """The one job of a row, spooled at ``position``."""
        if self._first.setdefault(job_id.lower(), position) != position:
            self.add(raw, [self._spooled[position]], position)

    def add(self, raw: _RawJob, jobs: list[Job], position: int) -> None:
        """The jobs of one row, spooled from ``position`` on; or, for a row that failed, the
        id it names."""
        explicit = raw.sets("id")
        for offset, job in enumerate(jobs):
            self._check(job.id, position + offset, job.where, explicit)
        row_id = raw.fields.get("id")
        if not jobs and explicit and isinstance(row_id, str):
            self._unspooled.append((raw.row, row_id))
            self._check(row_id, ~(len(self._unspooled) - 1), raw.row, True)

    def _check(self, job_id: str, ref: int, where: str, explicit: bool) -> None:
        first = self._first.setdefault(job_id.lower(), ref)
        if first == ref:
            return
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


def _show(value: object) -> str:
    """A short rendering of a manifest value for a message: never the whole of a nested value,
    which a YAML alias bomb makes enormous."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 80 else f"{text[:77]}..."
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
