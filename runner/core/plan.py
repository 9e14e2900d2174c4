"""Resume: reconcile the manifest, the checkpoint and the files on disk into what is left to do.

Run once at the start of every run, before any request, in this order:

1. delete temp files a crash left in ``images/`` (and of the results files, in the folder);
   with a shared state, only those too old to be a live worker's;
2. turn attempts left in flight into possible charges, and finish the moves of earlier
   versions that a crash cut off (see :mod:`runner.core.versions`);
3. record the manifest's jobs; a job whose content changed under the same id starts over at
   its next version (its old image is moved to ``replaced/``);
4. a "succeeded" job is checked against its image on disk: an image gone is made again (the
   next version); an image whose sha256 differs was edited by hand: it is kept where it is,
   recorded as the job's next version (unreviewed, ``edited``), and not paid for again, unless
   ``--redo-edited`` asks and it is not approved (then it goes to ``edited/`` and the job is
   made again); a file in the image's place that does not decode (empty, cut short) is no
   edit: it goes to ``edited/`` as an earlier version (``unreadable``) and the job is made
   again; an image a reviewer rejected goes to ``rejected/`` and the job is made again at its
   next version. An approved image that is still there and decodes is never touched. Why an
   edit is kept in place rather than moved to ``edited/``: moved, it would leave the job
   without its image, to be made again (the repayment the user did not ask for), or a folder
   of images that is no longer the manifest's results;
5. an image on disk with no success recorded (a crash between the rename and the commit) is
   verified and adopted, with no new request;
6. everything else that is pending, or failed in a way a later run may retry, is to do; jobs
   that failed for good only with ``--retry-failed`` (``--only CAUSE`` narrows it).

Each earlier version is recorded (the ``versions`` of :mod:`runner.store`) in the batch's
transaction, and its file moved once that has committed (:mod:`runner.core.versions`). The
attempts that made it stay in the ledger: what was spent stays spent.

At scale: steps 3-6 go through the manifest in batches of ``batch_size`` jobs, each looked up in
the checkpoint with a few queries and settled in one transaction, so memory does not grow with
the manifest and a million jobs cost a few hundred commits, not a million. A batch commits
before the next starts, and the plan is handed on only when all have: nothing is counted done
before it is durably recorded. Step 4 hashes an image only when its size, mtime or ctime
differ from those recorded with its success (like git's index); an image found intact that way
has its new stat recorded, so the next run does not hash it again. The images on disk are
listed once, for step 5, and only those no success accounts for are kept. What is to do is kept
as positions in the manifest (:class:`TodoJobs`), not as jobs.

A dry run walks the same steps and changes nothing, on disk or in the checkpoint: a user asks
"what would a run do?", often of a folder a night's run left stopped, and the answer must not
turn that night into a finished one, settle its charges or move its images. Each repair is
only counted, as the run that follows would find it: attempts in flight are counted as possible
charges, an image to adopt as done (its attempt as confirmed), an image to move aside as gone,
an edit as found.
Temp files are left alone (a live run may be writing them) and not counted.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, overload

from runner.core.finding import EXTENSION_RANK, Found, adoptable, judge, pixel_size
from runner.core.remote_plan import RemoteImages
from runner.core.versions import EDITED_DIR, REJECTED_DIR, REPLACED_DIR, Moves
from runner.errors import StoreError
from runner.images.files import find_image, is_temp_name, remove_temp_files, sha256_file
from runner.jobs import Job
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.storage import Location
from runner.store.base import ImageStat, JobRecord, RetireReason, Store

IMAGES_DIR: Final = "images"
PLAN_BATCH_JOBS: Final = 5000


class TodoJobs(Sequence[Job]):
    """The jobs left to do: positions in the manifest's sequence of jobs, 8 bytes each, read
    from it as the pool takes them."""

    def __init__(self, jobs: Sequence[Job], positions: array[int] | None = None) -> None:
        self._jobs = jobs
        self._positions = positions if positions is not None else array("L")

    def add(self, position: int) -> None:
        self._positions.append(position)

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self._jobs[p] for p in self._positions[index]]
        return self._jobs[self._positions[index]]

    def __iter__(self) -> Iterator[Job]:
        for position in self._positions:
            yield self._jobs[position]


@dataclass
class Plan:
    todo: Sequence[Job]
    todo_edits: int = 0  # of ``todo``, the jobs with reference images
    done: int = 0  # succeeded before, image verified on disk
    failed: int = 0  # failed finally before; not retried
    adopted: int = 0
    missing: list[str] = field(default_factory=list)  # succeeded, but the image is gone: redone
    changed: list[str] = field(default_factory=list)  # content changed under the same id
    rejected: list[str] = field(default_factory=list)  # rejected in review: moved aside, redone
    unreadable: list[str] = field(default_factory=list)  # image replaced by a file not decoding
    edited: list[str] = field(default_factory=list)  # found edited by hand now, and kept
    redo_edited: list[str] = field(default_factory=list)  # edited, moved aside, redone
    retried_failed: list[str] = field(default_factory=list)  # failed for good, retried on request
    temp_files_removed: int = 0  # none on a dry run
    in_flight_settled: int = 0  # attempts found in flight, now possible charges
    # (confirmed, possible) spend recorded in the folder before this run's requests, in
    # micro-dollars (an adopted image's attempt counts as confirmed)
    spent_micro_usd: tuple[int, int] = (0, 0)
    rehashed: int = 0  # finished images hashed because their stat changed or was not recorded


def make_plan(
    jobs: Sequence[Job],
    store: Store,
    *,
    retry_failed: bool = False,
    only: frozenset[str] = frozenset(),
    redo_edited: bool = False,
    batch_size: int = PLAN_BATCH_JOBS,
    dry_run: bool = False,
    location: Location | None = None,
    temp_min_age_s: float = 0.0,
) -> Plan:
    """What is left to do. ``retry_failed`` adds the jobs that failed for good (a content
    refusal, a bad request), or with ``only`` just those whose cause is in it; ``redo_edited``
    the jobs whose image was edited by hand. ``dry_run`` changes nothing (open ``store`` with
    :func:`runner.store.open_for_dry_run`) and plans the same. ``location``: where the images
    are, when not in ``store.folder`` (an object store: :mod:`runner.core.remote_plan`).
    ``temp_min_age_s``: temp files modified more recently are kept (workers sharing the folder
    may be writing them; see :func:`~runner.images.files.remove_temp_files`)."""
    images_dir = store.folder / IMAGES_DIR
    todo = TodoJobs(jobs)
    plan = Plan(todo=todo)
    remote = None
    if location is not None and not location.is_local:
        remote = RemoteImages(store, location, dry_run=dry_run)
    if dry_run:
        plan.in_flight_settled = store.in_flight_count()
    else:
        if remote is None:  # an object is created whole or not at all: no temp file to sweep
            images_dir.mkdir(parents=True, exist_ok=True)
            plan.temp_files_removed = remove_temp_files(images_dir, min_age_s=temp_min_age_s)
            plan.temp_files_removed += remove_temp_files(store.folder, min_age_s=temp_min_age_s)
        plan.in_flight_settled = store.settle_in_flight()
    planner = _Planner(
        store,
        plan,
        todo,
        retry_failed=retry_failed,
        only=only,
        redo_edited=redo_edited,
        dry_run=dry_run,
        remote=remote,
    )
    if remote is None:
        planner.moves.finish_interrupted(images_dir)
    else:
        remote.finish_interrupted()
    planner.find_unrecorded_images(batch_size)
    batch: list[Job] = []
    start = 0
    for job in jobs:
        batch.append(job)
        if len(batch) == batch_size:
            planner.plan_batch(start, batch)
            start += len(batch)
            batch = []
    if batch:
        planner.plan_batch(start, batch)
    confirmed, possible = store.spend_micro_usd()
    if dry_run:  # as settling and adopting would have recorded it
        confirmed += planner.adopted_confirmed_micro_usd
        possible += plan.in_flight_settled * PRICE_PER_IMAGE_MICRO_USD
        possible -= planner.adopted_possible_micro_usd
    plan.spent_micro_usd = (confirmed, possible)
    plan.rehashed += remote.rehashed if remote else 0
    return plan


class _Planner:
    def __init__(
        self,
        store: Store,
        plan: Plan,
        todo: TodoJobs,
        *,
        retry_failed: bool,
        only: frozenset[str],
        redo_edited: bool,
        dry_run: bool,
        remote: RemoteImages | None,
    ) -> None:
        self.store = store
        self.remote = remote  # the images are in an object store: it looks at them
        self.folder = store.folder
        self.folder_prefix = f"{store.folder}{os.sep}"
        self.images_dir = store.folder / IMAGES_DIR
        self.plan = plan
        self.todo = todo
        self.retry_failed = retry_failed
        self.only = only
        self.redo_edited = redo_edited
        # job id -> names of its image files that no recorded success accounts for
        self.unrecorded: dict[str, list[str]] = {}
        self.dry_run = dry_run
        self.moves = Moves(store, dry_run=dry_run)
        # What a dry run's adoptions would book: their attempts, confirmed at the image price,
        # and the possible charges those attempts were until then.
        self.adopted_confirmed_micro_usd = 0
        self.adopted_possible_micro_usd = 0

    def find_unrecorded_images(self, batch_size: int) -> None:
        """List ``images/`` once; keep the image files no success accounts for (step 5)."""
        found: list[tuple[str, str]] = []  # (job id, file name)
        if self.remote is not None:
            self.unrecorded = self.remote.unrecorded(batch_size)
            return
        if not self.images_dir.is_dir():  # a dry run before the first run
            return
        with os.scandir(self.images_dir) as entries:
            for entry in entries:
                stem, dot, ext = entry.name.rpartition(".")
                if dot and ext in EXTENSION_RANK and not is_temp_name(entry.name):
                    found.append((stem, entry.name))
                    if len(found) == batch_size:
                        self._keep_unrecorded(found)
                        found = []
        self._keep_unrecorded(found)
        for names in self.unrecorded.values():
            names.sort(key=lambda name: EXTENSION_RANK[name.rpartition(".")[2]])

    def _keep_unrecorded(self, found: list[tuple[str, str]]) -> None:
        # In the order of the checkpoint's index, not the directory's (a hash order): each
        # query then reads neighbouring pages, not a million pages scattered over the file.
        found.sort()
        recorded = self.store.finished_images([job_id for job_id, _ in found])
        for job_id, name in found:
            if f"{IMAGES_DIR}/{name}" not in recorded:
                self.unrecorded.setdefault(job_id, []).append(name)

    def plan_batch(self, start: int, jobs: list[Job]) -> None:
        """Steps 3-6 for the jobs at ``start`` and on, in one transaction; the files of the
        versions it retires are moved once it has committed."""
        plan = self.plan
        if self.remote is not None:  # its HEADs and downloads, never inside the transaction
            self.remote.prepare(jobs, self.unrecorded)
        transaction: AbstractContextManager[object] = (
            nullcontext() if self.dry_run else self.store.batch()
        )
        try:
            with transaction:
                # Read in the transaction: a review decision cannot land between what is read
                # here (a rejection) and what is written on it.
                # Sorted, as in _keep_unrecorded: a manifest's order need not be its ids'.
                records = self.store.job_records(sorted(job.id for job in jobs))
                fresh = []  # new, or changed under the same id: recorded as pending
                unlabelled = []  # recorded before the store kept matrix variables
                for job in jobs:
                    old = records.get(job.id)
                    if old is None:
                        fresh.append(job)
                    elif not old.has_metadata and old.content_hash == job.content_hash:
                        unlabelled.append(job)
                    elif old.content_hash != job.content_hash:
                        plan.changed.append(job.id)
                        self._retire_changed(old)
                        fresh.append(job)
                        del records[job.id]
                if not self.dry_run:
                    self.store.plan_jobs(fresh)
                    if unlabelled:
                        self.store.record_metadata(unlabelled)
                for position, job in enumerate(jobs, start):
                    record = records.get(job.id)
                    # Most jobs of a first run: new, and no image on disk to adopt.
                    if (record is not None or self.unrecorded) and self._settled(job, record):
                        continue
                    self.todo.add(position)
                    plan.todo_edits += bool(job.images)
        except BaseException:
            (self.remote or self.moves).discard()
            raise
        (self.remote or self.moves).finish()

    def _settled(self, job: Job, record: JobRecord | None) -> bool:
        """Whether ``job`` needs no request (done, or failed and not retried); ``record`` is
        None for a job just recorded as pending."""
        plan = self.plan
        if record is not None and record.status == "succeeded":
            return self._finished(record)
        if record is not None and record.status == "failed" and not record.retryable:
            if not self.retry_failed or (self.only and record.error_cause not in self.only):
                plan.failed += 1
                return True
            plan.retried_failed.append(job.id)
        if self._adopt(job):
            plan.adopted += 1
            plan.done += 1
            return True
        return False

    def _finished(self, record: JobRecord) -> bool:
        """Whether the image of a success stands (step 4); if not, its version is retired and
        the job is to be made again."""
        plan, job_id = self.plan, record.job_id
        checked = self._check(record)
        if checked is None:
            self._retire(record, "missing", None)
            plan.missing.append(job_id)
            return False
        record, found = checked
        if found == "unreadable":
            self._retire(record, "unreadable", EDITED_DIR, unreadable=True)
            plan.unreadable.append(job_id)
            return False
        if record.review == "rejected":
            self._retire(record, "rejected", REJECTED_DIR)
            plan.rejected.append(job_id)
            return False
        # An approved edit is the image the user wants: --redo-edited is for the others.
        if self.redo_edited and record.edited_at is not None and record.review != "approved":
            self._retire(record, "edited", EDITED_DIR)
            plan.redo_edited.append(job_id)
            return False
        if found == "edited":
            plan.edited.append(job_id)
        plan.done += 1
        return True

    def _check(self, record: JobRecord) -> tuple[JobRecord, Found] | None:
        """The record of a success after looking at its image: None when the image is gone;
        else the record and what was found. An image found edited by hand just now is recorded
        as the job's next version, and the record returned is of that; a file that no longer
        decodes is not an edit (an empty file, one cut short by a copy): nothing is recorded,
        and the record returned has its sha256."""
        if not record.image_path:
            return None
        if self.remote is not None:
            return self.remote.check(record)
        # A str, not a Path: building a million Paths costs more than the stats themselves.
        path = self.folder_prefix + record.image_path  # recorded relative to the folder
        try:
            st = os.stat(path)  # noqa: PTH116 (see above)
            if record.image_stat == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                return record, "intact"
            stat = ImageStat.of(st)
            self.plan.rehashed += 1
            sha256 = sha256_file(Path(path))
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable is not gone: never pay again for a permission problem
            raise StoreError(
                f"cannot read {path} to check it: {exc.strerror}; fix it, rerun"
            ) from None
        found = (stat, sha256, pixel_size(Path(path)) if sha256 != record.sha256 else None)
        return judge(self.store, record, found, dry_run=self.dry_run)

    def _retire(
        self,
        record: JobRecord,
        reason: RetireReason,
        aside: str | None,
        *,
        unreadable: bool = False,
    ) -> None:
        """Make the image of a success an earlier version, its file (if ``aside``) moved to
        that folder once the batch has committed; the job is to be made again. ``unreadable``:
        the file is not the image but one that does not decode, ``record.sha256`` its sha256."""
        target = None
        if aside is not None and record.image_path and self.remote is not None:
            key = self.remote.target(record.image_path, aside, record.job_id, record.version)
            self.remote.add(record.image_path, key, (record.job_id, record.version))
            if not self.dry_run:
                found_sha256 = record.sha256 if unreadable else None
                self.store.retire_image(record.job_id, reason, key, found_sha256)
            return
        if aside is not None and record.image_path:
            source = self.folder / record.image_path
            target = self.moves.target(source, aside, record.job_id, record.version)
            self.moves.add(source, target, (record.job_id, record.version))
        if not self.dry_run:
            moved_to = target.relative_to(self.folder).as_posix() if target else None
            found_sha256 = record.sha256 if unreadable else None
            self.store.retire_image(record.job_id, reason, moved_to, found_sha256)

    def _retire_changed(self, old: JobRecord) -> None:
        """A job whose content changed: its image, if it has one, becomes an earlier version in
        ``replaced/``; an image of it no success accounts for goes there too, unrecorded."""
        if old.status == "succeeded":
            checked = self._check(old)
            if checked is None:
                self._retire(old, "changed", None)
            else:
                record, found = checked
                self._retire(record, "changed", REPLACED_DIR, unreadable=found == "unreadable")
            return
        if self.remote is not None:
            key = self.remote.stray(old.job_id)
            if key is not None:
                target = self.remote.target(key, REPLACED_DIR, old.job_id, old.version)
                self.remote.add(key, target)
            return
        stray = find_image(self.images_dir, old.job_id)
        if stray is not None and stray not in self.moves.sources:
            self.moves.add(stray, self.moves.target(stray, REPLACED_DIR, old.job_id, old.version))

    def _adopt(self, job: Job) -> bool:
        names = self.unrecorded.pop(job.id, None)
        if names is None:
            return False
        if self.remote is not None:
            adopted = self.remote.adopt(job, names)
            if adopted and self.dry_run:
                self._count_adoption_charge(job.id)
            return bool(adopted)
        paths = [self.images_dir / name for name in names]
        paths = [p for p in paths if p not in self.moves.sources and p.is_file()]
        if not paths:
            return False
        path = paths[0]
        stat = ImageStat.of(path.stat())
        relative = path.relative_to(self.folder).as_posix()
        image = adoptable(job, path.read_bytes(), relative, stat)
        if image is None:
            if not self.dry_run:
                path.unlink()  # not a finished image of this job: it will be made again
            return False
        if self.dry_run:
            self._count_adoption_charge(job.id)
            return True
        self.store.adopt(job.id, image)
        return True

    def _count_adoption_charge(self, job_id: str) -> None:
        """Book, as :meth:`Store.adopt` would, the attempt that made an adopted image."""
        charge = self.store.adoption_charge(job_id)
        if charge is not None:
            state, cost_micro_usd = charge
            self.adopted_confirmed_micro_usd += PRICE_PER_IMAGE_MICRO_USD
            # settle_in_flight() would first have made one in flight a possible charge
            was_possible = PRICE_PER_IMAGE_MICRO_USD if state == "in_flight" else cost_micro_usd
            self.adopted_possible_micro_usd += was_possible
