"""runner.outputs.export_columns: one type per column, decided over the whole export, so the
imagefolder loader (which takes the types from its first 10 MB of metadata) reads every row
whatever their order."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.json as paj

from runner.outputs.export_columns import FIXED_COLUMNS, Columns, Value
from runner.store.views import ExportJob


def job(job_id: str, **fields: Any) -> ExportJob:
    values: dict[str, Any] = {
        "job_id": job_id,
        "prompt": "p",
        "size": None,
        "model": "gpt-image-2-vip",
        "references": (),
        "image_path": f"images/{job_id}.png",
        "width": 1024,
        "height": 1024,
        "sha256": "0" * 64,
        "vars": {},
        "repeat_index": None,
        "template": None,
        "version": 1,
        "review": "unreviewed",
        "edited": False,
        "content_hash": "1" * 64,
    }
    return ExportJob(**(values | fields))


def arrow_type(rows: list[dict[str, Value]], column: str) -> Any:
    """The type pyarrow's JSON reader, as the imagefolder loader calls it, infers for a block
    made of ``rows``."""
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return paj.read_json(pa.BufferReader(lines)).schema.field(column).type


def test_each_variable_gets_one_type_that_reads_the_same_in_any_block() -> None:
    jobs = [
        job("a", vars={"seed": 1, "cfg": 2, "style": "ink", "scale": 1}),
        job("b", vars={"seed": 2, "cfg": 2.5, "style": 3, "scale": 2}, repeat_index=2),
        job("c", vars={"seed": 3, "cfg": 7, "style": "oil"}),
    ]
    columns = Columns(jobs)
    assert {name: columns.types[name] for name in ("seed", "cfg", "style", "scale")} == {
        "seed": "int64",  # whole numbers in every job
        "cfg": "float64",  # numbers in every job, one of them not whole
        "style": "string",  # text and a number
        "scale": "string",  # not in every job: "" where missing
    }
    rows = [columns.row(j, ()) for j in jobs]
    assert [r["cfg"] for r in rows] == [2.0, 2.5, 7.0]
    assert [r["style"] for r in rows] == ["ink", "3", "oil"]
    assert [r["scale"] for r in rows] == ["1", "2", ""]
    assert [r["repeat"] for r in rows] == [0, 2, 0]
    assert list(rows[0]) == [*FIXED_COLUMNS, "seed", "cfg", "style", "scale"]
    expected = {"seed": pa.int64(), "cfg": pa.float64(), "style": pa.string()}
    for name, kind in {**expected, "scale": pa.string()}.items():
        for block in ([rows[0]], [rows[2]], rows[1:]):  # each row a block's first
            assert arrow_type(block, name) == kind, (name, block)


def test_a_variable_named_like_another_column_gets_a_column_of_its_own() -> None:
    jobs = [job("a", vars={"size": "big", "model": "x", "cover_file_name": "c", "image": "i"})]
    columns = Columns(jobs)
    assert columns.variables == {
        "size": "size_var",
        "model": "model_var",
        "cover_file_name": "cover_file_name_var",  # imagefolder would load it as an image
        "image": "image_var",
    }
    row = columns.row(jobs[0], ())
    assert (row["size"], row["size_var"], row["image_var"]) == ("", "big", "i")
