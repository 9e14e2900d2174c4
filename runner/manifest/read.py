"""Manifest files and Python records read into raw rows: the fields of each job as given, with
where it came from. No field's value is checked here (that is :mod:`runner.manifest.validate`);
what is checked is the shape around them, once: the file, the YAML document, the CSV header,
the defaults, a DataFrame's columns, and the keys a job may have.

YAML: a mapping with ``jobs`` (a list of mappings) and optional ``defaults`` (any job field but
``id``), parsed whole by libyaml, so limited to :data:`YAML_MAX_BYTES`. CSV: a header row naming
some of :data:`CSV_COLUMNS` (``prompt`` required), reference images separated by ``|``, an empty
cell meaning "not set"; read row by row, with no size limit. Records: mappings (or a pandas
DataFrame), a None, NaN or blank text cell meaning "not set", as an empty CSV cell does.

Rows are named for messages as a user finds them: ``job 3 (line 12)`` in YAML, ``row 3 (line
4)`` in a CSV (blank lines are not rows), ``row 3`` for the third record.
"""

from __future__ import annotations

import csv
import numbers
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import yaml

from runner.errors import ManifestIssue
from runner.provider import REJECTED_FIELDS

if TYPE_CHECKING:
    import pandas as pd

JOB_FIELDS: Final = ("id", "prompt", "size", "model", "response_format", "images", "vars", "repeat")
CSV_COLUMNS: Final = ("id", "prompt", "size", "model", "response_format", "images", "repeat")
YAML_MAX_BYTES: Final = 64 * 1024 * 1024  # parsed whole; a larger manifest can be a CSV

KNOWN_KEYS: Final = frozenset(JOB_FIELDS)
_CSV_LISTS: Final = frozenset({"images", "repeat"})  # the cells that are not plain text


class RawRow(NamedTuple):
    """One manifest row (or record) as given: its fields merged over the defaults."""

    row: str
    fields: dict[Any, Any]
    # The keys the row set itself (not those from the defaults), still to be checked; None
    # when every key was checked already (a CSV header, a DataFrame's columns).
    own_keys: Collection[object] | None

    def sets(self, key: str) -> bool:
        """Whether the row itself gives ``key``, rather than the defaults."""
        return key in (self.fields if self.own_keys is None else self.own_keys)


def read_file(path: Path, issues: list[ManifestIssue]) -> Iterator[RawRow]:
    """The rows of a YAML or CSV manifest; the problems of the file itself go to ``issues``."""
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


def _read_yaml(path: Path, issues: list[ManifestIssue]) -> Iterator[RawRow]:
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
        yield RawRow(row, merged, entry.keys())


def _read_csv(path: Path, issues: list[ManifestIssue]) -> Iterator[RawRow]:
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
                check_key(issues, "header", name)
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
            full = text_only  # every cell is text and set: most rows, taken whole
            for value in values:
                if not value or value.isspace():
                    full = False
                    break
            fields: dict[str, Any] = (
                dict(zip(columns, values, strict=False))
                if full
                else {
                    name: value if text_only else _csv_cell(name, value)
                    for name, value in zip(columns, values, strict=False)
                    if value and not value.isspace()  # an empty cell means "not set"
                }
            )
            if len(values) > width:
                if fields or any(v and not v.isspace() for v in values[width:]):
                    number += 1
                    row = f"row {number} (line {reader.line_num})"
                    message = "has more cells than the header has columns"
                    issues.append(ManifestIssue(row, "", message))
                continue
            if fields:
                number += 1
                yield RawRow(f"row {number} (line {reader.line_num})", fields, None)
    if not number and not issues:
        issues.append(ManifestIssue("file", "", "has a header but no jobs"))


def _csv_cell(column: str, value: str) -> object:
    if column == "images":
        return _split_images(value)
    if column == "repeat":
        return int(value) if value.strip().isdigit() else value
    return value


def _split_images(value: str) -> list[str]:
    return [part.strip() for part in value.split("|")]


def read_records(
    records: Iterable[Mapping[str, object]] | pd.DataFrame,
    defaults: Mapping[str, object] | None,
    issues: list[ManifestIssue],
) -> Iterator[RawRow]:
    """The rows of Python records: mappings, or a DataFrame, whose columns are checked once
    (as a CSV header is) rather than once a row."""
    import pandas as pd  # here: the CLI never needs it

    inherited = _read_defaults(defaults or {}, issues)
    rows: Iterable[Mapping[Any, object]]
    checked = isinstance(records, pd.DataFrame)  # then the keys are checked once, as columns
    if isinstance(records, pd.DataFrame):
        for key in records.columns:
            check_key(issues, "columns", key)
        rows = records.to_dict("records")
    else:
        rows = records
    index = 0
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
        yield RawRow(row, merged, None if checked else own.keys())
    if not index:  # as a manifest's: an empty list of jobs is a mistake, not a run of none
        issues.append(ManifestIssue("records", "", "has no jobs"))


def _is_unset(value: object, na: object, nat: object) -> bool:
    """Whether a cell means "not set", as an empty CSV cell does: None, NaN, ``pd.NA``,
    ``pd.NaT``, or text that is empty or only spaces (a spreadsheet's empty cell). By identity:
    ``pd.NA`` has no truth value, and NaN is not equal to itself."""
    return (
        value is None
        or value is na
        or value is nat
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and (not value or value.isspace()))
    )


def _record_cell(key: object, value: object) -> object:
    """A record's cell as the validator takes it: pandas gives numpy numbers, and a whole
    column of ``repeat`` with a gap in it as floats; a CSV-like cell of images is split, and
    a tuple or a numpy array of them (a parquet round trip gives arrays) is a list."""
    if key == "images":
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return _split_images(value)
        if isinstance(value, tuple):
            return list(value)
        import numpy as np  # loaded with pandas already; only for the rare cell

        if isinstance(value, np.ndarray):
            return value.tolist()
    elif key == "repeat" and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def _read_defaults(defaults: object, issues: list[ManifestIssue]) -> dict[Any, Any]:
    """The fields every job inherits, their keys checked once, against ``defaults``."""
    if not isinstance(defaults, Mapping):
        issues.append(ManifestIssue("defaults", "", "must be a mapping of job fields"))
        return {}
    for key in defaults:
        if key == "id":
            issues.append(ManifestIssue("defaults", "id", "ids are per job, not a default"))
        else:
            check_key(issues, "defaults", key)
    return {k: v for k, v in defaults.items() if k != "id"}


def check_key(issues: list[ManifestIssue], row: str, key: object) -> None:
    """Report ``key`` if it is no job field (in a CSV header: no column)."""
    if not isinstance(key, str):
        issues.append(ManifestIssue(row, show(key), "unknown key (keys are text)"))
    elif key in REJECTED_FIELDS:
        issues.append(
            ManifestIssue(row, str(key), "is rejected by the API (one image per call; no quality)")
        )
    else:
        known = CSV_COLUMNS if row == "header" else JOB_FIELDS  # a CSV has no matrices: no vars
        if key not in known:
            issues.append(ManifestIssue(row, key, f"unknown key (known: {', '.join(known)})"))


def show(value: object) -> str:
    """A short rendering of a manifest value for a message: never the whole of a nested value,
    which a YAML alias bomb makes enormous."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 80 else f"{text[:77]}..."
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
