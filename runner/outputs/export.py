"""Finished images as a dataset: ``image-runner export``, in the Hugging Face layouts.

It owns choosing what is exported and writing it. A succeeded job is exported when its image
is on disk and still matches the sha256 in the checkpoint, and, for an edit, its reference
images are still those it was made from (:mod:`~runner.outputs.export_references`); anything
else is left out and counted (the references' problems named). ``approved_only`` keeps the jobs
whose current image was approved in review. DEST is a folder, in one of two formats:

- ``imagefolder``: a folder per split (``DEST/train/``...) with copies of its images (not hard
  links: a user editing an exported image would alter the run's own, which the next run would
  take for an edit by hand, the job's next version, unreviewed) and its ``metadata.jsonl``, for
  ``datasets.load_dataset("imagefolder", data_dir=DEST)``. The split folders are not
  decoration: with the images at the top of DEST, ``datasets`` takes a file named like
  ``test-1.png`` or ``validation_2.png`` for a split of its own and drops the metadata; and a
  ``metadata.jsonl`` above the split folders is ignored.
- ``parquet``: one file per split, ``DEST/data/<split>-00000-of-00001.parquet`` (the Hub's own
  layout for a dataset in one shard per split, which ``datasets`` recognises whatever the
  split's name), with an ``image`` column of ``{bytes, path}`` structs (the storage of Hugging
  Face's ``Image`` feature, declared in the schema metadata, so that it decodes), written a row
  group at a time; for ``datasets.load_dataset("parquet", data_dir=DEST)`` or
  ``pandas.read_parquet(DEST / "data")``.

Both have the same columns (:mod:`~runner.outputs.export_columns`), the edits' reference images
in ``DEST/references/`` and the dataset card ``DEST/README.md``
(:mod:`~runner.outputs.dataset_card`), whose ``configs`` make ``datasets.load_dataset(DEST)``
load either with its splits. Splits are by a hash of the job id
(:mod:`~runner.outputs.export_splits`); a split that gets no image is not written.

A run whose images are in object storage (``location``) is exported the same way to a local
DEST: each image is read from the store once, downloaded into its place in DEST (imagefolder)
or read for its row group (parquet), and checked by the sha256 of the bytes that came, so an
image deleted or altered in the store is skipped and counted as a missing file is.

Nothing is overwritten: an existing non-empty DEST is refused. The dataset is written beside
DEST under a temporary name and renamed into place when complete. Export only reads the
checkpoint, so it is safe while a run is going on; it takes the jobs finished when it starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from runner import __version__
from runner.errors import RunnerError, StorageError
from runner.images.files import sha256_file, temp_path_for
from runner.outputs.dataset_card import CardFacts, CardTally, render_card
from runner.outputs.export_columns import Columns, ColumnType, Value
from runner.outputs.export_references import ReferenceCopies, copy_hashing
from runner.outputs.export_splits import TRAIN_ONLY, SplitSpec, imagefolder_problem
from runner.storage import Location
from runner.store.views import ExportJob, Spend, Viewable

ExportFormat = Literal["imagefolder", "parquet"]

METADATA_NAME: Final = "metadata.jsonl"
CARD_NAME: Final = "README.md"
PARQUET_DIR: Final = "data"
# A row group holds its images in memory while it is built: bound it by count and by bytes
# (a 4K PNG is over 12 MB).
ROW_GROUP_IMAGES: Final = 64
ROW_GROUP_MAX_BYTES: Final = 256 * 1024 * 1024

_ARROW: Final[dict[ColumnType, Any]] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
}


@dataclass(frozen=True)
class ExportResult:
    images: int  # exported
    dest: Path
    skipped: int  # succeeded jobs whose image is missing or no longer matches its sha256
    reference_problems: tuple[str, ...]  # one per job left out for its references, naming it
    splits: dict[str, int]  # images per split, in the spec's order; 0: the split not written
    references: int  # distinct reference images copied


def export_dataset(
    store: Viewable,
    dest: Path,
    fmt: ExportFormat,
    *,
    split: SplitSpec = TRAIN_ONLY,
    approved_only: bool = False,
    command: str = "runner.outputs.export.export_dataset (Python)",
    location: Location | None = None,
) -> ExportResult:
    """Export the folder's finished images to the folder ``dest`` as ``fmt``; refuse to
    overwrite. ``command`` is how the export was asked for, for the dataset card; ``location``
    the object store holding the images, when they are not in the folder."""
    images: _Images = _FolderImages(store.folder) if location is None else _StoredImages(location)
    where = store.folder if location is None else location.url
    if fmt == "imagefolder" and (problem := imagefolder_problem(split)) is not None:
        raise RunnerError(problem)
    _refuse_existing(dest)
    views = store.views()
    jobs = views.exportable_jobs()
    if not jobs:
        raise RunnerError(f"{where}: no succeeded job to export yet; nothing was written")
    if approved_only:
        jobs = [job for job in jobs if job.review == "approved"]
        if not jobs:
            raise RunnerError(
                f"{where}: none of the succeeded jobs is approved; approve images with "
                f"`image-runner review {where}`, or export without --approved-only; "
                "nothing was written"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    tmp.mkdir()
    try:
        writer = _Writer(images, tmp, fmt, jobs)
        counts = {name: writer.write_split(name, split) for name in split.names}
        if not writer.exported:
            raise RunnerError(
                f"{where}: none of the {len(jobs)} jobs could be exported "
                f"({writer.skipped} with an image missing or altered, "
                f"{len(writer.problems)} with a reference missing or changed); nothing was written"
            )
        spent = views.job_spend([job.job_id for job in writer.written]).values()
        facts = CardFacts(
            title=dest.name,
            output_folder=str(where),
            fmt=fmt,
            split_files={s: (n, writer.pattern(s)) for s, n in counts.items() if n},
            references=writer.references.copied,
            skipped=writer.skipped + len(writer.problems),
            split_spec=str(split),
            approved_only=approved_only,
            exported_spend=Spend(
                sum(s.confirmed_micro_usd for s in spent), sum(s.possible_micro_usd for s in spent)
            ),
            folder_spend=views.spend(),
            version=__version__,
            command=command,
            exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        tally = CardTally()
        for job in writer.written:
            tally.add(job)
        card = render_card(facts, tally, writer.columns)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        _refuse_existing(dest)  # again: something may have appeared meanwhile
        tmp.replace(dest)  # over an empty folder too
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
    return ExportResult(
        images=writer.exported,
        dest=dest,
        skipped=writer.skipped,
        reference_problems=tuple(writer.problems),
        splits=counts,
        references=writer.references.copied,
    )


def _parquet_schema(types: dict[str, ColumnType]) -> Any:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)]
    fields += [pa.field(name, _ARROW[kind]) for name, kind in types.items()]
    features: dict[str, Any] = {"image": {"_type": "Image"}}
    features |= {name: {"dtype": kind, "_type": "Value"} for name, kind in types.items()}
    huggingface = json.dumps({"info": {"features": features}})
    return pa.schema(fields, metadata={"huggingface": huggingface})


def _refuse_existing(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RunnerError(
            f"{dest} already exists{' and is not empty' if dest.is_dir() else ''}; "
            "export to a new folder, nothing was written"
        )


class _Images(Protocol):
    """Where an export reads the run's images (``path``: as recorded, relative to the run's
    output location)."""

    def copy(self, path: str, target: Path) -> str | None:
        """Copy the image to the file ``target``; the sha256 of what was copied, None (and no
        ``target``) when there is no image."""
        ...

    def read(self, path: str) -> bytes:
        """The image's bytes; empty when there is none."""
        ...


