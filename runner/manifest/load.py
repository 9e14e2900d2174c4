"""The package's two ways in, :func:`load_manifest` (a YAML or CSV file) and :func:`load_jobs`
(Python records), and what both return: a :class:`Manifest`.

Both read raw rows (:mod:`~runner.manifest.read`), pass every row through the one validator
(:mod:`~runner.manifest.validate`) and pack the jobs into a spool
(:mod:`~runner.manifest.spool`), so a run walks them again (to plan, to send, to write the
results) without a million objects in memory and without reading the file again. Validation
happens before any request and reports every problem of every row together, each with its row
and field, so one round of fixes is enough. Nothing here touches the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

from runner.errors import ManifestError, ManifestIssue
from runner.jobs import Job
from runner.manifest.read import RawRow, read_file, read_records
from runner.manifest.spool import JobSpool
from runner.manifest.validate import UniqueIds, Validator

if TYPE_CHECKING:
    import pandas as pd


class Manifest(Sequence[Job]):
    """The validated jobs of a manifest, in manifest order: a read-only sequence of jobs (``len``,
    ``[i]``, slices, iteration), with where they came from and how many rows and edits they are.

    Made only by :func:`load_manifest` and :func:`load_jobs`: the spool it reads is private, so
    every job in it went through the validator (a job added by hand would be run unchecked,
    its id naming a file wherever it points). :meth:`close` frees the spool's temporary file.
    """

    def __init__(self, source: str, spool: JobSpool, rows: int, edits: int) -> None:
        self._source = source
        self._spool = spool
        self._rows = rows
        self._edits = edits

    @property
    def source(self) -> str:
        """The manifest's path, or what :func:`load_jobs` was told to call the jobs."""
        return self._source

    @property
    def rows(self) -> int:
        """Manifest rows with jobs (a matrix row or a ``repeat`` stands for many)."""
        return self._rows

    @property
    def edits(self) -> int:
        """Jobs with reference images."""
        return self._edits

    def close(self) -> None:
        self._spool.close()

    def __len__(self) -> int:
        return len(self._spool)

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        return self._spool[index]

    def __iter__(self) -> Iterator[Job]:
        return iter(self._spool)

    def __repr__(self) -> str:
        return (
            f"Manifest({self._source!r}, jobs={len(self._spool)}, rows={self._rows}, "
            f"edits={self._edits})"
        )


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest; raise :class:`ManifestError` listing every problem.
    Reference image paths are relative to the manifest's folder."""
    path = Path(path)
    return _load(str(path), path.parent, lambda issues: read_file(path, issues))


def load_jobs(
    records: Iterable[Mapping[str, object]] | pd.DataFrame,
    *,
    base: Path | None = None,
    defaults: Mapping[str, object] | None = None,
    source: str = "jobs",
) -> Manifest:
    """Validate jobs given as Python records, exactly as the rows of a manifest are.

    ``records`` are mappings of job fields (a list of dicts, ``DataFrame.to_dict("records")``)
    or a pandas DataFrame, one job (or one matrix row) each; none is an error, as in a manifest.
    A path or a single mapping raises :class:`TypeError`. A cell that is None, NaN or blank text
    means "not set", as an empty CSV cell does, so ``defaults`` (any job field but ``id``, as in
    a YAML manifest) fill it. ``images`` may be a list (or tuple, or numpy array) of paths or one
    ``|``-separated string, relative to ``base`` (default: the current directory). The jobs
    get the same ids and content hashes as in the equivalent manifest; problems raise one
    :class:`ManifestError`, named ``source``, whose rows are ``row N``, counted from 1 in the
    order given (a DataFrame's unknown columns are reported once, against ``columns``).
    """
    if isinstance(records, str | bytes | os.PathLike):
        raise TypeError(
            f"load_jobs takes records, not a path ({records!r}): use load_manifest for a file"
        )
    if isinstance(records, Mapping):
        raise TypeError(
            "load_jobs takes a list of dicts (one job each) or a DataFrame, not one mapping: "
            "pass [record] for one job"
        )
    folder = Path.cwd() if base is None else base
    return _load(source, folder, lambda issues: read_records(records, defaults, issues))


def _load(
    source: str, base: Path, read: Callable[[list[ManifestIssue]], Iterator[RawRow]]
) -> Manifest:
    issues: list[ManifestIssue] = []
    spool = JobSpool()
    validator = Validator(base)
    ids = UniqueIds(spool)
    rows = edits = 0
    position = 0  # of the row's first job in the manifest
    try:
        for raw in read(issues):
            jobs = validator.jobs(raw, issues)
            if jobs:
                spool.extend_packed(jobs)
                rows += 1
                if jobs[0][6]:  # the jobs of a row have the same references
                    edits += len(jobs)
            ids.add(raw, jobs, position)
            position += len(jobs)
    except OSError as exc:  # from the spool: its temporary file
        issues.append(ManifestIssue("file", "", f"cannot hold its jobs in a temporary file: {exc}"))
    issues += ids.issues  # after the rows' own problems, as a second round
    if issues:
        spool.close()
        raise ManifestError(source, issues)
    return Manifest(source, spool, rows, edits)
