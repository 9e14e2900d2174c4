"""runner.manifest.load_jobs: jobs from Python records (dicts, a DataFrame) validated exactly as
a manifest's rows: the same ids, content hashes and errors."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from runner.errors import ManifestError, ManifestIssue
from runner.manifest import load_jobs, load_manifest

JOBS: list[dict[str, Any]] = [
    {"id": "mug", "prompt": "a white mug", "size": "2048x1360"},
    {"prompt": "a red fox"},  # a derived id
    {"prompt": "a fox, wide", "size": "2048x864", "response_format": "url"},
    {"prompt": "put the mug on image2", "images": ["refs/mug.png", "refs/beach.png"]},
    {"prompt": "a {style} cat", "vars": {"style": ["ink", "oil"]}, "repeat": 2},
    {"id": "all", "prompt": "a lamp", "model": "gpt-image-2-all"},
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "refs" / "mug.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "refs" / "beach.png")
    return tmp_path


def write_yaml(folder: Path, jobs: list[dict[str, Any]], **doc: Any) -> Path:
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({**doc, "jobs": jobs}, sort_keys=False), encoding="utf-8")
    return path


def shape(jobs: Any) -> list[tuple[str, str, str, str | None, str, tuple[Path, ...], str, str]]:
    """Everything but the row label, which names the source (``job 2 (line 4)``, ``row 2``)."""
    return [
        (j.id, j.content_hash, j.model, j.size, j.response_format, j.images, j.prompt, j.variant)
        for j in jobs
    ]


def problems(error: ManifestError) -> list[tuple[str, str, str]]:
    """The issues, a YAML manifest's row labels (``job 2 (line 4)``) put as records' (``row 2``)."""
    return [(as_record(i.row), i.field, as_record(i.message)) for i in error.issues]


def as_record(text: str) -> str:
    return re.sub(r"job (\d+) \(line \d+\)", r"row \1", text)


def test_dicts_and_a_frame_give_the_ids_and_hashes_of_the_yaml_manifest(folder: Path) -> None:
    from_yaml = load_manifest(write_yaml(folder, JOBS))
    from_dicts = load_jobs(JOBS, base=folder)
    frame = pd.DataFrame(JOBS)  # the gaps become NaN: "not set", as an empty CSV cell
    assert frame["repeat"].dtype == float  # pandas turns the ints of a gappy column to floats
    from_frame = load_jobs(frame, base=folder)
    from_records = load_jobs(frame.to_dict("records"), base=folder)

    assert len(from_yaml) == 9
    assert shape(from_dicts) == shape(from_yaml)
    assert shape(from_frame) == shape(from_yaml)
    assert shape(from_records) == shape(from_yaml)
    assert [j.row for j in from_dicts] == [f"row {n}" for n in (1, 2, 3, 4, 5, 5, 5, 5, 6)]
    assert (from_frame.rows, from_frame.edits, from_frame.source) == (6, 1, "jobs")
    assert from_dicts[3].images == (
        (folder / "refs/mug.png").resolve(),
        (folder / "refs/beach.png").resolve(),
    )


def test_defaults_fill_the_unset_cells(folder: Path) -> None:
    defaults = {"size": "1280x720", "response_format": "url"}
    jobs = [
        {"prompt": "a", "size": None},
        {"prompt": "b", "size": math.nan},
        {"prompt": "c", "size": "2048x2048"},
    ]
    from_yaml = load_manifest(
        write_yaml(folder, [{"prompt": "a"}, {"prompt": "b"}, jobs[2]], defaults=defaults)
    )
    from_dicts = load_jobs(jobs, base=folder, defaults=defaults)
    from_frame = load_jobs(pd.DataFrame(jobs), base=folder, defaults=defaults)
    assert [j.size for j in from_dicts] == ["1280x720", "1280x720", "2048x2048"]
    assert shape(from_dicts) == shape(from_yaml) == shape(from_frame)


def test_images_as_a_pipe_separated_string_like_a_csv_cell(folder: Path) -> None:
    listed = load_jobs([{"prompt": "p", "images": ["refs/mug.png", "refs/beach.png"]}], base=folder)
    piped = load_jobs([{"prompt": "p", "images": "refs/mug.png | refs/beach.png"}], base=folder)
    assert shape(piped) == shape(listed)


def test_references_are_relative_to_the_current_directory_by_default(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder / "refs")
    (job,) = load_jobs([{"prompt": "p", "images": ["mug.png"]}])
    assert job.images == ((folder / "refs" / "mug.png").resolve(),)


def test_an_invalid_row_raises_the_error_of_the_manifest(folder: Path) -> None:
    bad = [
        {"id": "ok", "prompt": "fine"},
        {"prompt": "bad size", "size": "2048X2048"},
        {"prompt": " ", "images": ["refs/missing.png"]},
        {"id": "OK", "prompt": "again", "size": "2048x2084"},
    ]
    with pytest.raises(ManifestError) as manifest:
        load_manifest(write_yaml(folder, bad))
    with pytest.raises(ManifestError) as dicts:
        load_jobs(bad, base=folder, source="my jobs")
    with pytest.raises(ManifestError) as frame:
        load_jobs(pd.DataFrame(bad), base=folder)

    assert problems(dicts.value) == problems(manifest.value)
    assert problems(frame.value) == problems(manifest.value)
    assert [i.row for i in dicts.value.issues] == ["row 2", "row 3", "row 3", "row 4", "row 4"]
    assert str(dicts.value).startswith(
        "my jobs: 5 problems, nothing was sent:\n  row 2, field size: "
    )
    assert frame.value.source == "jobs"
    assert "'OK' is already used by row 1 (ids differ only in case)" in str(frame.value)


def test_unknown_keys_per_record_and_per_frame_column(folder: Path) -> None:
    jobs = [{"prompt": "a", "quality": "hd"}, {"prompt": "b", "colour": "red"}, {"prompt": "c"}]
    with pytest.raises(ManifestError) as manifest:
        load_manifest(write_yaml(folder, jobs))
    with pytest.raises(ManifestError) as dicts:
        load_jobs(jobs)
    assert problems(dicts.value) == problems(manifest.value)
    assert [(i.row, i.field) for i in dicts.value.issues] == [
        ("row 1", "quality"),
        ("row 2", "colour"),
    ]
    # A frame has the keys of all its rows: they are checked once, as a CSV header is.
    with pytest.raises(ManifestError) as frame:
        load_jobs(
            pd.DataFrame(
                [{**job, "prompt": f"{job['prompt']} {n}"} for n in range(999) for job in jobs]
            )
        )
    assert [(i.row, i.field) for i in frame.value.issues] == [
        ("columns", "quality"),
        ("columns", "colour"),
    ]


def test_records_that_are_not_mappings_and_bad_defaults(folder: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_jobs([{"prompt": "a"}, "just a prompt"], defaults={"id": "x", "n": 2})  # type: ignore[list-item]
    assert info.value.issues == [
        ManifestIssue("defaults", "id", "ids are per job, not a default"),
        ManifestIssue("defaults", "n", "is rejected by the API (one image per call; no quality)"),
        ManifestIssue("row 2", "", "must be a mapping with at least a prompt"),
    ]


def test_load_manifest_takes_a_path_as_text_or_a_pathlike(folder: Path) -> None:
    path = write_yaml(folder, JOBS)
    assert shape(load_manifest(str(path))) == shape(load_manifest(path))
    assert load_manifest(str(path)).source == str(path)


@pytest.mark.parametrize("path", ["m.yaml", Path("m.yaml"), b"m.yaml"])
def test_a_path_given_to_load_jobs_points_to_load_manifest(path: Any) -> None:
    with pytest.raises(TypeError, match=r"not a path .*: use load_manifest for a file"):
        load_jobs(path)


def test_one_mapping_given_to_load_jobs_is_refused() -> None:
    with pytest.raises(TypeError, match=re.escape("not one mapping: pass [record] for one job")):
        load_jobs({"prompt": "a fox"})  # type: ignore[arg-type]


@pytest.mark.parametrize("records", [[], pd.DataFrame(), pd.DataFrame(columns=["prompt"])])
def test_no_records_is_refused_as_an_empty_manifest_is(records: Any) -> None:
    with pytest.raises(ManifestError) as info:
        load_jobs(records)
    assert info.value.issues == [ManifestIssue("records", "", "has no jobs")]
    assert str(info.value) == "jobs: 1 problem, nothing was sent:\n  records: has no jobs"


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_text_means_not_set_as_an_empty_csv_cell(folder: Path, blank: str) -> None:
    row = {"id": blank, "prompt": "a fox", "size": blank, "model": blank, "images": blank}
    row |= {"response_format": blank, "repeat": blank}
    csv = folder / "m.csv"
    csv.write_text(f"id,prompt,size,model,images,response_format,repeat\n,a fox,{blank},,,,\n")
    from_csv = shape(load_manifest(csv))
    assert shape(load_jobs([row], base=folder)) == from_csv
    assert shape(load_jobs(pd.DataFrame([row]), base=folder)) == from_csv
    (job,) = load_jobs([row], base=folder, defaults={"size": "1280x720"})
    assert (job.size, from_csv[0][3]) == ("1280x720", None)
    assert job.id == f"a-fox-{job.content_hash[:12]}"
    with pytest.raises(ManifestError) as info:
        load_jobs([{"prompt": blank}])
    assert info.value.issues == [
        ManifestIssue("row 1", "prompt", "is required and must be non-blank text")
    ]


def test_images_as_a_tuple_or_an_array_as_parquet_gives_them(folder: Path) -> None:
    refs = ["refs/mug.png", "refs/beach.png"]
    listed = load_jobs([{"prompt": "p", "images": refs}], base=folder)
    frame = pd.DataFrame({"prompt": ["p", "q"], "images": [np.array(refs), np.array([], str)]})
    as_tuple = load_jobs([{"prompt": "p", "images": tuple(refs)}], base=folder)
    from_arrays = load_jobs(frame, base=folder)
    assert shape(as_tuple) == shape(from_arrays)[:1] == shape(listed)
    assert from_arrays[1].images == () and from_arrays.edits == 1
