"""``image-runner export``: the datasets it writes load with the real Hugging Face loaders."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import runner.outputs.export
from runner.emulator import Emulator
from runner.errors import RunnerError, StoreError
from runner.images.files import is_temp_name
from runner.outputs.export import export_dataset
from runner.outputs.export_columns import FIXED_COLUMNS
from runner.store.sqlite import SqliteStore
from tests.conftest import make_ref, run_manifest, write_manifest
from tests.test_cli import run_cli

JOBS: list[dict[str, Any]] = [
    {"id": "wide", "prompt": "a long red train", "size": "1280x544"},
    {"id": "test-1", "prompt": "a tall tower", "size": "848x1280"},  # a split name on purpose
    {"id": "default", "prompt": "the provider picks the size"},
    {
        "id": "edit",
        "prompt": "give image1 the colors of image2",
        "images": ["refs/a.png", "refs/b.jpg"],
    },
    {"id": "refused", "prompt": "no [[faults:policy]]", "size": "1280x544"},
]
EXPORTED = ["wide", "test-1", "default", "edit"]


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    """An output folder of a finished run: four images and one content-policy failure."""
    make_ref(tmp_path / "refs", "a.png", (48, 64))
    make_ref(tmp_path / "refs", "b.jpg")
    folder = tmp_path / "out"
    await run_manifest(write_manifest(tmp_path, JOBS), folder, emulator.base_url)
    return folder


@pytest.fixture
def hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The real ``datasets``, offline, with its home and cache under ``tmp_path``."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    import datasets  # after the environment: it reads it on import

    # Also when an earlier test imported it with other settings.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    datasets.disable_progress_bars()
    return datasets


def export(
    out: Path, dest: Path, fmt: runner.outputs.export.ExportFormat, **options: Any
) -> runner.outputs.export.ExportResult:
    store = SqliteStore.open_read_only(out)
    try:
        return export_dataset(store, dest, fmt, **options)
    finally:
        store.close()


def expected_rows(out: Path) -> dict[str, dict[str, object]]:
    """What the results table says about each exported job, in the export's terms."""
    results = pd.read_parquet(out / "results.parquet").set_index("job_id")
    rows = {}
    for job_id in EXPORTED:
        r = results.loc[job_id]
        refs = [reference_path(Path(p)) for p in r["images"].split("|")] if r["images"] else []
        rows[job_id] = {
            "file_name": Path(r["image_path"]).name,
            "prompt": r["prompt"],
            "size": "" if pd.isna(r["size"]) else r["size"],
            "width": int(r["width"]),
            "height": int(r["height"]),
            "model": r["model"],
            "job_id": job_id,
            "references": "|".join(refs),
            "sha256": r["sha256"],
            "repeat": 0,
            "version": 1,
            "review": "unreviewed",
        }
    return rows


def reference_path(source: Path) -> str:
    """Where an export keeps the reference image ``source``, from the dataset's root."""
    return f"references/{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}-{source.name}"


def check_rows(loaded: list[dict[str, Any]], out: Path) -> None:
    expected = expected_rows(out)
    assert [row["job_id"] for row in loaded] == EXPORTED  # manifest order
    for row in loaded:
        want = expected[row["job_id"]]
        image = row.pop("image")
        assert image.size == (want["width"], want["height"])
        row.pop("file_name", None)  # imagefolder turns it into the image column
        assert row == {k: v for k, v in want.items() if k != "file_name"}
    assert [Path(p).name[13:] for p in str(expected["edit"]["references"]).split("|")] == [
        "a.png",
        "b.jpg",
    ]
    assert expected["default"]["size"] == "" and expected["default"]["width"] == 1280
    assert (expected["edit"]["width"], expected["edit"]["height"]) == (960, 1280)  # follows a.png


