"""runner.manifest: YAML and CSV manifests in, validated jobs out, every problem reported at once.

All fixture files (manifests, reference images, broken images) are made in ``tmp_path``; the two
example manifests in ``jobs/`` are only read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from runner.errors import ManifestError, ManifestIssue
from runner.jobs import JOB_ID_RE, Job, content_hash, derive_job_id
from runner.manifest import YAML_MAX_BYTES, load_manifest
from runner.manifest import read as read_module
from runner.manifest import references as references_module
from runner.manifest import spool as spool_module
from runner.provider import REFERENCE_MAX_BYTES

REPO = Path(__file__).resolve().parents[1]
JOBS_DIR = REPO / "jobs"
# The 4-job CSV example (was jobs/demo.csv; renamed jobs/catalog.csv).
CSV_EXAMPLE = next(
    (p for p in (JOBS_DIR / "catalog.csv", JOBS_DIR / "demo.csv") if p.exists()),
    JOBS_DIR / "catalog.csv",
)
ROW1 = "job 1 (line 2)"  # the first job of a manifest written by one_job()/write_yaml_doc()
HASH12 = re.compile(r"[0-9a-f]{12}")


# --- helpers --------------------------------------------------------------------------------


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 12), color: Any = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def make_image(
    path: Path, fmt: str = "PNG", size: tuple[int, int] = (16, 12), color: Any = "red"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt, size, color))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def write_yaml_doc(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False),
        encoding="utf-8",
    )
    return path


def one_job(tmp_path: Path, fields: dict[Any, Any], name: str = "one.yaml") -> Path:
    """A manifest with a single job; its row label is ROW1."""
    return write_yaml_doc(tmp_path / name, {"jobs": [fields]})


def issues_of(path: Path) -> list[ManifestIssue]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.issues, "a ManifestError must carry at least one issue"
    return info.value.issues


def where(issues: list[ManifestIssue]) -> set[tuple[str, str]]:
    return {(i.row, i.field) for i in issues}


def ids_by_prompt(jobs: list[Job]) -> dict[str, str]:
    return {job.prompt: job.id for job in jobs}


# --- the example manifests ------------------------------------------------------------------


def test_demo_yaml_loads_with_defaults_applied() -> None:
    jobs = load_manifest(JOBS_DIR / "demo.yaml")

    assert len(jobs) == 8
    assert [j.id for j in jobs[:5]] == [
        "mug-white",
        "mug-square",
        "mug-portrait",
        "lighthouse-wide",
        "cat-logo",
    ]
    assert [j.id for j in jobs[6:]] == ["mug-on-beach", "mug-retouch"]
    assert [j.endpoint for j in jobs] == ["generations"] * 6 + ["edits"] * 2
    assert [j.size for j in jobs] == [
        "2048x1360",
        "2048x2048",  # from defaults
        "1152x2048",
        "2048x864",
        "1280x1280",
        "1536x2048",
        "2048x1152",
        "auto",
    ]
    assert [j.response_format for j in jobs] == ["b64_json"] * 3 + ["url"] + ["b64_json"] * 4
    assert {j.model for j in jobs} == {"gpt-image-2-vip"}
    assert [j.row.split(" (")[0] for j in jobs] == [f"job {i}" for i in range(1, 9)]
    assert all(re.fullmatch(r"job \d+ \(line \d+\)", j.row) for j in jobs)

    refs = (JOBS_DIR / "refs").resolve()
    assert jobs[6].images == (refs / "mug.png", refs / "beach.jpg", refs / "style.webp")
    assert jobs[7].images == (refs / "mug.png",)
    assert all(not j.images for j in jobs[:6])
    assert all(p.is_absolute() for j in jobs for p in j.images)

    derived = jobs[5]
    assert derived.prompt.startswith("Ink wash landscape painting")
    assert derived.id == derive_job_id(derived.prompt, derived.content_hash)
    assert derived.id.startswith("ink-wash-landscape-painting-traditional-chinese-")
    assert derived.id.endswith(derived.content_hash[:12])
    assert len({j.content_hash for j in jobs}) == 8


def test_example_csv_loads_with_defaults_applied() -> None:
    jobs = load_manifest(CSV_EXAMPLE)

    assert len(jobs) == 4
    assert [j.id for j in jobs[:3]] == ["desk-3x2", "desk-16x9", "beach-edit"]
    assert [j.endpoint for j in jobs] == ["generations", "generations", "edits", "generations"]
    assert [j.size for j in jobs] == ["2048x1360", "1280x720", "2048x1536", "960x1280"]
    assert [j.response_format for j in jobs] == ["b64_json", "url", "b64_json", "b64_json"]
    assert {j.model for j in jobs} == {"gpt-image-2-vip"}
    assert [j.row for j in jobs] == [f"row {n} (line {n + 1})" for n in range(1, 5)]
    refs = (JOBS_DIR / "refs").resolve()
    assert jobs[2].images == (refs / "mug.png", refs / "beach.jpg")
    # quoted commas and doubled quotes survive; the blank id cell means "derive one"
    assert jobs[3].prompt == 'A ceramic mug, pencil sketch, "hand-drawn" look'
    assert jobs[3].id.startswith("a-ceramic-mug-pencil-sketch-hand-")
    assert jobs[3].id == derive_job_id(jobs[3].prompt, jobs[3].content_hash)


def test_same_content_hashes_the_same_in_yaml_and_csv() -> None:
    yaml_jobs = {j.prompt: j for j in load_manifest(JOBS_DIR / "demo.yaml")}
    csv_jobs = {j.prompt: j for j in load_manifest(CSV_EXAMPLE)}
    prompt = "Product shot of a white ceramic mug on a gray desk, soft natural light"
    assert yaml_jobs[prompt].content_hash == csv_jobs[prompt].content_hash
    assert yaml_jobs[prompt].id != csv_jobs[prompt].id  # explicit ids differ, content does not


# --- defaults -------------------------------------------------------------------------------


def test_yaml_defaults_are_merged_under_job_fields(tmp_path: Path) -> None:
    make_image(tmp_path / "refs" / "a.png")
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "defaults": {"size": "2048x1152", "response_format": "url"},
            "jobs": [
                {"id": "plain", "prompt": "a fox"},
                {"id": "own-size", "prompt": "a fox", "size": "1280x720"},
                {"id": "own-format", "prompt": "a fox", "response_format": "b64_json"},
            ],
        },
    )
    jobs = {j.id: j for j in load_manifest(path)}
    assert (jobs["plain"].size, jobs["plain"].response_format) == ("2048x1152", "url")
    assert (jobs["own-size"].size, jobs["own-size"].response_format) == ("1280x720", "url")
    assert (jobs["own-format"].size, jobs["own-format"].response_format) == (
        "2048x1152",
        "b64_json",
    )


def test_defaults_can_carry_the_model_and_the_prompt(tmp_path: Path) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "defaults": {"model": "gpt-image-2-all", "prompt": "a default prompt"},
            "jobs": [{"id": "a"}, {"id": "b", "prompt": "own prompt"}],
        },
    )
    a, b = load_manifest(path)
    assert (a.model, a.prompt, a.size) == ("gpt-image-2-all", "a default prompt", None)
    assert (b.model, b.prompt) == ("gpt-image-2-all", "own prompt")


def test_built_in_defaults(tmp_path: Path) -> None:
    make_image(tmp_path / "ref.png")
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "jobs": [
                {"prompt": "a generation"},
                {"prompt": "an edit", "images": ["ref.png"]},
                {"prompt": "an edit on all", "images": ["ref.png"], "model": "gpt-image-2-all"},
                {"prompt": "an explicit auto edit", "images": ["ref.png"], "size": "auto"},
            ]
        },
    )
    gen, edit, edit_all, edit_auto = load_manifest(path)
    assert gen.model == "gpt-image-2-vip"
    assert gen.response_format == "b64_json"
    assert gen.size is None  # the provider's default tier
    assert gen.endpoint == "generations"
    assert edit.model == "gpt-image-2-vip"
    assert edit.response_format == "b64_json"
    assert edit.size == "auto"  # an edit with no size follows its reference
    assert edit.endpoint == "edits"
    assert edit.images == ((tmp_path / "ref.png").resolve(),)
    assert edit_all.size is None  # gpt-image-2-all takes no size, not even auto
    assert edit_auto.size == "auto"


def test_edit_without_size_hashes_like_an_explicit_auto(tmp_path: Path) -> None:
    make_image(tmp_path / "ref.png")
    implicit = one_job(tmp_path, {"prompt": "retouch", "images": ["ref.png"]}, "a.yaml")
    explicit = one_job(
        tmp_path, {"prompt": "retouch", "images": ["ref.png"], "size": "auto"}, "b.yaml"
    )
    assert load_manifest(implicit)[0].id == load_manifest(explicit)[0].id


# --- derived ids ----------------------------------------------------------------------------


def test_derived_ids_are_stable_across_reordering_and_adding_jobs(tmp_path: Path) -> None:
    make_image(tmp_path / "ref.png")
    base = [
        {"prompt": "a red fox"},
        {"prompt": "a blue whale", "size": "2048x1152"},
        {"prompt": "edit this", "images": ["ref.png"]},
    ]
    first = ids_by_prompt(load_manifest(write_yaml_doc(tmp_path / "a.yaml", {"jobs": base})))
    reordered = ids_by_prompt(
        load_manifest(write_yaml_doc(tmp_path / "b.yaml", {"jobs": base[::-1]}))
    )
    extended = ids_by_prompt(
        load_manifest(
            write_yaml_doc(
                tmp_path / "c.yaml",
                {"jobs": [{"prompt": "a new first job"}, *base, {"prompt": "a new last job"}]},
            )
        )
    )
    assert len(set(first.values())) == 3
    assert reordered == first
    assert {p: extended[p] for p in first} == first
    assert len(set(extended.values())) == 5


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a red fox in the snow!"},
        {"size": "2048x2048"},
        {"model": "gpt-image-2-all", "size": None},
        {"response_format": "url"},
    ],
    ids=["prompt", "size", "model", "response_format"],
)
def test_derived_id_changes_with_what_shapes_the_image(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    base = {"prompt": "a red fox in the snow", "size": "1280x720"}
    changed = {k: v for k, v in {**base, **change}.items() if v is not None}
    before = load_manifest(one_job(tmp_path, base, "a.yaml"))[0]
    after = load_manifest(one_job(tmp_path, changed, "b.yaml"))[0]
    assert before.content_hash != after.content_hash
    assert before.id != after.id
    assert before.id.startswith("a-red-fox-in-the-snow-")
    assert after.id.startswith("a-red-fox-in-the-snow-")


def test_derived_id_follows_reference_bytes_not_paths(tmp_path: Path) -> None:
    ref = make_image(tmp_path / "ref.png", color="red")
    path = one_job(tmp_path, {"prompt": "recolor image1", "images": ["ref.png"]})
    red = load_manifest(path)[0]
    assert load_manifest(path)[0].id == red.id  # deterministic

    make_image(ref, color="blue")  # same path, new bytes
    blue = load_manifest(path)[0]
    assert blue.id != red.id
    assert blue.content_hash != red.content_hash

    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "other-name.png").write_bytes(image_bytes(color="red"))
    moved = load_manifest(
        one_job(
            tmp_path, {"prompt": "recolor image1", "images": ["moved/other-name.png"]}, "c.yaml"
        )
    )[0]
    assert moved.id == red.id  # same bytes under another name: same image, same id


def test_reference_order_is_part_of_the_id(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", color="red")
    make_image(tmp_path / "b.png", color="green")
    ab = load_manifest(one_job(tmp_path, {"prompt": "mix", "images": ["a.png", "b.png"]}, "1.yaml"))
    ba = load_manifest(one_job(tmp_path, {"prompt": "mix", "images": ["b.png", "a.png"]}, "2.yaml"))
    assert ab[0].images == ((tmp_path / "a.png").resolve(), (tmp_path / "b.png").resolve())
    assert ba[0].images == ((tmp_path / "b.png").resolve(), (tmp_path / "a.png").resolve())
    assert ab[0].id != ba[0].id


def test_derived_id_has_a_readable_slug_prefix(tmp_path: Path) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "jobs": [
                {"prompt": "A Red Fox, in the Snow! At dawn; photo #1 extra words"},
                {"prompt": "水墨山水画"},
                {"prompt": "Ünïcode café 42"},
            ]
        },
    )
    fox, ink, cafe = load_manifest(path)
    assert re.fullmatch(r"a-red-fox-in-the-snow-[0-9a-f]{12}", fox.id)
    assert re.fullmatch(r"job-[0-9a-f]{12}", ink.id)  # nothing ASCII to make a slug of
    assert cafe.id.startswith("n-code-caf-42-")
    for job in (fox, ink, cafe):
        assert JOB_ID_RE.fullmatch(job.id)
        assert job.id.endswith(job.content_hash[:12])
        assert len(job.id) <= 128


def test_explicit_id_is_kept_verbatim(tmp_path: Path) -> None:
    job = load_manifest(one_job(tmp_path, {"id": "Mug_01.v2-final", "prompt": "a mug"}))[0]
    assert job.id == "Mug_01.v2-final"
    assert job.content_hash and HASH12.match(job.content_hash)


# --- one-field rejections -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"prompt": "a cat", "colour": "red"}, "colour", "unknown key"),
        ({"prompt": "a cat", "n": 1}, "n", "rejected by the API"),
        ({"prompt": "a cat", "quality": "hd"}, "quality", "rejected by the API"),
        ({"prompt": "a cat", "aspect_ratio": "1:1"}, "aspect_ratio", "rejected by the API"),
        ({"size": "2048x2048"}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "required"),
        ({"prompt": "   \t "}, "prompt", "required"),
        ({"prompt": 42}, "prompt", "required"),
        ({"prompt": None}, "prompt", "required"),
        ({"prompt": "a cat", "size": "2048X2048"}, "size", "use a lowercase ASCII x"),
        ({"prompt": "a cat", "size": "2048\u00d72048"}, "size", "use a lowercase ASCII x"),
        ({"prompt": "a cat", "size": "1000x1000"}, "size", "not one of the 30 sizes"),
        ({"prompt": "a cat", "size": "auto"}, "size", "only for edits"),
        ({"prompt": "a cat", "size": 2048}, "size", "must be text"),
        ({"prompt": "a cat", "model": "dall-e-3"}, "model", "not a known model"),
        (
            {"prompt": "a cat", "model": "gpt-image-2-all", "size": "2048x2048"},
            "size",
            "takes no size",
        ),
        ({"prompt": "a cat", "response_format": "png"}, "response_format", "url or b64_json"),
        ({"prompt": "a cat", "images": "ref.png"}, "images", "list of file paths"),
        ({"prompt": "a cat", "images": {"a": "ref.png"}}, "images", "list of file paths"),
        ({"prompt": "a cat", "images": [3]}, "images", "list of file paths"),
        ({"prompt": "a cat", "images": [""]}, "images", "list of file paths"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else None,
)
def test_one_bad_field_is_reported_with_row_and_field(
    tmp_path: Path, fields: dict[str, Any], field: str, fragment: str
) -> None:
    issues = issues_of(one_job(tmp_path, fields))
    assert len(issues) == 1, issues
    (issue,) = issues
    assert (issue.row, issue.field) == (ROW1, field)
    assert fragment in issue.message


def test_size_hint_only_when_it_is_the_case_or_the_cross(tmp_path: Path) -> None:
    (issue,) = issues_of(one_job(tmp_path, {"prompt": "a", "size": "1000x1000"}))
    assert "lowercase" not in issue.message
    assert "'1000x1000'" in issue.message


@pytest.mark.parametrize(
    ("size", "meant"),
    [
        ("2048x2084", "2048x2048"),  # digits transposed
        ("2048X2048", "2048x2048"),
        ("2048*2048", "2048x2048"),
        ("2048 x 2048", "2048x2048"),
        ("2048\u00d72048", "2048x2048"),
        ("2048x204", "2048x2048"),  # a digit left out
        ("2408x2048", "2048x2048"),
        ("864x2048", "2048x864"),  # width and height swapped
        ("1280x1000", "1280x1280 or 1280x1024"),  # equally near
    ],
)
def test_a_near_miss_of_a_size_says_what_was_meant(tmp_path: Path, size: str, meant: str) -> None:
    (issue,) = issues_of(one_job(tmp_path, {"prompt": "a", "size": size}))
    first_line = issue.message.splitlines()[0]
    assert first_line.startswith(f"{size!r} is not one of the 30 sizes")
    assert first_line.endswith(f"; did you mean {meant}?")


@pytest.mark.parametrize("size", ["1000x1000", "1024x1024", "big", "4096x4096"])
def test_a_size_far_from_all_30_gets_no_guess(tmp_path: Path, size: str) -> None:
    (issue,) = issues_of(one_job(tmp_path, {"prompt": "a", "size": size}))
    assert "did you mean" not in issue.message


def test_the_30_sizes_are_listed_by_tier_in_the_first_size_message_only(tmp_path: Path) -> None:
    from runner.provider import SIZES

    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {"defaults": {"size": "2048x2084"}, "jobs": [{"prompt": "a"}, {"prompt": "b"}]},
    )
    first, second = issues_of(path)
    lines = first.message.splitlines()
    assert lines[0] == "'2048x2084' is not one of the 30 sizes; did you mean 2048x2048?"
    assert [line.split(": ")[0] for line in lines[1:]] == ["    1K", "    2K", "    4K"]
    listed = [size for line in lines[1:] for size in line.split(": ")[1].split()]
    assert listed == list(SIZES)
    assert second.message == (
        "'2048x2084' is not one of the 30 sizes (listed above); did you mean 2048x2048?"
    )


def test_a_wrong_size_is_worked_out_once_however_many_rows_repeat_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guess behind a size message is an edit distance to each of the 30 sizes: a column
    of one typo (200k rows took 125 s) guesses once per distinct value, not once a row."""
    from runner.manifest import validate

    guessed: list[str] = []
    nearest_sizes = validate.nearest_sizes

    def counting(size: str) -> list[str]:
        guessed.append(size)
        return nearest_sizes(size)

    monkeypatch.setattr(validate, "nearest_sizes", counting)
    rows = "".join(f"p{n},{'2048x2084' if n % 3 else '2048X2048'}\n" for n in range(300))
    issues = issues_of(write_text(tmp_path / "m.csv", "prompt,size\n" + rows))
    assert sorted(guessed) == ["2048X2048", "2048x2084"]
    assert len(issues) == 300
    assert issues[0].message.startswith("'2048X2048' is not one of the 30 sizes (use a")
    assert "\n    1K: " in issues[0].message
    assert issues[1].message == (
        "'2048x2084' is not one of the 30 sizes (listed above); did you mean 2048x2048?"
    )
    assert issues[3].message == (
        "'2048X2048' is not one of the 30 sizes (listed above; use a lowercase ASCII x); "
        "did you mean 2048x2048?"
    )


