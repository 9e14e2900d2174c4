"""The metadata columns of an export, and the one type each keeps in both formats.

Every row has the same columns: the fixed ones (:data:`FIXED_COLUMNS`), then one for each
matrix variable named by any exported job, in the order they are first met. Every value is a
string or a number, never null and never a list: the imagefolder loader reads ``metadata.jsonl``
in blocks of 10 MB and takes the column types from the first one, so a column that is null all
through it (or a list empty all through it) has no usable type and fails to load once a later
block fills it; and a column of integers in the first block cannot take a later ``0.5``. So the
type of a column is decided over the whole export before a row is written, and holds in every
block, whatever the order of the rows:

- fixed columns: as :data:`FIXED_COLUMNS` says. ``size`` is "" when the request named none (the
  provider's default); ``references`` is the reference images' paths in the dataset, relative to
  its root, joined with "|" ("" for none; the names are made without "|"); ``repeat`` is the
  number of the copy (1, 2...) of a row with ``repeat``, 0 for a row without; ``version`` is the
  image's generation (1, then 2 after a regeneration...), ``review`` its review (approved,
  rejected or unreviewed).
- a variable's column: ``int64`` when every exported job has it as a whole number, ``float64``
  when every one has it as a finite number (written with a decimal point, so it reads as a float in
  any block), else ``string``: its values as text ("3", "0.5", "watercolor"), "" for a job
  without it (a job of another manifest row, with other variables or none).

A variable named like a fixed column, or like a column the imagefolder loader takes for an
image file (``image``, ``file_names``, anything ending in ``_file_name`` or ``_file_names``),
gets the column ``<name>_var`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from runner.store.views import ExportJob

ColumnType = Literal["string", "int64", "float64"]
Value = str | int | float

FIXED_COLUMNS: Final[dict[str, ColumnType]] = {
    "file_name": "string",
    "prompt": "string",
    "size": "string",
    "width": "int64",
    "height": "int64",
    "model": "string",
    "job_id": "string",
    "references": "string",
    "sha256": "string",
    "repeat": "int64",
    "version": "int64",
    "review": "string",
}


class Columns:
    """The columns of one export, and its rows."""

    def __init__(self, jobs: Sequence[ExportJob]) -> None:
        self.variables: dict[str, str] = {}  # variable -> its column
        seen: dict[str, list[Value]] = {}
        for job in jobs:
            for name, value in job.vars.items():
                seen.setdefault(name, []).append(value)
        self.types: dict[str, ColumnType] = dict(FIXED_COLUMNS)
        for name, values in seen.items():
            column = _column_name(name, self.types)
            self.variables[name] = column
            self.types[column] = _type_of(values, complete=len(values) == len(jobs))

    def row(self, job: ExportJob, references: tuple[str, ...]) -> dict[str, Value]:
        """``job``'s metadata row, ``references`` being its references' paths in the
        dataset."""
        row: dict[str, Value] = {
            "file_name": Path(job.image_path).name,
            "prompt": job.prompt,
            "size": job.size or "",
            "width": job.width,
            "height": job.height,
            "model": job.model,
            "job_id": job.job_id,
            "references": "|".join(references),
            "sha256": job.sha256,
            "repeat": job.repeat_index or 0,
            "version": job.version,
            "review": job.review,
        }
        for name, column in self.variables.items():
            row[column] = _cell(job.vars.get(name), self.types[column])
        return row


def _column_name(name: str, taken: dict[str, ColumnType]) -> str:
    column = name
    while column in taken or column in {"image", "file_names"} or _a_file_column(column):
        column = f"{column}_var"
    return column


def _a_file_column(name: str) -> bool:
    return name.endswith(("_file_name", "_file_names"))


def _type_of(values: list[Value], *, complete: bool) -> ColumnType:
    if not complete or any(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, int) for v in values):
        return "int64"
    if all(isinstance(v, int | float) and math.isfinite(v) for v in values):  # NaN: no JSON
        return "float64"
    return "string"


def _cell(value: Value | None, kind: ColumnType) -> Value:
    if kind == "int64":
        assert isinstance(value, int)
        return value
    if kind == "float64":
        assert isinstance(value, int | float)
        return float(value)
    return "" if value is None else str(value)