def test_imagefolder_loads_as_a_train_split(out: Path, tmp_path: Path, hf: ModuleType) -> None:
    dest = tmp_path / "exports" / "folder"
    result = export(out, dest, "imagefolder")
    assert (result.images, result.skipped, result.dest) == (4, 0, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "references", "train"]
    assert not [p for p in dest.parent.iterdir() if p != dest]  # no temp folder left

    loaded = hf.load_dataset("imagefolder", data_dir=str(dest), cache_dir=str(tmp_path / "c"))
    assert list(loaded) == ["train"]
    train = loaded["train"]
    assert isinstance(train.features["image"], hf.Image)
    assert train.features["references"] == hf.Value("string")
    check_rows(list(train), out)

    # Copies, not links: editing the export must not alter the run's own image.
    exported = dest / "train" / "wide.png"
    exported.write_bytes(b"edited")
    assert (out / "images" / "wide.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parquet_loads_with_datasets_and_pandas(
    out: Path, tmp_path: Path, hf: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner.outputs.export, "ROW_GROUP_IMAGES", 3)
    dest = tmp_path / "exports" / "nested" / "images"
    result = export(out, dest, "parquet")
    assert (result.images, result.skipped, result.dest) == (4, 0, dest)
    table = dest / "data" / "train-00000-of-00001.parquet"
    assert pq.ParquetFile(table).metadata.num_row_groups == 2  # written 3 images at a time

    loaded = hf.load_dataset("parquet", data_dir=str(dest), cache_dir=str(tmp_path / "c"))
    train = loaded["train"]
    assert isinstance(train.features["image"], hf.Image)
    check_rows(list(train), out)

    frame = pd.read_parquet(dest / "data")
    assert list(frame.columns) == ["image", *FIXED_COLUMNS]
    first = frame.iloc[0]
    assert first["image"]["path"] == first["file_name"] == "wide.png"
    with Image.open(io.BytesIO(first["image"]["bytes"])) as image:
        assert image.size == (1280, 544)


def test_altered_and_missing_images_are_skipped(out: Path, tmp_path: Path) -> None:
    with open(out / "images" / "wide.png", "ab") as f:
        f.write(b"tampered")
    (out / "images" / "default.png").unlink()

    folder = export(out, tmp_path / "folder", "imagefolder")
    assert (folder.images, folder.skipped) == (2, 2)
    lines = (tmp_path / "folder" / "train" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == ["test-1", "edit"]
    assert sorted(p.name for p in (tmp_path / "folder" / "train").iterdir()) == [
        "edit.png",
        "metadata.jsonl",
        "test-1.png",
    ]

    table = export(out, tmp_path / "one", "parquet")
    assert (table.images, table.skipped) == (2, 2)
    assert list(pd.read_parquet(tmp_path / "one" / "data")["job_id"]) == ["test-1", "edit"]


def test_an_existing_destination_is_never_overwritten(out: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(RunnerError, match="already exists and is not empty"):
        export(out, taken, "imagefolder")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]

    existing = tmp_path / "old.parquet"
    existing.write_bytes(b"old")
    with pytest.raises(RunnerError, match="already exists"):
        export(out, existing, "parquet")
    assert existing.read_bytes() == b"old"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(out, empty, "imagefolder").images == 4
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


def test_nothing_to_export_is_an_error(out: Path, tmp_path: Path) -> None:
    for image in (out / "images").iterdir():
        image.unlink()
    with pytest.raises(RunnerError, match=r"none of the 4 jobs could be exported \(4 with an"):
        export(out, tmp_path / "ds", "imagefolder")
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


def test_cli_export_and_refusal(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    done = run_cli("export", out, dest, "--format", "parquet")
    assert done.returncode == 0, done.stderr
    assert f"exported 4 images as parquet to {dest}" in done.stdout
    assert len(pd.read_parquet(dest / "data")) == 4

    again = run_cli("export", out, dest, "--format", "parquet")
    assert again.returncode == 2
    assert "already exists" in again.stderr and "nothing was written" in again.stderr
    assert len(pd.read_parquet(dest / "data")) == 4


def test_a_checkpoint_still_being_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    sqlite3.connect(tmp_path / "out" / "checkpoint.sqlite").close()  # no tables yet
    with pytest.raises(StoreError, match="cannot read the checkpoint: no such table: jobs"):
        export(tmp_path / "out", tmp_path / "ds", "imagefolder")
    assert not (tmp_path / "ds").exists()