def test_the_readme_lists_the_30_sizes_by_ratio_and_tier() -> None:
    from runner.provider import SIZES

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \d+:\d+ \| `(\w+)` \| `(\w+)` \| `(\w+)` \|$", readme, re.MULTILINE)
    assert len(rows) == 10
    assert [size for tier in zip(*rows, strict=True) for size in tier] == list(SIZES)


def test_every_one_of_the_30_sizes_is_accepted(tmp_path: Path) -> None:
    from runner.provider import SIZES

    path = write_yaml_doc(
        tmp_path / "m.yaml", {"jobs": [{"prompt": "a cat", "size": s} for s in SIZES]}
    )
    jobs = load_manifest(path)
    assert [j.size for j in jobs] == list(SIZES)
    assert len({j.id for j in jobs}) == 30


@pytest.mark.parametrize("key", ["n", "quality", "aspect_ratio"])
def test_rejected_fields_in_defaults(tmp_path: Path, key: str) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml", {"defaults": {key: 1}, "jobs": [{"prompt": "a"}, {"prompt": "b"}]}
    )
    issues = issues_of(path)
    # Reported once, against the defaults, not once per job that inherits it.
    assert where(issues) == {("defaults", key)}
    assert "rejected by the API" in issues[0].message


def test_bad_keys_in_defaults(tmp_path: Path) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {"defaults": {"id": "shared", "colour": "red"}, "jobs": [{"prompt": "a"}]},
    )
    issues = issues_of(path)
    assert where(issues) == {("defaults", "id"), ("defaults", "colour")}
    assert "unknown key" in next(i.message for i in issues if i.field == "colour")


