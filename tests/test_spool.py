"""runner.manifest.spool: jobs packed in chunks, read back like a list, in memory or spilled
to disk."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import pytest

from runner.jobs import Job
from runner.manifest import spool as spool_module
from runner.manifest.spool import JobSpool, Packed, restore
from tests.conftest import make_job


def job(n: int, images: tuple[Path, ...] = ()) -> Job:
    """A job as the spool gives one back: every kind of field, none checked."""
    return restore(
        f"j{n}",
        f'prompt {n} \u6c34\u58a8 "quoted"\n',
        "gpt-image-2-vip",
        ("auto" if images else None) if n % 5 == 0 else "1280x544",
        "url" if n % 2 else "b64_json",
        f"{n:064x}",
        images,
        f"row {n} (line {n + 1})",
        f"style=ink #{n}" if n % 3 == 0 else "",
        (("style", "ink"), ("scale", n), ("ratio", n / 2)) if n % 3 == 0 else (),
        n if n % 3 == 0 else None,
        "{style} at {scale} and {ratio}" if n % 3 == 0 else "",
    )


def packed(jobs: Iterable[Job]) -> list[Packed]:
    """Jobs as the validator gives them to the spool."""
    return [
        (*(j.id, j.prompt, j.model, j.size, j.response_format, j.content_hash),
         tuple(map(str, j.images)), j.row, j.variant, j.vars, j.repeat_index, j.template)
        for j in jobs
    ]  # fmt: skip


def test_a_job_read_back_equals_the_one_that_was_checked() -> None:
    made = make_job("cat", size="auto", images=(Path("/refs/a.png"),))
    fields = [getattr(made, f.name) for f in dataclasses.fields(Job)]
    assert restore(*fields) == made


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "CHUNK_JOBS", 4)


def test_reads_back_what_was_appended(tmp_path: Path, small_chunks: None) -> None:
    refs = (tmp_path / "a.png", tmp_path / "b.jpg")
    jobs = [job(n, refs if n % 4 == 1 else ()) for n in range(11)]  # 2 chunks and 3 pending
    spool = JobSpool()
    spool.extend_packed(packed(jobs))

    assert len(spool) == 11
    assert list(spool) == jobs
    assert list(spool) == jobs  # again: a sequence, not an iterator
    assert spool[0] == jobs[0] and spool[5] == jobs[5] and spool[10] == jobs[10]
    assert spool[-1] == jobs[-1]
    assert spool[3:9] == jobs[3:9] and spool[::4] == jobs[::4]
    assert all(isinstance(p, Path) for p in spool[1].images)
    assert spool[1].images is spool[5].images or spool[1].images == spool[5].images
    with pytest.raises(IndexError):
        spool[11]


def test_random_access_between_reads_in_order(small_chunks: None) -> None:
    jobs = [job(n) for n in range(12)]
    spool = JobSpool()
    spool.extend_packed(packed(jobs))
    walked = []
    for n, item in enumerate(spool):
        assert spool[(n * 7) % 12] == jobs[(n * 7) % 12]  # moves the file and the cache
        walked.append(item)
    assert walked == jobs


def test_appending_after_reading(small_chunks: None) -> None:
    spool = JobSpool()
    spool.extend_packed(packed(job(n) for n in range(6)))
    assert spool[1] == job(1)  # reads chunk 0: the file position moves
    spool.extend_packed(packed(job(n) for n in range(6, 13)))
    assert list(spool) == [job(n) for n in range(13)]


def test_spills_to_disk_past_its_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "IN_MEMORY_BYTES", 10_000)
    monkeypatch.setattr(spool_module, "CHUNK_JOBS", 16)
    spool = JobSpool()
    spool.extend_packed(packed(job(n) for n in range(500)))
    assert spool._file._rolled  # type: ignore[attr-defined]
    assert list(spool) == [job(n) for n in range(500)]
    assert spool[257] == job(257)
    spool.close()


def test_a_row_of_many_jobs_fills_several_chunks(small_chunks: None) -> None:
    """A matrix row gives its jobs at once: they are cut into whole chunks, the rest pending."""
    spool = JobSpool()
    spool.extend_packed(packed([job(0)]))
    spool.extend_packed(packed(job(n) for n in range(1, 11)))
    assert len(spool) == 11 and len(spool._chunks) == 2  # 8 jobs in chunks, 3 pending
    assert list(spool) == [job(n) for n in range(11)]
