"""Resume: reconcile the manifest, the checkpoint and the files on disk into what is left to do.

Run once at the start of every run, before any request, in this order:

1. delete temp files a crash left in ``images/`` (and of the results files, in the folder);
2. turn attempts left in flight into possible charges;
3. record the manifest's jobs; a job whose content changed under the same id starts over (its
   old image is moved to ``replaced/``);
4. a "succeeded" job whose image is missing or whose sha256 differs is done again (an altered
   file is moved to ``replaced/``, never adopted);
5. an image on disk with no success recorded (a crash between the rename and the commit) is
   verified and adopted, with no new request;
6. everything else that is pending, or failed in a way a later run may retry, is to do; jobs
   that failed for good only with ``--retry-failed`` (``--only CAUSE`` narrows it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import StoreError
from runner.images import ImageInvalid, find_image, inspect_image, remove_temp_files, sha256_file
from runner.jobs import Job
from runner.store import Store

IMAGES_DIR = "images"
REPLACED_DIR = "replaced"


@dataclass
class Plan:
    todo: list[Job]
    done: int = 0  # succeeded before, image verified on disk
    failed: int = 0  # failed finally before; not retried
    adopted: int = 0
    redo: list[str] = field(default_factory=list)  # succeeded, but the image is gone or altered
    changed: list[str] = field(default_factory=list)  # content changed under the same id
    retried_failed: list[str] = field(default_factory=list)  # failed for good, retried on request
    temp_files_removed: int = 0
    in_flight_settled: int = 0


def make_plan(
    jobs: list[Job], store: Store, *, retry_failed: bool = False, only: frozenset[str] = frozenset()
) -> Plan:
    """What is left to do. ``retry_failed`` adds the jobs that failed for good (a content
    refusal, a bad request), or with ``only`` just those whose cause is in it."""
    images_dir = store.folder / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(todo=[])
    plan.temp_files_removed = remove_temp_files(images_dir) + remove_temp_files(store.folder)
    plan.in_flight_settled = store.settle_in_flight()

    before = store.job_records()
    for job in jobs:
        old = before.get(job.id)
        if old is not None and old.content_hash != job.content_hash:
            plan.changed.append(job.id)
            _move_aside(store.folder, job.id)
    store.upsert_jobs(jobs)

    records = store.job_records()
    for job in jobs:
        record = records[job.id]
        if record.status == "succeeded":
            if record.image_path and _intact(store.folder / record.image_path, record.sha256):
                plan.done += 1
                continue
            store.mark_pending(job.id)
            plan.redo.append(job.id)
            _move_aside(store.folder, job.id)  # an altered file is not ours to adopt
            plan.todo.append(job)
            continue
        elif record.status == "failed" and not record.retryable:
            if not retry_failed or (only and record.error_cause not in only):
                plan.failed += 1
                continue
            plan.retried_failed.append(job.id)
        if _adopt(job, store, images_dir):
            plan.adopted += 1
            plan.done += 1
        else:
            plan.todo.append(job)
    return plan


def _intact(path: Path, sha256: str | None) -> bool:
    try:
        return sha256 is not None and sha256_file(path) == sha256
    except FileNotFoundError:
        return False
    except OSError as exc:  # unreadable is not gone: never pay again for a permission problem
        raise StoreError(f"cannot read {path} to check it: {exc.strerror}; fix it, rerun") from None


def _adopt(job: Job, store: Store, images_dir: Path) -> bool:
    path = find_image(images_dir, job.id)
    if path is None:
        return False
    data = path.read_bytes()
    try:
        info = inspect_image(data, job.expected_size)
    except ImageInvalid:
        path.unlink()  # not a finished image of this job: it will be made again
        return False
    store.adopt(
        job.id,
        image_path=path.relative_to(store.folder).as_posix(),
        width=info.width,
        height=info.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return True


def _move_aside(folder: Path, job_id: str) -> None:
    old = find_image(folder / IMAGES_DIR, job_id)
    if old is not None:
        aside = folder / REPLACED_DIR
        aside.mkdir(exist_ok=True)
        target, n = aside / old.name, 1
        while target.exists():  # every earlier version was paid for: keep them all
            target, n = aside / f"{old.stem}.{n}{old.suffix}", n + 1
        old.replace(target)