def test_defaults_must_be_a_mapping(tmp_path: Path) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml", {"defaults": ["size", "2048x2048"], "jobs": [{"prompt": "a"}]}
    )
    assert where(issues_of(path)) == {("defaults", "")}


def test_bad_value_in_defaults_is_reported_for_each_job(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "m.yaml",
        """\
        defaults:
          size: 2048X2048
        jobs:
          - prompt: a
          - prompt: b
        """,
    )
    assert where(issues_of(path)) == {("job 1 (line 4)", "size"), ("job 2 (line 5)", "size")}


def test_one_row_reports_every_bad_field(tmp_path: Path) -> None:
    issues = issues_of(
        one_job(
            tmp_path,
            {
                "id": "../x",
                "prompt": " ",
                "size": "big",
                "model": "m",
                "response_format": "jpg",
                "images": ["missing.png"],
                "quality": "hd",
            },
        )
    )
    assert where(issues) == {
        (ROW1, f) for f in ("id", "prompt", "size", "model", "response_format", "images", "quality")
    }


# --- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["a/b", "..", ".hidden", "", "x" * 129, "a b", "a\x00b", "/etc/passwd", "a\\b", "ab\n", 5],
    ids=[
        "slash",
        "dotdot",
        "leading-dot",
        "empty",
        "129",
        "space",
        "nul",
        "abs",
        "bslash",
        "nl",
        "int",
    ],
)
def test_bad_ids_are_refused(tmp_path: Path, bad_id: Any) -> None:
    issues = issues_of(one_job(tmp_path, {"id": bad_id, "prompt": "a cat"}))
    assert where(issues) == {(ROW1, "id")}
    assert "must be 1-128" in issues[0].message


