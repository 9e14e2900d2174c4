"""Finished images as a dataset: ``image-runner export``, in the Hugging Face layouts.

It owns choosing what is exported (succeeded jobs whose image is on disk and still matches the
sha256 in the checkpoint; anything else is skipped and counted) and writing one of two formats:

- ``imagefolder``: ``DEST/train/`` with copies of the images (not hard links: a user editing
  an exported image would alter the run's own, which the next run would pay to make again)
  and ``DEST/train/metadata.jsonl`` beside them, for
  ``datasets.load_dataset("imagefolder", data_dir=DEST)``. The ``train/`` folder is not
  decoration: with the images at the top of DEST, ``datasets`` takes a file named like
  ``test-1.png`` or ``validation_2.png`` for a split of its own and drops the metadata; and a
  ``metadata.jsonl`` above ``train/`` is ignored.
- ``parquet``: one file with an ``image`` column of ``{bytes, path}`` structs (the storage of
  Hugging Face's ``Image`` feature, declared in the schema metadata so that
  ``datasets.load_dataset("parquet", ...)`` decodes it), written a row group at a time.

Both carry the same columns: ``file_name, prompt, size, width, height, model, job_id,
references, sha256``. Every value is a string or an integer, never null: ``size`` is "" when the
request named none (the provider's default), and ``references`` is the reference images' file
names joined with "|", "" for none (as the ``images`` column of ``results.csv``). Why: the
imagefolder loader infers the column types from the first 10 MB of ``metadata.jsonl`` alone, so a
list or nullable column that is empty all through them fails to load once a later row fills it.

Nothing is overwritten: an existing non-empty DEST is refused. Both formats are written beside
DEST under a temporary name and renamed into place when complete. Export only reads the
checkpoint, so it is safe while a run is going on; it takes the jobs finished when it starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import RunnerError
from runner.images.files import temp_path_for
from runner.store.views import Viewable

ExportFormat = Literal["imagefolder", "parquet"]

SPLIT_DIR: Final = "train"
METADATA_NAME: Final = "metadata.jsonl"
# A row group holds its images in memory while it is built: bound it by count and by bytes
# (a 4K PNG is over 12 MB).
ROW_GROUP_IMAGES: Final = 64
ROW_GROUP_MAX_BYTES: Final = 256 * 1024 * 1024

_STRING = {"dtype": "string", "_type": "Value"}
_INT = {"dtype": "int64", "_type": "Value"}
METADATA_COLUMNS: Final[dict[str, dict[str, str]]] = {
    "file_name": _STRING,
    "prompt": _STRING,
    "size": _STRING,
    "width": _INT,
    "height": _INT,
    "model": _STRING,
    "job_id": _STRING,
    "references": _STRING,
    "sha256": _STRING,
}


@dataclass(frozen=True)
class ExportResult:
    images: int  # exported
    dest: Path
    skipped: int  # succeeded jobs whose image is missing or no longer matches its sha256


@dataclass(frozen=True)
class _Row:
    """One exportable job, as the checkpoint records it."""

    source: Path
    sha256: str
    metadata: dict[str, str | int]


def export_dataset(store: Viewable, dest: Path, fmt: ExportFormat) -> ExportResult:
    """Export the folder's finished images to ``dest`` as ``fmt``; refuse to overwrite."""
    _refuse_existing(dest, fmt)
    rows = _rows(store)
    if not rows:
        raise RunnerError(f"{store.folder}: no succeeded job to export yet; nothing was written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        if fmt == "imagefolder":
            exported = _write_imagefolder(rows, tmp)
        else:
            exported = _write_parquet(rows, tmp)
        if not exported:
            raise RunnerError(
                f"{store.folder}: none of the {len(rows)} succeeded jobs' images is intact "
                "(missing or altered); nothing was written"
            )
        _refuse_existing(dest, fmt)  # again: something may have appeared meanwhile
        tmp.replace(dest)  # over an empty folder too
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    return ExportResult(images=exported, dest=dest, skipped=len(rows) - exported)


def _refuse_existing(dest: Path, fmt: ExportFormat) -> None:
    if fmt == "imagefolder":
        taken = dest.exists() and (not dest.is_dir() or any(dest.iterdir()))
    else:
        taken = dest.exists()
    if taken:
        raise RunnerError(
            f"{dest} already exists{' and is not empty' if fmt == 'imagefolder' else ''}; "
            "export to a new path, nothing was written"
        )


def _rows(store: Viewable) -> list[_Row]:
    return [
        _Row(
            source=store.folder / job.image_path,
            sha256=job.sha256,
            metadata={
                "file_name": Path(job.image_path).name,
                "prompt": job.prompt,
                "size": job.size or "",
                "width": job.width,
                "height": job.height,
                "model": job.model,
                "job_id": job.job_id,
                "references": "|".join(Path(p).name for p in job.references),
                "sha256": job.sha256,
            },
        )
        for job in store.views().exportable_jobs()
    ]


# --- imagefolder ----------------------------------------------------------------------------


def _write_imagefolder(rows: list[_Row], root: Path) -> int:
    split = root / SPLIT_DIR
    split.mkdir(parents=True)
    exported = 0
    with open(split / METADATA_NAME, "w", encoding="utf-8") as metadata:
        for row in rows:
            if _place(row, split / str(row.metadata["file_name"])):
                metadata.write(json.dumps(row.metadata, ensure_ascii=False) + "\n")
                exported += 1
    return exported


def _place(row: _Row, target: Path) -> bool:
    """Copy ``row``'s image to ``target`` and verify what landed there; on a missing or altered
    image leave nothing and return False."""
    try:
        digest = _copy_hashing(row.source, target)
    except FileNotFoundError:
        return False
    if digest != row.sha256:
        target.unlink()
        return False
    return True


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


# --- parquet --------------------------------------------------------------------------------


def _parquet_schema() -> Any:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)] + [
        pa.field(name, pa.int64() if feature["dtype"] == "int64" else pa.string())
        for name, feature in METADATA_COLUMNS.items()
    ]
    features = {"image": {"_type": "Image"}, **METADATA_COLUMNS}
    huggingface = json.dumps({"info": {"features": features}})
    return pa.schema(fields, metadata={"huggingface": huggingface})


def _write_parquet(rows: list[_Row], path: Path) -> int:
    schema = _parquet_schema()
    exported = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(rows):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            exported += len(batch)
    return exported


def _batches(rows: list[_Row]) -> Iterator[list[dict[str, object]]]:
    """Rows with their verified image bytes, a row group's worth at a time."""
    batch: list[dict[str, object]] = []
    batch_bytes = 0
    for row in rows:
        try:
            data = row.source.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
        if hashlib.sha256(data).hexdigest() != row.sha256:
            continue
        name = row.metadata["file_name"]
        batch.append({"image": {"bytes": data, "path": name}, **row.metadata})
        batch_bytes += len(data)
        if len(batch) >= ROW_GROUP_IMAGES or batch_bytes >= ROW_GROUP_MAX_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch
