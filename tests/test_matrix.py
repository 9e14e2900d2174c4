"""Prompt matrices and repeats: expansion, readable and stable ids, refusals, and the count and
cost that ``validate`` and ``--dry-run`` show before anything is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.errors import ManifestError
from runner.manifest.load import load_manifest
from tests.conftest import write_manifest
from tests.test_cli import run_cli


def matrix_job(**extra: Any) -> dict[str, Any]:
    return {
        "id": "portrait",
        "prompt": "A {style} photo of a {subject}",
        "vars": {"style": ["watercolor", "studio"], "subject": ["cat", "Red Fox", "owl"]},
        "size": "1280x1280",
        **extra,
    }


def test_cross_product_expands_in_order_with_readable_ids(tmp_path: Path) -> None:
    jobs = load_manifest(write_manifest(tmp_path, [matrix_job()]))
    assert [j.id for j in jobs] == [
        "portrait-watercolor-cat",
        "portrait-watercolor-red-fox",
        "portrait-watercolor-owl",
        "portrait-studio-cat",
        "portrait-studio-red-fox",
        "portrait-studio-owl",
    ]
    assert jobs[1].prompt == "A watercolor photo of a Red Fox"
    assert jobs[1].variant == "style=watercolor subject=Red Fox"
    assert {j.size for j in jobs} == {"1280x1280"}
    assert len({j.content_hash for j in jobs}) == 6


def test_repeat_makes_separate_jobs(tmp_path: Path) -> None:
    jobs = load_manifest(
        write_manifest(
            tmp_path,
            [
                {"id": "mug", "prompt": "a mug", "repeat": 3},
                {"prompt": "a cup", "repeat": 2},
                matrix_job(id="m", vars={"style": ["ink"], "subject": ["cat"]}, repeat=2),
            ],
        )
    )
    ids = [j.id for j in jobs]
    assert ids[:3] == ["mug-1", "mug-2", "mug-3"]
    assert ids[3] != ids[4] and ids[3].startswith("a-cup-") and ids[4].startswith("a-cup-")
    assert ids[5:] == ["m-ink-cat-1", "m-ink-cat-2"]
    assert len({j.content_hash for j in jobs}) == len(jobs)


def test_ids_are_stable_when_lists_grow_or_repeat_rises(tmp_path: Path) -> None:
    before = load_manifest(write_manifest(tmp_path, [matrix_job(), {"prompt": "x", "repeat": 2}]))
    grown = matrix_job(
        vars={"style": ["watercolor", "studio", "ink"], "subject": ["cat", "Red Fox", "owl"]}
    )
    after = load_manifest(write_manifest(tmp_path, [grown, {"prompt": "x", "repeat": 5}]))
    old = {j.id: j.content_hash for j in before}
    new = {j.id: j.content_hash for j in after}
    assert len(after) == 9 + 5
    assert all(new[job_id] == digest for job_id, digest in old.items())


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"vars": {"style": ["a"], "subject": ["b"], "mood": ["c"]}}, "vars.mood", "not used"),
        ({"vars": {"style": ["a"]}}, "prompt", "{subject}"),
        ({"vars": {"style": [], "subject": ["b"]}}, "vars.style", "non-empty list"),
        ({"vars": {"style": "a", "subject": ["b"]}}, "vars.style", "non-empty list"),
        ({"vars": {"style": [True], "subject": ["b"]}}, "vars.style", "text or numbers"),
        ({"vars": ["style"]}, "vars", "mapping"),
        ({"prompt": "A {style!r} of {subject}"}, "prompt", "plain name"),
        ({"prompt": "A {style of {subject}"}, "prompt", "not a valid template"),
        ({"repeat": 0}, "repeat", "whole number"),
        ({"repeat": "3"}, "repeat", "whole number"),
        ({"vars": {"style": list(range(400)), "subject": list(range(300))}}, "vars", "limit"),
        ({"id": "x" * 120}, "id", "over 128 characters"),
    ],
)
def test_bad_matrices_are_refused_with_row_and_field(
    tmp_path: Path, fields: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(tmp_path, [{"prompt": "ok"}, matrix_job(**fields)]))
    hits = [i for i in info.value.issues if i.field == field and message in i.message]
    assert hits, info.value.issues
    assert all(i.row.startswith("job 2") for i in info.value.issues)


def test_colliding_expansions_name_their_variants(tmp_path: Path) -> None:
    job = matrix_job(vars={"style": ["Ink", "ink"], "subject": ["cat"]})
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(tmp_path, [job]))
    (issue,) = info.value.issues
    assert issue.field == "id" and "[style=ink subject=cat]" in issue.row
    assert "style=Ink subject=cat" in issue.message


def test_validate_and_dry_run_show_the_expanded_count_and_cost(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [matrix_job(repeat=2), {"prompt": "one more"}])
    checked = run_cli("validate", manifest)
    assert checked.returncode == 0, checked.stderr
    assert "13 jobs" in checked.stdout and "$0.39" in checked.stdout

    planned = run_cli("run", manifest, "--emulate", "--dry-run", "--out", tmp_path / "o")
    assert planned.returncode == 0, planned.stderr
    assert "13 jobs" in planned.stdout and "$0.39" in planned.stdout
    assert "portrait-watercolor-cat-1.png" in planned.stdout
    assert "requests" not in planned.stdout