@pytest.mark.parametrize("good_id", ["x" * 128, "a", "Mug_01.v2-final", "0", "_x", "a..b"])
def test_good_ids_are_accepted(tmp_path: Path, good_id: str) -> None:
    assert load_manifest(one_job(tmp_path, {"id": good_id, "prompt": "a cat"}))[0].id == good_id


def test_duplicate_ids_including_case_only_duplicates(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "m.yaml",
        """\
        jobs:
          - {id: mug, prompt: one}
          - {id: Mug, prompt: two}
          - {id: mug, prompt: three}
          - {id: other, prompt: four}
        """,
    )
    issues = issues_of(path)
    assert where(issues) == {("job 2 (line 3)", "id"), ("job 3 (line 4)", "id")}
    by_row = {i.row: i.message for i in issues}
    assert "already used by job 1 (line 2)" in by_row["job 2 (line 3)"]
    assert "differ only in case" in by_row["job 2 (line 3)"]
    assert "already used by job 1 (line 2)" in by_row["job 3 (line 4)"]
    assert "differ only in case" not in by_row["job 3 (line 4)"]
    assert "explicit id" not in by_row["job 3 (line 4)"]  # it has one already


def test_identical_jobs_without_ids_collide_and_say_what_to_do(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "m.yaml",
        """\
        jobs:
          - prompt: a fox
            size: 2048x2048
          - prompt: a fox
            size: 2048x2048
          - prompt: a fox
            size: 1280x720
        """,
    )
    issues = issues_of(path)
    assert where(issues) == {("job 2 (line 4)", "id")}
    assert "already used by job 1 (line 2)" in issues[0].message
    assert "give one an explicit id" in issues[0].message


def test_duplicate_explicit_id_on_a_row_with_other_problems_is_still_reported(
    tmp_path: Path,
) -> None:
    path = write_text(
        tmp_path / "m.yaml",
        """\
        jobs:
          - {id: mug, prompt: one}
          - {id: mug, prompt: two, size: 2048X2048}
        """,
    )
    issues = issues_of(path)
    assert where(issues) == {("job 2 (line 3)", "size"), ("job 2 (line 3)", "id")}


def test_identical_jobs_with_distinct_explicit_ids_are_fine(tmp_path: Path) -> None:
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {"jobs": [{"id": "take-1", "prompt": "a fox"}, {"id": "take-2", "prompt": "a fox"}]},
    )
    a, b = load_manifest(path)
    assert (a.id, b.id) == ("take-1", "take-2")
    assert a.content_hash == b.content_hash


def test_duplicate_ids_in_csv(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", "id,prompt\nMUG,one\nmug,two\n")
    issues = issues_of(path)
    assert where(issues) == {("row 2 (line 3)", "id")}
    assert "already used by row 1 (line 2)" in issues[0].message


# --- reference images -----------------------------------------------------------------------


def test_png_jpeg_and_webp_references_are_accepted_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    make_image(folder / "refs" / "a.png", "PNG")
    make_image(folder / "refs" / "b.jpg", "JPEG")
    make_image(folder / "refs" / "c.webp", "WEBP")
    make_image(tmp_path / "shared" / "d.png", "PNG", color="blue")
    path = one_job(
        folder,
        {
            "prompt": "fuse",
            "images": ["refs/c.webp", "refs/a.png", "refs/b.jpg", "../shared/d.png"],
        },
    )
    (job,) = load_manifest(path)
    assert job.images == (
        (folder / "refs" / "c.webp").resolve(),
        (folder / "refs" / "a.png").resolve(),
        (folder / "refs" / "b.jpg").resolve(),
        (tmp_path / "shared" / "d.png").resolve(),
    )
    assert job.endpoint == "edits"
    assert job.size == "auto"


def test_reference_paths_are_relative_to_the_manifest_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "m" / "ref.png")
    make_image(tmp_path / "elsewhere" / "ref.png", color="blue")  # a decoy in the cwd
    path = one_job(tmp_path / "m", {"prompt": "edit", "images": ["ref.png"]})
    monkeypatch.chdir(tmp_path / "elsewhere")
    (job,) = load_manifest(Path(os.path.relpath(path)))
    assert job.images == ((tmp_path / "m" / "ref.png").resolve(),)


def _truncated_png(path: Path) -> None:
    data = image_bytes("PNG", (64, 64), "red")
    path.write_bytes(data[: len(data) // 2])


def _text_as_png(path: Path) -> None:
    path.write_text("this is not an image, whatever the name says\n")


def _gif(path: Path) -> None:
    Image.new("P", (8, 8)).save(path, format="GIF")


def _directory(path: Path) -> None:
    path.mkdir()


def _missing(path: Path) -> None:
    pass


def _over_10_mb(path: Path) -> None:
    head = image_bytes("PNG", (4, 4))
    path.write_bytes(head + os.urandom(REFERENCE_MAX_BYTES + 1 - len(head) + 512 * 1024))


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (_missing, "does not exist"),
        (_directory, "is not a file"),
        (_text_as_png, "not a png, jpeg or webp image"),
        (_gif, "not a png, jpeg or webp image"),
        (_truncated_png, "does not decode"),
        (_over_10_mb, "over the 10 MB limit"),
    ],
    ids=["missing", "directory", "text", "gif", "truncated", "over-10mb"],
)
def test_bad_reference_is_refused(tmp_path: Path, build: Any, fragment: str) -> None:
    build(tmp_path / "ref.png")
    issues = issues_of(one_job(tmp_path, {"prompt": "edit", "images": ["ref.png"]}))
    assert where(issues) == {(ROW1, "images")}
    assert fragment in issues[0].message
    assert "ref.png" in issues[0].message  # names the file