class _FolderImages:
    """The images in the output folder ``folder``."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def copy(self, path: str, target: Path) -> str | None:
        try:
            return copy_hashing(self._folder / path, target)
        except FileNotFoundError:
            return None

    def read(self, path: str) -> bytes:
        try:
            return (self._folder / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return b""


class _StoredImages:
    """The images in ``location``, an object store: each downloaded once (a missing one, or
    one the store cannot give, is no image: skipped and counted)."""

    def __init__(self, location: Location) -> None:
        self._location = location

    def copy(self, path: str, target: Path) -> str | None:
        try:
            self._location.get(path, target)
        except StorageError:
            target.unlink(missing_ok=True)
            return None
        return sha256_file(target)

    def read(self, path: str) -> bytes:
        try:
            return self._location.read_bytes(path)
        except StorageError:
            return b""


class _Writer:
    """Writes the splits of one export under ``root``, from the run's ``images``, keeping what
    the card and the result count."""

    def __init__(
        self, images: _Images, root: Path, fmt: ExportFormat, jobs: list[ExportJob]
    ) -> None:
        self._images = images
        self._root = root
        self._fmt = fmt
        self.references = ReferenceCopies(root)
        self.problems: list[str] = []
        self.kept: list[ExportJob] = []
        for job in jobs:
            problem = self.references.problem(job)
            if problem is None:
                self.kept.append(job)
            else:
                self.problems.append(problem)
        self.columns = Columns(self.kept)
        self._written: set[str] = set()
        self.exported = 0
        self.skipped = 0

    @property
    def written(self) -> list[ExportJob]:
        """The jobs exported, in the order they were planned (not split by split)."""
        return [job for job in self.kept if job.job_id in self._written]

    def pattern(self, split: str) -> str:
        """The files of ``split``, relative to the dataset's root, as a ``configs`` entry
        names them."""
        if self._fmt == "imagefolder":
            return f"{split}/**"
        return f"{PARQUET_DIR}/{split}-00000-of-00001.parquet"

    def write_split(self, name: str, spec: SplitSpec) -> int:
        """Write the jobs ``spec`` puts in split ``name``; return how many were written
        (none: nothing of the split is left)."""
        jobs = [job for job in self.kept if spec.split_of(job.job_id) == name]
        path = self._root / self.pattern(name).removesuffix("/**")
        if self._fmt == "imagefolder":
            written = self._write_imagefolder(jobs, path)
        else:
            written = self._write_parquet(jobs, path)
        if not written and path.is_dir():
            shutil.rmtree(path)
        elif not written:
            path.unlink()
        self.exported += written
        return written

    def _row(self, job: ExportJob) -> dict[str, Value] | None:
        """``job``'s metadata row, its references copied into the dataset; None, with the
        problem kept, when a reference changed meanwhile."""
        references, problem = self.references.place(job)
        if problem is not None:
            self.problems.append(problem)
            return None
        self._written.add(job.job_id)
        return self.columns.row(job, references)

    # --- imagefolder ------------------------------------------------------------------------

    def _write_imagefolder(self, jobs: list[ExportJob], folder: Path) -> int:
        folder.mkdir(parents=True)
        written = 0
        with open(folder / METADATA_NAME, "w", encoding="utf-8") as metadata:
            for job in jobs:
                target = folder / Path(job.image_path).name
                if not self._place(job, target):
                    continue
                row = self._row(job)
                if row is None:
                    target.unlink()
                    continue
                metadata.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
        return written

    def _place(self, job: ExportJob, target: Path) -> bool:
        """Copy ``job``'s image to ``target`` and verify what landed there; on a missing or
        altered image leave nothing and return False."""
        digest = self._images.copy(job.image_path, target)
        if digest is None:
            self.skipped += 1
            return False
        if digest != job.sha256:
            target.unlink()
            self.skipped += 1
            return False
        return True

    # --- parquet ----------------------------------------------------------------------------

    def _write_parquet(self, jobs: list[ExportJob], path: Path) -> int:
        path.parent.mkdir(exist_ok=True)
        schema = _parquet_schema(self.columns.types)
        written = 0
        with pq.ParquetWriter(path, schema) as writer:
            for batch in self._batches(jobs):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                written += len(batch)
        return written

    def _batches(self, jobs: list[ExportJob]) -> Iterator[list[dict[str, object]]]:
        """Rows with their verified image bytes, a row group's worth at a time."""
        batch: list[dict[str, object]] = []
        batch_bytes = 0
        for job in jobs:
            data = self._images.read(job.image_path)
            if hashlib.sha256(data).hexdigest() != job.sha256:
                self.skipped += 1
                continue
            row = self._row(job)
            if row is None:
                continue
            batch.append({"image": {"bytes": data, "path": row["file_name"]}, **row})
            batch_bytes += len(data)
            if len(batch) >= ROW_GROUP_IMAGES or batch_bytes >= ROW_GROUP_MAX_BYTES:
                yield batch
                batch, batch_bytes = [], 0
        if batch:
            yield batch
