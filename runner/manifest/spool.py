"""A sequence of jobs kept packed, not as objects: how a manifest of a million rows is held
between validation and the end of a run. Private to the package: the validator fills it, and
users read it through a :class:`~runner.manifest.load.Manifest`, which has no way to add to it.

Validation reads a manifest once; planning, the pool and the results file then walk its jobs
again, in order. Holding them as :class:`~runner.jobs.Job` objects costs about 450 bytes a job
(450 MB for a million), and parsing the file again costs more time than the rest of planning.
So the validated jobs are appended here as tuples, packed with :mod:`marshal` in chunks of
:data:`CHUNK_JOBS` (strings shared by the rows of a chunk, such as the model and the size, are
stored once per chunk) into a temporary file that stays in memory while it is small and moves
to disk past :data:`IN_MEMORY_BYTES`. Reading unpacks one chunk at a time and caches the last
one, so walking the sequence in order, or by increasing indexes, unpacks each chunk once.

The temporary file is anonymous: it disappears with the process, however that ends. The jobs
read back are those appended, whatever happens to the manifest file in the meantime.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, overload

from runner.jobs import Job

CHUNK_JOBS: Final = 2048
IN_MEMORY_BYTES: Final = 16 * 1024 * 1024

# A job's fields in constructor order, its images as strings (Path objects do not marshal):
# what the spool stores, and what the validator makes. The last three are a matrix row's
# variables (plain str, int and float: marshal takes no subclass), the repeat index and the
# template; a row's jobs share its template and variable names, which marshal stores once.
Packed = tuple[
    str,
    str,
    str,
    str | None,
    str,
    str,
    tuple[str, ...],
    str,
    str,
    tuple[tuple[str, str | int | float], ...],
    int | None,
    str,
]


class JobSpool(Sequence[Job]):
    """Add jobs with :meth:`extend_packed`, then read them like a list (``len``, ``[i]``,
    slices, iteration). Not thread-safe; close it (or let it be collected) to free the file."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BYTES)  # noqa: SIM115
        self._chunks: list[tuple[int, int]] = []  # (offset, length) of each packed chunk
        self._pending: list[Packed] = []  # the last, unfinished chunk
        self._count = 0
        self._cached_index = -1
        self._cached: list[Packed] = []
        self._paths: dict[str, Path] = {}  # reference images are few: one Path object each

    def extend_packed(self, jobs: list[Packed]) -> None:
        """Append jobs given as their fields in order, their images as strings: the output of
        the validator, whose rules for a row are those of :class:`~runner.jobs.Job` (a test
        holds them to it). Nothing else may call it: the jobs are read back unchecked."""
        self._pending += jobs
        self._count += len(jobs)
        if len(self._pending) >= CHUNK_JOBS:
            pending, start = self._pending, 0
            while len(pending) - start >= CHUNK_JOBS:
                self._write(pending[start : start + CHUNK_JOBS])
                start += CHUNK_JOBS
            self._pending = pending[start:]

    def _write(self, chunk: list[Packed]) -> None:
        data = marshal.dumps(chunk)
        offset = self._file.seek(0, os.SEEK_END)  # reads may have moved the position
        self._file.write(data)
        self._chunks.append((offset, len(data)))

    def close(self) -> None:
        self._file.close()
        self._cached = []

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("job index out of range")
        chunk, offset = divmod(index, CHUNK_JOBS)
        return self._job(self._chunk(chunk)[offset])

    def __iter__(self) -> Iterator[Job]:
        for chunk in range(len(self._chunks) + 1):
            for packed in self._chunk(chunk):
                yield self._job(packed)

    def _chunk(self, index: int) -> list[Packed]:
        if index == len(self._chunks):
            return self._pending
        if index != self._cached_index:
            offset, length = self._chunks[index]
            self._file.seek(offset)
            self._cached = marshal.loads(self._file.read(length))
            self._cached_index = index
        return self._cached

    def _job(self, packed: Packed) -> Job:
        images = packed[6]
        paths = tuple(map(self._path, images)) if images else ()
        # Not checked again: the spool holds jobs that were (see extend_packed).
        return restore(*packed[:6], paths, *packed[7:])

    def _path(self, text: str) -> Path:
        path = self._paths.get(text)
        if path is None:
            path = self._paths[text] = Path(text)
        return path


def restore(
    id: str,
    prompt: str,
    model: str,
    size: str | None,
    response_format: str,
    content_hash: str,
    images: tuple[Path, ...],
    row: str,
    variant: str,
    vars: tuple[tuple[str, str | int | float], ...],
    repeat_index: int | None,
    template: str,
) -> Job:
    """A job rebuilt from the fields of one the validator checked, without checking them again
    or asking for the constructor's token, as unpickling rebuilds an object: a run walks every
    job of a manifest several times, and this takes 0.5 µs a job where the constructor takes 2.
    Only for jobs the validator made: the spool's own, and those a PostgreSQL run's workers
    read back from the rows their plan recorded (:mod:`runner.store.postgres.claims`);
    anything else gets its jobs from the validator."""
    job = object.__new__(Job)
    _set_id(job, id)
    _set_prompt(job, prompt)
    _set_model(job, model)
    _set_size(job, size)
    _set_response_format(job, response_format)
    _set_content_hash(job, content_hash)
    _set_images(job, images)
    _set_row(job, row)
    _set_variant(job, variant)
    _set_vars(job, vars)
    _set_repeat_index(job, repeat_index)
    _set_template(job, template)
    return job


# The slots' own setters, which a frozen dataclass's __setattr__ does not stand in front of.
(
    _set_id,
    _set_prompt,
    _set_model,
    _set_size,
    _set_response_format,
    _set_content_hash,
    _set_images,
    _set_row,
    _set_variant,
    _set_vars,
    _set_repeat_index,
    _set_template,
) = (Job.__dict__[field.name].__set__ for field in dataclasses.fields(Job))