def test_oversized_reference_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _over_10_mb(tmp_path / "big.png")
    decoded: list[int] = []
    real = references_module.inspect_image

    def spy(data: bytes, *args: Any, **kwargs: Any) -> Any:
        decoded.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(references_module, "inspect_image", spy)
    issues = issues_of(one_job(tmp_path, {"prompt": "edit", "images": ["big.png"]}))
    assert "over the 10 MB limit" in issues[0].message
    assert decoded == []


def test_reference_of_exactly_the_limit_is_not_refused_for_size(tmp_path: Path) -> None:
    data = image_bytes("PNG", (8, 8))
    # A valid PNG padded with trailing bytes up to exactly 10 MiB: Pillow ignores data after IEND.
    (tmp_path / "edge.png").write_bytes(data + b"\0" * (REFERENCE_MAX_BYTES - len(data)))
    (job,) = load_manifest(one_job(tmp_path, {"prompt": "edit", "images": ["edge.png"]}))
    assert job.images == ((tmp_path / "edge.png").resolve(),)


@pytest.mark.parametrize("side", [100, 40], ids=["bomb-error-range", "bomb-warning-range"])
def test_decompression_bomb_reference_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    make_image(tmp_path / "bomb.png", size=(side, side))
    make_image(tmp_path / "small.png", size=(20, 20))  # 400 px: under the lowered limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "jobs": [
                {"id": "small", "prompt": "fine", "images": ["small.png"]},
                {"id": "bomb", "prompt": "boom", "images": ["bomb.png"]},
            ]
        },
    )
    issues = issues_of(path)
    assert where(issues) == {("job 2 (line 6)", "images")}
    assert "decompression bomb" in issues[0].message


def test_unreadable_reference_is_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    locked = make_image(tmp_path / "locked.png", color="blue")
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "jobs": [
                {"id": "ok", "prompt": "fine", "images": ["ok.png"]},
                {"id": "locked", "prompt": "locked", "images": ["locked.png"]},
            ]
        },
    )
    locked.chmod(0)
    try:
        if os.geteuid() == 0:
            # root reads anything: the file is a good image, so both jobs load
            assert [j.id for j in load_manifest(path)] == ["ok", "locked"]
        else:
            issues = issues_of(path)
            assert where(issues) == {("job 2 (line 6)", "images")}
            assert "cannot be read" in issues[0].message
    finally:
        locked.chmod(0o644)


def test_read_error_on_a_reference_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chmod test above cannot fail a read as root; simulate the EACCES instead.
    locked = make_image(tmp_path / "locked.png").resolve()
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    issues = issues_of(one_job(tmp_path, {"prompt": "edit", "images": ["locked.png"]}))
    assert where(issues) == {(ROW1, "images")}
    assert "cannot be read" in issues[0].message
    assert "Permission denied" in issues[0].message


def test_each_row_using_a_bad_reference_is_named(tmp_path: Path) -> None:
    make_image(tmp_path / "good.png")
    path = write_yaml_doc(
        tmp_path / "m.yaml",
        {
            "jobs": [
                {"prompt": "one", "images": ["gone.png"]},
                {"prompt": "two", "images": ["good.png", "gone.png"]},
                {"prompt": "three", "images": ["good.png"]},
            ]
        },
    )
    issues = issues_of(path)
    assert where(issues) == {("job 1 (line 2)", "images"), ("job 2 (line 5)", "images")}


def test_reference_symlink_loop_is_reported_not_crashed(tmp_path: Path) -> None:
    # Bug check: Path.resolve() raises RuntimeError on a symlink loop (Python 3.11), outside the
    # checker's try block, so load_manifest crashes instead of reporting the row.
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    issues = issues_of(one_job(tmp_path, {"prompt": "edit", "images": ["loop-a.png"]}))
    assert where(issues) == {(ROW1, "images")}


def test_reference_path_with_nul_is_reported_not_crashed(tmp_path: Path) -> None:
    # Bug check: a NUL in a path makes Path.resolve()/exists() raise ValueError, uncaught.
    issues = issues_of(one_job(tmp_path, {"prompt": "edit", "images": ["ref\x00.png"]}))
    assert where(issues) == {(ROW1, "images")}


# --- wrong types that must be reported, not crash -----------------------------------------


@pytest.mark.parametrize(
    "model", [["gpt-image-2-vip"], {"name": "gpt-image-2-vip"}], ids=["list", "mapping"]
)
@pytest.mark.parametrize("size", [None, "2048x2048"], ids=["no-size", "size"])
def test_unhashable_model_is_reported_not_crashed(tmp_path: Path, model: Any, size: Any) -> None:
    # Bug check: `model in MODELS_WITHOUT_SIZE` (a frozenset) raises TypeError for a list/dict.
    fields = {"prompt": "a cat", "model": model}
    if size:
        fields["size"] = size
    issues = issues_of(one_job(tmp_path, fields))
    assert (ROW1, "model") in where(issues)


@pytest.mark.parametrize(
    ("key_text", "key"), [("1", "1"), ("on", "True"), ("null", "None"), ("2048x2048", "2048x2048")]
)
def test_non_string_keys_in_a_job_are_refused(tmp_path: Path, key_text: str, key: str) -> None:
    # Bug check: `_validate` checks only keys found in `raw.explicit`, which holds str(key); a
    # YAML key that is not a string (1, on -> True, null -> None) is silently ignored.
    path = write_text(
        tmp_path / "m.yaml",
        f"""\
        jobs:
          - prompt: a cat
            {key_text}: x
        """,
    )
    issues = issues_of(path)
    assert [i.row for i in issues] == [ROW1]
    assert "unknown key" in issues[0].message


