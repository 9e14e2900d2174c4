"""What a matrix row made each job of (its variables' values, the repeat number, the prompt
template), kept on the job for the dataset's columns, and never part of its id or hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runner.emulator import Emulator
from runner.jobs import content_hash
from runner.manifest import load_jobs, load_manifest
from tests.conftest import db_exec, db_rows, run_manifest, write_manifest

MANIFEST = [
    {
        "prompt": "A {style} photo of a {subject}",
        "vars": {"style": ["watercolor", 2.5], "subject": ["cat", 7]},
        "repeat": 2,
        "size": "1280x544",
    },
    {"id": "named", "prompt": "a {thing}", "vars": {"thing": ["mug", 3]}},
    {"prompt": "a lone tree", "repeat": 2},
    {"prompt": "a plain prompt"},
]
# The ids and hashes (their first 16 digits) these rows had before jobs kept their variables.
PINNED = [
    ("a-watercolor-photo-of-a-cat-8a269d192764", "8a269d192764f6a8"),
    ("a-watercolor-photo-of-a-cat-bf7e660096f9", "bf7e660096f999e1"),
    ("a-watercolor-photo-of-a-7-3276f7307806", "3276f73078060da1"),
    ("a-watercolor-photo-of-a-7-b7749ac6be4e", "b7749ac6be4e0abf"),
    ("a-2-5-photo-of-a-19b6fed78fd3", "19b6fed78fd3a69b"),
    ("a-2-5-photo-of-a-767407765a34", "767407765a34ed93"),
    ("a-2-5-photo-of-a-3659cc467a0b", "3659cc467a0b646d"),
    ("a-2-5-photo-of-a-2f9272b7c91f", "2f9272b7c91f60ed"),
    ("named-mug", "5cf871d736085a0b"),
    ("named-3", "73f1fb77818b0555"),
    ("a-lone-tree-9b10e53c2cfc", "9b10e53c2cfcfdc2"),
    ("a-lone-tree-c0db1ae4dc25", "c0db1ae4dc256bbf"),
    ("a-plain-prompt-3fed95a9f641", "3fed95a9f6415a87"),
]


def test_jobs_keep_their_variables_repeat_and_template(tmp_path: Path) -> None:
    jobs = list(load_manifest(write_manifest(tmp_path, MANIFEST)))
    assert [(j.id, j.content_hash[:16]) for j in jobs] == PINNED
    first, last_copy = jobs[0], jobs[7]
    assert first.vars == (("style", "watercolor"), ("subject", "cat"))
    assert (first.repeat_index, first.template) == (1, "A {style} photo of a {subject}")
    assert last_copy.vars == (("style", 2.5), ("subject", 7)) and last_copy.repeat_index == 2
    assert type(last_copy.vars[0][1]) is float and type(last_copy.vars[1][1]) is int
    assert (jobs[9].vars, jobs[9].repeat_index) == ((("thing", 3),), None)
    assert jobs[9].template == "a {thing}"
    assert (jobs[11].vars, jobs[11].repeat_index, jobs[11].template) == ((), 2, "")  # no template
    assert (jobs[12].vars, jobs[12].repeat_index, jobs[12].template) == ((), None, "")


def test_the_hash_is_that_of_the_prompt_and_repeat_alone(tmp_path: Path) -> None:
    for job in load_manifest(write_manifest(tmp_path, MANIFEST)):
        assert job.content_hash == content_hash(
            model=job.model,
            prompt=job.prompt,
            size=job.size,
            response_format=job.response_format,
            image_sha256s=[],
            repeat_index=job.repeat_index,
        )


def test_numpy_values_are_kept_as_plain_numbers(tmp_path: Path) -> None:
    """Records from a DataFrame may hold numpy floats and strings: subclasses of float and str
    that the spool cannot pack. They are kept as plain values, with the same ids."""
    plain = load_jobs([{"prompt": "{a} and {b}", "vars": {"a": [0.5], "b": ["x"]}}], base=tmp_path)
    numpy = load_jobs(
        [{"prompt": "{a} and {b}", "vars": {"a": [np.float64(0.5)], "b": [np.str_("x")]}}],
        base=tmp_path,
    )
    assert [j.id for j in numpy] == [j.id for j in plain]
    assert numpy[0].vars == (("a", 0.5), ("b", "x"))
    assert [type(v) for _, v in numpy[0].vars] == [float, str]


async def test_jobs_recorded_before_the_store_kept_variables_get_them_on_the_next_run(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest = write_manifest(tmp_path, MANIFEST[1:3])
    out = tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    # As a checkpoint upgraded by migration 4 has them: finished, without their variables.
    db_exec(out, "UPDATE jobs SET vars = NULL, repeat_index = NULL, template = NULL")
    sent = len(emulator.requests)
    await run_manifest(manifest, out, emulator.base_url)
    assert len(emulator.requests) == sent  # only labelled, nothing made again
    assert db_rows(
        out, "SELECT job_id, vars, repeat_index, template, status FROM jobs ORDER BY job_id"
    ) == [
        ("a-lone-tree-9b10e53c2cfc", "{}", 1, None, "succeeded"),
        ("a-lone-tree-c0db1ae4dc25", "{}", 2, None, "succeeded"),
        ("named-3", '{"thing": 3}', None, "a {thing}", "succeeded"),
        ("named-mug", '{"thing": "mug"}', None, "a {thing}", "succeeded"),
    ]
