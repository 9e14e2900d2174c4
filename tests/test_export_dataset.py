"""``image-runner export`` of a matrix run with edits: the variables and the repeat number as
columns, the references copied, the dataset card, splits; loaded with the real ``datasets``,
offline, both ways a user loads a folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest
import yaml

from runner.emulator import Emulator
from runner.outputs.export_splits import parse_split
from runner.store import open_review_log
from runner.store.base import Decision
from tests.conftest import make_ref, run_manifest, write_manifest
from tests.test_cli import run_cli
from tests.test_export import export, hf  # noqa: F401 (hf: a fixture)

JOBS: list[dict[str, Any]] = [
    {"id": "plain", "prompt": "a lone tree on a hill", "size": "1280x544"},
    {
        "id": "mx",
        "prompt": "A {style} photo of a {subject}",
        "vars": {"style": ["watercolor", "oil"], "subject": ["cat", "owl"]},
        "size": "1280x544",
    },
    {
        "id": "ed",
        "prompt": "put a {thing} on image1 at scale {scale}",
        "vars": {"thing": ["hat"], "scale": [1, 2.5]},
        "images": ["refs/a.png", "refs/b.jpg"],
        "repeat": 2,
    },
    {"id": "recolor", "prompt": "image1 in blue", "images": ["refs/a.png"]},
]
IDS = [
    "plain",
    "mx-watercolor-cat",
    "mx-watercolor-owl",
    "mx-oil-cat",
    "mx-oil-owl",
    "ed-hat-1-1",
    "ed-hat-1-2",
    "ed-hat-2-5-1",
    "ed-hat-2-5-2",
    "recolor",
]


@pytest.fixture
async def out(tmp_path: Path, emulator: Emulator) -> Path:
    make_ref(tmp_path / "refs", "a.png", (48, 64))
    make_ref(tmp_path / "refs", "b.jpg")
    folder = tmp_path / "out"
    await run_manifest(write_manifest(tmp_path, JOBS), folder, emulator.base_url)
    return folder


def load(datasets: ModuleType, tmp_path: Path, *args: str, **kwargs: str) -> Any:
    """``datasets.load_dataset``, each call with a cache of its own: nothing read from another."""
    cache = tmp_path / "cache" / str(len(list(tmp_path.glob("cache/*"))))
    return datasets.load_dataset(*args, cache_dir=str(cache), **kwargs)


def card_yaml(dest: Path) -> dict[str, Any]:
    text = (dest / "README.md").read_text()
    assert text.startswith("---\n")
    front: dict[str, Any] = yaml.safe_load(text.split("---\n")[1])
    return front


def test_a_matrix_run_with_edits_loads_with_its_variables_and_references(
    out: Path,
    tmp_path: Path,
    hf: ModuleType,  # noqa: F811
) -> None:
    dest = tmp_path / "ds"
    result = export(out, dest, "imagefolder")
    assert (result.images, result.skipped, result.reference_problems) == (10, 0, ())
    assert result.references == 2  # a.png for five jobs, b.jpg for four: each once
    assert sorted(p.name for p in (dest / "references").iterdir()) == [
        p.split("/")[1] for p in sorted({*result_references(dest)})
    ]

    for loaded in (
        load(hf, tmp_path, "imagefolder", data_dir=str(dest)),
        load(hf, tmp_path, str(dest)),  # through the card's configs
    ):
        assert list(loaded) == ["train"]
        train = loaded["train"]
        features = train.features
        for column in ("style", "subject", "thing", "scale", "repeat", "version", "review"):
            assert column in features, column
        assert features["repeat"] == hf.Value("int64")
        assert features["style"] == hf.Value("string")  # "" for the jobs of other rows
        rows = {row["job_id"]: row for row in train}
        assert list(rows) == IDS
        assert (rows["mx-oil-owl"]["style"], rows["mx-oil-owl"]["subject"]) == ("oil", "owl")
        assert rows["plain"]["style"] == "" and rows["plain"]["repeat"] == 0
        assert (rows["ed-hat-2-5-2"]["scale"], rows["ed-hat-2-5-2"]["repeat"]) == ("2.5", 2)
        assert rows["ed-hat-1-1"]["scale"] == "1"
        for row in rows.values():
            paths = row["references"].split("|") if row["references"] else []
            assert len(paths) == {"ed": 2, "re": 1}.get(row["job_id"][:2], 0)
            for path in paths:  # relative to the dataset's root, and there
                assert (dest / path).is_file(), path
        source = (tmp_path / "refs" / "b.jpg").read_bytes()
        assert (dest / rows["ed-hat-1-1"]["references"].split("|")[1]).read_bytes() == source

    card = (dest / "README.md").read_text()
    front = card_yaml(dest)
    assert front["license"] == "other"
    assert front["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "train/**"}]}
    ]
    assert "# fill in" in card.splitlines()[1]
    for text in (
        "A {style} photo of a {subject}`: 4 images",
        "`style`: `watercolor`, `oil`",
        "`scale`: `1`, `2.5`",
        "| 1280x544 | 5 |",
        "image-runner 0.1.0",
        "$0.30 confirmed",  # ten images at $0.03
        "2 reference images in `references/`",
    ):
        assert text in card, text


def result_references(dest: Path) -> list[str]:
    lines = (dest / "train" / "metadata.jsonl").read_text().splitlines()
    return [p for line in lines for p in json.loads(line)["references"].split("|") if p]


def test_a_split_export_is_stable_and_loads_with_its_splits(
    out: Path,
    tmp_path: Path,
    hf: ModuleType,  # noqa: F811
) -> None:
    spec = parse_split("train=0.5,test=0.5")
    first = export(out, tmp_path / "one", "imagefolder", split=spec)
    second = export(out, tmp_path / "two", "imagefolder", split=spec)
    assert first.splits == second.splits and set(first.splits) == {"train", "test"}
    assert sum(first.splits.values()) == 10 and all(first.splits.values())
    assert card_yaml(tmp_path / "one")["configs"][0]["data_files"] == [
        {"split": "train", "path": "train/**"},
        {"split": "test", "path": "test/**"},
    ]
    members: list[dict[str, list[str]]] = []
    for dest in (tmp_path / "one", tmp_path / "two"):
        for loaded in (
            load(hf, tmp_path, "imagefolder", data_dir=str(dest)),
            load(hf, tmp_path, str(dest)),
        ):
            assert sorted(loaded) == ["test", "train"]
            members.append({name: sorted(loaded[name]["job_id"]) for name in loaded})
    assert all(m == members[0] for m in members)  # the same jobs in the same splits

    # Parquet: a file per split under data/, any split names, the same assignment.
    holdout = parse_split("train=0.5,holdout=0.5")
    table = export(out, tmp_path / "pq", "parquet", split=holdout)
    assert sorted(p.name for p in (tmp_path / "pq" / "data").iterdir()) == [
        "holdout-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    for loaded in (
        load(hf, tmp_path, str(tmp_path / "pq")),
        load(hf, tmp_path, "parquet", data_dir=str(tmp_path / "pq")),
    ):
        assert sorted(loaded) == ["holdout", "train"]
        assert sorted(loaded["holdout"]["job_id"]) == members[0]["test"]
        assert "scale" in loaded["train"].features
    assert table.splits == {"train": first.splits["train"], "holdout": first.splits["test"]}


def test_a_reference_changed_or_missing_since_the_run_is_reported_not_exported(
    out: Path, tmp_path: Path
) -> None:
    with open(tmp_path / "refs" / "b.jpg", "ab") as file:
        file.write(b"retouched")
    dest = tmp_path / "ds"
    result = export(out, dest, "imagefolder")
    assert result.images == 6 and result.skipped == 0
    assert [p.split(":")[0] for p in result.reference_problems] == IDS[5:9]
    assert "changed since the run" in result.reference_problems[0]
    assert result.references == 1  # a.png, for recolor; never the altered b.jpg
    assert [p.name[13:] for p in (dest / "references").iterdir()] == ["a.png"]

    (tmp_path / "refs" / "a.png").unlink()
    done = run_cli("export", out, tmp_path / "cli", "--format", "parquet")
    assert done.returncode == 0, done.stderr
    assert "left out: recolor: its reference image" in done.stderr
    assert "missing or unreadable" in done.stderr
    assert "(5 skipped: reference missing or changed)" in done.stdout
    frame = pd.read_parquet(tmp_path / "cli" / "data")
    assert list(frame["job_id"]) == IDS[:5] and set(frame["references"]) == {""}
    assert not (tmp_path / "cli" / "references").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("train=0.9,test=0.2", "the fractions add up to 1.1; they must add up to 1"),
        ("train", "'train' is not NAME=FRACTION; write e.g. train=0.9,test=0.1"),
        ("train=0.5,train=0.5", "split 'train' is named twice"),
        ("my split=1", "split name 'my split' must be a name of letters, digits and _"),
        ("train=half,test=0.5", "the fraction of 'train', 'half', is not a number"),
        ("train=1.5,test=-0.5", "the fraction of 'train' must be more than 0 and at most 1"),
        (
            "references=1",
            "split name 'references' is taken by the dataset's own references/ folder",
        ),
    ],
)
def test_a_bad_split_spec_is_a_clear_error(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        parse_split(spec)
    assert str(caught.value) == message
    done = run_cli("export", tmp_path, tmp_path / "ds", "--split", spec)
    assert done.returncode == 2 and message in done.stderr


def test_imagefolder_takes_the_split_names_datasets_keeps(out: Path, tmp_path: Path) -> None:
    done = run_cli("export", out, tmp_path / "ds", "--split", "train=0.8,val=0.2")
    assert done.returncode == 2
    assert "split 'val': the imagefolder format takes the split names train, validation, test" in (
        done.stderr
    )
    assert "--format parquet" in done.stderr
    assert not (tmp_path / "ds").exists()


def test_splits_depend_on_the_job_id_alone() -> None:
    spec = parse_split("train=0.9,test=0.1")
    ids = [f"job-{n}" for n in range(2000)]
    assigned = [spec.split_of(job_id) for job_id in ids]
    assert assigned == [spec.split_of(job_id) for job_id in reversed(ids)][::-1]
    assert 150 <= assigned.count("test") <= 250  # about a tenth
    assert parse_split(" train = 0.9 , test = 0.1 ") == spec
    assert str(spec) == "train=0.9,test=0.1"


def test_approved_only_exports_the_approved_images(
    out: Path,
    tmp_path: Path,
    hf: ModuleType,  # noqa: F811
) -> None:
    refused = run_cli("export", out, tmp_path / "none", "--approved-only")
    assert refused.returncode == 2
    assert "none of the succeeded jobs is approved" in refused.stderr
    assert f"image-runner review {out}" in refused.stderr and not (tmp_path / "none").exists()

    log = open_review_log(out)
    try:
        decisions = [Decision("mx-oil-cat", "approved"), Decision("recolor", "approved")]
        log.decide([*decisions, Decision("plain", "rejected")], "ana")
    finally:
        log.close()
    done = run_cli("export", out, tmp_path / "ds", "--approved-only")
    assert done.returncode == 0, done.stderr
    assert "exported 2 images as imagefolder" in done.stdout
    train = load(hf, tmp_path, str(tmp_path / "ds"))["train"]
    assert list(zip(train["job_id"], train["review"], strict=True)) == [
        ("mx-oil-cat", "approved"),
        ("recolor", "approved"),
    ]
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "- only approved images" in card and "--approved-only" in card