# --- every problem at once ------------------------------------------------------------------


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "m.yaml",
        """\
        version: 2
        jobs:
          - prompt: ok job
            size: 2048x2048
          - prompt: bad size
            size: 2048\u00d72048
          - size: 1280x1280
          - prompt: bad model
            model: dall-e-3
          - prompt: quality
            quality: hd
          - prompt: missing ref
            images: [refs/nope.png]
          - prompt: bad id
            id: ../escape
          - prompt: ok job
            size: 2048x2048
          - prompt: fine
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    error = info.value
    expected = {
        ("top level", "version"),
        ("job 2 (line 5)", "size"),
        ("job 3 (line 7)", "prompt"),
        ("job 4 (line 8)", "model"),
        ("job 5 (line 10)", "quality"),
        ("job 6 (line 12)", "images"),
        ("job 7 (line 14)", "id"),
        ("job 8 (line 16)", "id"),
    }
    assert where(error.issues) == expected
    assert len(error.issues) == len(expected)
    message = str(error)
    assert message.startswith(f"{path}: {len(expected)} problems, nothing was sent:")
    for issue in error.issues:
        assert f"  {issue}" in message
        assert issue.row in message
    assert "job 2 (line 5), field size: " in message
    assert error.source == str(path)


def test_all_problems_of_a_csv_are_reported_together(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "m.csv",
        """\
        id,prompt,size,model,images
        ok,fine,2048x2048,,
        a/b,bad id,,,
        c,,2048x2048,,
        d,bad size,2048X2048,,
        e,bad model,,dall-e,
        f,missing,,,nope.png
        """,
    )
    issues = issues_of(path)
    assert where(issues) == {
        ("row 2 (line 3)", "id"),
        ("row 3 (line 4)", "prompt"),
        ("row 4 (line 5)", "size"),
        ("row 5 (line 6)", "model"),
        ("row 6 (line 7)", "images"),
    }


def test_single_problem_message_uses_singular(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(one_job(tmp_path, {"prompt": "a", "n": 2}))
    assert ": 1 problem, nothing was sent:" in str(info.value)
    assert f"  {ROW1}, field n: is rejected by the API" in str(info.value)


# --- YAML structure and safety --------------------------------------------------------------


def test_python_tags_are_refused_without_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_text(
        tmp_path / "m.yaml",
        f"""\
        jobs:
          - prompt: !!python/object/apply:os.system ["touch {marker}"]
          - prompt: !!python/object/apply:os.system ["echo hi"]
        """,
    )
    issues = issues_of(path)
    assert not marker.exists()
    assert where(issues) == {("file", "")}
    assert "is not valid YAML" in issues[0].message


@pytest.mark.parametrize(
    ("text", "expected", "fragment"),
    [
        ("- prompt: a\n- prompt: b\n", ("file", ""), "must be a mapping"),
        ("just a string\n", ("file", ""), "must be a mapping"),
        ("", ("file", ""), "must be a mapping"),
        ("defaults:\n  size: 2048x2048\n", ("top level", "jobs"), "non-empty list"),
        ("jobs: []\n", ("top level", "jobs"), "non-empty list"),
        ("jobs:\n", ("top level", "jobs"), "non-empty list"),
        ("jobs:\n  prompt: a\n", ("top level", "jobs"), "non-empty list"),
        ("jobs: [\n  {prompt: a\n", ("file", ""), "is not valid YAML"),
        ("jobs:\n  - prompt: a\n - prompt: b\n", ("file", ""), "is not valid YAML"),
        ("jobs:\n  - prompt: *nowhere\n", ("file", ""), "is not valid YAML"),
    ],
    ids=[
        "list",
        "scalar",
        "empty",
        "jobs-missing",
        "jobs-empty",
        "jobs-null",
        "jobs-mapping",
        "unclosed",
        "bad-indent",
        "unknown-alias",
    ],
)
def test_bad_yaml_structure(
    tmp_path: Path, text: str, expected: tuple[str, str], fragment: str
) -> None:
    issues = issues_of(write_text(tmp_path / "m.yaml", text))
    assert expected in where(issues)
    assert fragment in next(i.message for i in issues if (i.row, i.field) == expected)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.yaml", "job:\n  - prompt: a\njobs:\n  - prompt: b\n")
    issues = issues_of(path)
    assert where(issues) == {("top level", "job")}
    assert "unknown key" in issues[0].message


def test_job_entry_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.yaml", "jobs:\n  - prompt: a\n  - just a prompt\n  - 7\n")
    issues = issues_of(path)
    assert where(issues) == {("job 2", ""), ("job 3", "")}
    assert all("must be a mapping" in i.message for i in issues)


def test_yaml_over_64_mib_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.write(b"jobs:\n  - prompt: a\n")
        f.truncate(YAML_MAX_BYTES + 1)  # sparse: nothing is actually written
    issues = issues_of(path)
    assert where(issues) == {("file", "")}
    assert "over the 64 MiB limit for YAML" in issues[0].message


def test_csv_has_no_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV is read row by row, so its size is not limited; YAML is parsed whole, so it is."""
    monkeypatch.setattr(read_module, "YAML_MAX_BYTES", 100)
    rows = "".join(f"img-{i},a prompt number {i}\n" for i in range(20))
    csv_path = write_text(tmp_path / "m.csv", "id,prompt\n" + rows)
    assert csv_path.stat().st_size > 100
    assert len(load_manifest(csv_path)) == 20
    yaml_doc = {"jobs": [{"id": f"img-{i}", "prompt": f"a prompt {i}"} for i in range(20)]}
    (issue,) = issues_of(write_yaml_doc(tmp_path / "m.yaml", yaml_doc))
    assert "limit for YAML" in issue.message


def _alias_bomb(levels: int) -> str:
    """A flow sequence whose last item expands to 9**levels strings, in a few hundred bytes."""
    parts = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        parts.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("field", ["model", "size", "id", "response_format", "prompt", "images"])
def test_alias_bomb_is_refused_without_expanding_it(tmp_path: Path, field: str) -> None:
    # Bug check: the messages for model, size, id and response_format embed `{value!r}`, and the
    # repr of an aliased "billion laughs" value expands it: each level multiplies the message by
    # 9. Levels 5 and 6 (about 0.5 and 4.3 MB of repr) keep this test cheap; nine levels, 600
    # bytes of YAML, exhaust 1 GiB. A refusal must not grow with the depth of the bomb.
    lengths = []
    for levels in (5, 6):
        path = write_text(
            tmp_path / f"bomb{levels}.yaml",
            f"jobs:\n  - prompt: a cat\n    {field}: {_alias_bomb(levels)}\n",
        )
        assert path.stat().st_size < 600
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        lengths.append(len(str(info.value)))
    assert lengths[1] < 2 * lengths[0], lengths
    assert lengths[1] < 1_000_000, lengths


# --- CSV ------------------------------------------------------------------------------------


