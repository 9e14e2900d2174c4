"""runner.jobs: a Job is not built by hand nor replaced (its content hash would go stale); with
the package's token, not with an invalid field or without its content hash; its rules are the
validator's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from runner.errors import ManifestError
from runner.jobs import _TOKEN, Job, content_hash
from runner.manifest import load_jobs, load_manifest
from runner.provider import MODELS, RESPONSE_FORMATS, SIZES

REPO = Path(__file__).resolve().parents[1]
HASH = content_hash(
    model="gpt-image-2-vip",
    prompt="a cat",
    size="1280x720",
    response_format="b64_json",
    image_sha256s=[],
)
GOOD: dict[str, Any] = {
    "id": "cat",
    "prompt": "a cat",
    "model": "gpt-image-2-vip",
    "size": "1280x720",
    "response_format": "b64_json",
    "content_hash": HASH,
}


def build(*args: Any, **fields: Any) -> Job:
    """A job built as the package's tests may: with the constructor's private token."""
    return Job(*args, **fields, _token=_TOKEN)


def test_a_valid_job_is_built() -> None:
    job = build(**GOOD)
    assert (job.images, job.row, job.variant, job.endpoint) == ((), "", "", "generations")
    edit = build(**{**GOOD, "size": "auto", "images": (Path("/refs/a.png"),)})
    assert edit.endpoint == "edits"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"content_hash": ""}, "content_hash must be the sha256"),
        ({"content_hash": "h" + "0" * 63}, "content_hash must be the sha256"),
        ({"content_hash": HASH.upper()}, "content_hash must be the sha256"),
        ({"content_hash": HASH[:-1]}, "content_hash must be the sha256"),
        ({"id": "../etc"}, "id must be 1-128"),
        ({"id": ".hidden"}, "id must be 1-128"),
        ({"id": ""}, "id must be 1-128"),
        ({"id": 7}, "id must be 1-128"),
        ({"prompt": "  "}, "prompt must be non-blank"),
        ({"prompt": None}, "prompt must be non-blank"),
        ({"model": "dall-e-3"}, "no valid combination for a generation"),
        ({"size": "1000x1000"}, "no valid combination"),
        ({"size": "2048X2048"}, "no valid combination"),
        ({"size": "auto"}, "no valid combination for a generation"),
        ({"model": "gpt-image-2-all"}, "no valid combination"),  # takes no size
        ({"response_format": "png"}, "no valid combination"),
        ({"images": (Path("/a.png"),), "size": None}, "no valid combination for an edit"),
        ({"images": [Path("/a.png")], "size": "auto"}, "images must be a tuple of Paths"),
        ({"images": ("/a.png",), "size": "auto"}, "images must be a tuple of Paths"),
        ({"row": None}, "row and variant must be text"),
    ],
)
def test_an_invalid_field_raises(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid job") as info:
        build(**{**GOOD, **change})
    assert fragment in str(info.value)


def test_the_content_hash_is_required() -> None:
    fields = {k: v for k, v in GOOD.items() if k != "content_hash"}
    with pytest.raises(TypeError, match="content_hash"):
        build(**fields)


def test_a_job_is_not_built_by_hand() -> None:
    with pytest.raises(TypeError, match=r"get jobs from runner\.load_jobs") as info:
        Job(**GOOD)
    assert "runner.load_manifest" in str(info.value)
    with pytest.raises(TypeError, match="a Job is not built by hand"):
        Job(**GOOD, _token=object())


def test_replace_would_keep_a_stale_content_hash_so_it_is_refused(tmp_path: Path) -> None:
    """The fox's job with the whale's prompt and the fox's hash would be taken for done on
    resume, with the fox's image: a job is changed through its record."""
    (fox,) = load_jobs([{"id": "animal", "prompt": "a red fox"}], base=tmp_path)
    with pytest.raises(TypeError, match="change its record and load it again"):
        dataclasses.replace(fox, prompt="a blue whale")
    with pytest.raises(TypeError, match="a Job is not built by hand"):
        dataclasses.replace(build(**GOOD))
    (whale,) = load_jobs([{"id": "animal", "prompt": "a blue whale"}], base=tmp_path)
    assert whale.content_hash != fox.content_hash


def test_every_job_a_manifest_makes_passes_the_checks(tmp_path: Path) -> None:
    """The spool rebuilds the validator's jobs without checking them again, so
    the validator must never make a job the constructor refuses."""
    matrix = tmp_path / "m.yaml"
    matrix.write_text('jobs:\n  - {prompt: "a {x} cat", vars: {x: [ink, oil]}, repeat: 2}\n')
    manifests = [REPO / "jobs" / "demo.yaml", REPO / "jobs" / "catalog.csv", matrix]
    jobs = [job for path in manifests for job in load_manifest(path)]
    assert len(jobs) == 8 + 4 + 4
    for job in jobs:
        assert build(*[getattr(job, f.name) for f in dataclasses.fields(Job)]) == job


@pytest.mark.parametrize("model", [*MODELS, "dall-e-3"])
@pytest.mark.parametrize("response_format", [*RESPONSE_FORMATS, "png"])
@pytest.mark.parametrize("edit", [False, True], ids=["generation", "edit"])
def test_the_validator_accepts_what_a_job_accepts(
    tmp_path: Path, model: str, response_format: str, edit: bool
) -> None:
    """For every size (and none, auto and a wrong one), a row is valid if and only if the job
    it is sent as is: the validator's rules, in words for a manifest's author, are a Job's."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")
    for size in [*SIZES, None, "auto", "1000x1000"]:
        row: dict[str, Any] = {"prompt": "a cat", "model": model, "size": size}
        row["response_format"] = response_format
        if edit:
            row["images"] = ["ref.png"]
        sent = "auto" if size is None and edit and model == "gpt-image-2-vip" else size
        try:
            build(**{**GOOD, **row, "size": sent, "images": (tmp_path / "ref.png",) * edit})
        except ValueError:
            with pytest.raises(ManifestError):
                load_jobs([row], base=tmp_path)
        else:
            (job,) = load_jobs([row], base=tmp_path)
            assert (job.model, job.size, job.response_format) == (model, sent, response_format)