def test_csv_quoting_images_and_blank_cells(tmp_path: Path) -> None:
    make_image(tmp_path / "refs" / "a.png")
    make_image(tmp_path / "refs" / "b.jpg", "JPEG")
    make_image(tmp_path / "refs" / "c.webp", "WEBP")
    path = write_text(
        tmp_path / "m.csv",
        """\
        id,prompt,size,model,response_format,images
        q,"Mug, on a desk, ""quoted"" text, and more",1280x720,,,
        e,Fuse three,,,,refs/a.png | refs/b.jpg|refs/c.webp
        ,Blank cells everywhere,,,,
        w,Whitespace cells are blank too,  ,  ,  ,  \n\
        u,Url please,2048x2048,gpt-image-2-vip,url,
        """,
    )
    q, e, blank, white, u = load_manifest(path)
    assert q.prompt == 'Mug, on a desk, "quoted" text, and more'
    assert q.size == "1280x720"
    refs = (tmp_path / "refs").resolve()
    assert e.images == (refs / "a.png", refs / "b.jpg", refs / "c.webp")
    assert (e.endpoint, e.size, e.response_format) == ("edits", "auto", "b64_json")
    for job in (blank, white):
        assert job.size is None
        assert job.model == "gpt-image-2-vip"
        assert job.response_format == "b64_json"
        assert job.images == ()
        assert job.endpoint == "generations"
    assert blank.id.startswith("blank-cells-everywhere-")
    assert white.id == "w"
    assert (u.response_format, u.model) == ("url", "gpt-image-2-vip")


def test_csv_columns_in_any_order_and_subset(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", " size , prompt \n2048x864,wide\n")
    (job,) = load_manifest(path)
    assert (job.prompt, job.size) == ("wide", "2048x864")


def test_csv_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("id,prompt\nfirst,hello\n".encode("utf-8-sig"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    (job,) = load_manifest(path)
    assert (job.id, job.prompt) == ("first", "hello")


def test_yaml_prompts_keep_non_ascii(tmp_path: Path) -> None:
    (job,) = load_manifest(one_job(tmp_path, {"id": "ink", "prompt": "水墨山水画, café"}))
    assert job.prompt == "水墨山水画, café"


@pytest.mark.parametrize(
    ("header", "field", "fragment"),
    [
        ("prompt,colour", "colour", "unknown key"),
        ("prompt,quality", "quality", "rejected by the API"),
        ("prompt,n", "n", "rejected by the API"),
        ("prompt,aspect_ratio", "aspect_ratio", "rejected by the API"),
        ("id,size", "prompt", "prompt column is required"),
        ("prompt,prompt", "", "named twice"),
    ],
)
def test_csv_bad_header(tmp_path: Path, header: str, field: str, fragment: str) -> None:
    path = write_text(tmp_path / "m.csv", f"{header}\na,b\n")
    issues = issues_of(path)
    assert where(issues) == {("header", field)}
    assert fragment in issues[0].message


def test_a_csv_header_lists_the_csv_columns_it_knows(tmp_path: Path) -> None:
    """``vars`` is a job field, but no CSV column (matrices are YAML only): not listed as known."""
    (issue,) = issues_of(write_text(tmp_path / "m.csv", "prompt,vars\na,b\n"))
    assert (issue.row, issue.field) == ("header", "vars")
    assert issue.message == (
        "unknown key (known: id, prompt, size, model, response_format, images, repeat)"
    )


def test_csv_more_cells_than_columns(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", "id,prompt\na,one\nb,two,extra\nc,three\n")
    issues = issues_of(path)
    assert where(issues) == {("row 2 (line 3)", "")}
    assert "more cells than the header has columns" in issues[0].message


def test_csv_fewer_cells_leave_fields_unset(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", "prompt,size,response_format\nshort row\n")
    (job,) = load_manifest(path)
    assert (job.prompt, job.size, job.response_format) == ("short row", None, "b64_json")


def test_csv_blank_lines_are_skipped_and_rows_labelled(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,prompt\n\nfirst,one\n\n\n,two\n  , \nthird,three\n\n", encoding="utf-8")
    jobs = load_manifest(path)
    assert [j.prompt for j in jobs] == ["one", "two", "three"]
    assert [j.row for j in jobs] == ["row 1 (line 3)", "row 2 (line 6)", "row 3 (line 8)"]


def test_csv_row_labels_in_issues(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,size\n\nok,one,\n\nbad,two,1000x1000\n", encoding="utf-8")
    issues = issues_of(path)
    assert where(issues) == {("row 2 (line 5)", "size")}


def test_csv_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b'id,prompt\r\na,"one, two"\r\nb,three\r\n')
    jobs = load_manifest(path)
    assert [(j.id, j.prompt) for j in jobs] == [("a", "one, two"), ("b", "three")]
    assert [j.row for j in jobs] == ["row 1 (line 2)", "row 2 (line 3)"]


def test_csv_empty_image_segment_is_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    path = write_text(tmp_path / "m.csv", "prompt,images\nedit,a.png|\n")
    assert where(issues_of(path)) == {("row 1 (line 2)", "images")}


@pytest.mark.parametrize(
    ("text", "expected", "fragment"),
    [
        ("", ("header", ""), "the file is empty"),
        ("id,prompt\n", ("file", ""), "has a header but no jobs"),
        ("id,prompt\n\n\n", ("file", ""), "has a header but no jobs"),
    ],
    ids=["empty", "header-only", "header-and-blank-lines"],
)
def test_csv_without_jobs(
    tmp_path: Path, text: str, expected: tuple[str, str], fragment: str
) -> None:
    issues = issues_of(write_text(tmp_path / "m.csv", text))
    assert where(issues) == {expected}
    assert fragment in issues[0].message


def test_csv_size_with_gpt_image_2_all(tmp_path: Path) -> None:
    path = write_text(tmp_path / "m.csv", "prompt,size,model\na,2048x2048,gpt-image-2-all\n")
    issues = issues_of(path)
    assert where(issues) == {("row 1 (line 2)", "size")}
    assert "takes no size" in issues[0].message


# --- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.txt", "m.json", "m", "m.yaml.bak", "m.tsv"])
def test_other_extensions_are_refused(tmp_path: Path, name: str) -> None:
    path = write_text(tmp_path / name, "jobs:\n  - prompt: a\n")
    issues = issues_of(path)
    assert where(issues) == {("file", "")}
    assert "must end in .yaml, .yml or .csv" in issues[0].message


@pytest.mark.parametrize("name", ["m.yml", "M.YAML", "m.Yml"])
def test_yaml_extensions_any_case(tmp_path: Path, name: str) -> None:
    path = write_text(tmp_path / name, "jobs:\n  - prompt: a\n")
    assert [j.prompt for j in load_manifest(path)] == ["a"]


def test_uppercase_csv_extension(tmp_path: Path) -> None:
    path = write_text(tmp_path / "M.CSV", "prompt\na\n")
    assert [j.prompt for j in load_manifest(path)] == ["a"]


def test_nonexistent_manifest_is_refused(tmp_path: Path) -> None:
    issues = issues_of(tmp_path / "nope.yaml")
    assert where(issues) == {("file", "")}
    assert "cannot read" in issues[0].message


def test_directory_as_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    assert where(issues_of(tmp_path / "dir.yaml")) == {("file", "")}


def test_non_utf8_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_bytes(b"jobs:\n  - prompt: caf\xe9\n")
    (tmp_path / "m.csv").write_bytes(b"prompt\ncaf\xe9\n")
    for name in ("m.yaml", "m.csv"):
        issues = issues_of(tmp_path / name)
        assert where(issues) == {("file", "")}
        assert "cannot read" in issues[0].message


# --- the CLI --------------------------------------------------------------------------------


def run_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("path", "count", "edits"),
    [(JOBS_DIR / "demo.yaml", 8, 2), (CSV_EXAMPLE, 4, 1)],
    ids=["yaml", "csv"],
)
def test_cli_validate_good_manifest(path: Path, count: int, edits: int) -> None:
    done = run_validate(path)
    assert done.returncode == 0, done.stderr
    assert f": {count} jobs ({count - edits} generations, {edits} edit{'s' * (edits != 1)})" in (
        done.stdout
    )
    assert f"${count * 0.03:.2f}" in done.stdout


def test_cli_validate_bad_manifest_names_every_row(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "bad.yaml",
        """\
        jobs:
          - prompt: fine
          - prompt: bad size
            size: 2048X2048
          - quality: hd
          - prompt: missing
            images: [nope.png]
        """,
    )
    done = run_validate(path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "4 problems, nothing was sent" in done.stderr
    for needle in (
        "job 2 (line 3), field size",
        "job 3 (line 5), field quality",
        "job 3 (line 5), field prompt",
        "job 4 (line 6), field images",
    ):
        assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_validate_missing_file_exits_2(tmp_path: Path) -> None:
    done = run_validate(tmp_path / "absent.csv")
    assert done.returncode == 2
    assert "file: cannot read" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_given_twice_in_a_job_is_refused(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "twice.yaml",
        'jobs:\n  - prompt: "first"\n    size: 1280x720\n    prompt: "second"\n',
    )
    assert where(issues_of(path)) == {("line 4", "prompt")}


# --- scale: streaming, the spool, the content hash ----------------------------------------


def test_a_big_csv_is_streamed_and_every_problem_still_reported(tmp_path: Path) -> None:
    """900,000 rows, a bad size on row 1 and an id used again on row 900,000: both reported,
    with rows and lines, in one go; memory stays far below what the jobs as objects take."""
    rows = ["id,prompt,size", "img-1,the first row,2048X2048"]
    rows += [f"img-{i},picture number {i},1280x1280" for i in range(2, 900_000)]
    rows.append("IMG-3,the last row,1280x1280")
    path = tmp_path / "big.csv"
    path.write_text("\n".join(rows) + "\n")
    # The peak is the process's own (VmHWM): ru_maxrss would count the parent's, from vfork.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from runner.cli.main import main\n"
        "code = main(['validate', sys.argv[1]])\n"
        "status = Path('/proc/self/status')\n"
        "peak = [l for l in status.read_text().splitlines() if l.startswith('VmHWM')]\n"
        "print(*peak or ['VmHWM: 0 kB'], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == f"{path}: 2 problems, nothing was sent:"
    assert lines[1] == (
        "  row 1 (line 2), field size: '2048X2048' is not one of the 30 sizes "
        "(use a lowercase ASCII x); did you mean 2048x2048?"
    )
    assert [line.split(":")[0] for line in lines[2:5]] == ["    1K", "    2K", "    4K"]
    assert lines[5] == (
        "  row 900000 (line 900001), field id: 'IMG-3' is already used by row 3 (line 4) "
        "(ids differ only in case)"
    )
    if sys.platform == "linux":  # in kB; the jobs as objects alone would take ~400 MB
        assert int(lines[6].split()[1]) < 350 * 1024


def test_a_duplicate_far_behind_is_named_with_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first user of an id is looked up in the spool, chunks behind, only when needed."""
    monkeypatch.setattr(spool_module, "CHUNK_JOBS", 3)
    jobs = [{"id": f"j{i}", "prompt": f"p{i}"} for i in range(10)]
    jobs += [{"id": "j1", "prompt": "again"}, {"prompt": "p5"}, {"prompt": "p5"}]
    issues = issues_of(write_yaml_doc(tmp_path / "m.yaml", {"jobs": jobs}))
    assert [(i.row, i.message) for i in issues] == [
        ("job 11 (line 22)", "'j1' is already used by job 2 (line 4)"),
        (
            "job 13 (line 25)",
            f"{issues[1].message.split()[0]} is already used by job 12 (line 24); "
            "the two jobs are identical, give one an explicit id",
        ),
    ]


def test_the_manifest_is_a_sequence_read_back_from_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "CHUNK_JOBS", 2)
    make_image(tmp_path / "refs" / "a.png")
    path = write_text(
        tmp_path / "m.csv",
        """\
        id,prompt,images,repeat
        a,plain,,
        b,edit image1,refs/a.png,
        c,three copies,,3
        """,
    )
    manifest = load_manifest(path)
    assert [j.id for j in manifest] == ["a", "b", "c-1", "c-2", "c-3"]
    assert (len(manifest), manifest.rows, manifest.edits) == (5, 3, 1)
    assert manifest[1].images == ((tmp_path / "refs" / "a.png").resolve(),)
    assert manifest[-1].variant == "#3" and manifest[2:4] == list(manifest)[2:4]
    assert repr(manifest) == f"Manifest({str(path)!r}, jobs=5, rows=3, edits=1)"


def test_a_manifest_can_only_be_read(tmp_path: Path) -> None:
    """Its jobs are the validator's: no way to add one unchecked (a job id ``../../escape``
    added by hand once wrote its image outside the output folder), nor to change its counts."""
    manifest = load_manifest(one_job(tmp_path, {"prompt": "a fox"}))
    public = {name for name in dir(manifest) if not name.startswith("_")}
    assert public == {"close", "count", "edits", "index", "rows", "source"}
    with pytest.raises(AttributeError):
        manifest.rows = 2  # type: ignore[misc]
    assert len(manifest) == 1 and manifest.source == str(tmp_path / "one.yaml")


@pytest.mark.parametrize(
    "prompt", ["a", 'q"uo\\te', "tab\tnl\n\x00\x1f\x7f", "\u6c34\u58a8 caf\u00e9", "\U0001f600"]
)
@pytest.mark.parametrize("size", [None, "auto", "1280x1280"])
@pytest.mark.parametrize("repeat_index", [None, 1, 12])
@pytest.mark.parametrize("images", [[], ["ab" * 32], ["ab" * 32, "cd" * 32]])
def test_content_hash_is_the_sha256_of_the_sorted_json(
    prompt: str, size: str | None, repeat_index: int | None, images: list[str]
) -> None:
    """Derived ids and resume depend on these bytes: the fast path must never drift."""
    fields: dict[str, Any] = {
        "model": "gpt-image-2-vip",
        "prompt": prompt,
        "size": size,
        "response_format": "url",
        "image_sha256s": images,
    }
    content = {**fields, "images": images}
    del content["image_sha256s"]
    if repeat_index is not None:
        content["repeat"] = repeat_index
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert content_hash(**fields, repeat_index=repeat_index) == expected
