"""A finished output folder of up to a million jobs, made in minutes rather than run for an hour.

Running a million requests against the emulator takes about an hour; a rerun of a finished run
only reads what that run left. So the folder is made as follows, and then a real ``image-runner
run`` is timed on it:

1. the first :data:`SEED_JOBS` jobs of the manifest are run for real against the emulator: the
   folder then holds what a finished run leaves (checkpoint, images, thumbnails, results,
   ledger, report), written by the runner itself;
2. every other job gets its image and its report thumbnail as hard links to copies of the first
   job's, kept outside the folder (one copy per :data:`LINKS_PER_FILE` jobs: a million links
   cost directory entries, not a million images). Linking changes an inode's ctime, so the
   stat recorded is taken after the last link: a rerun then finds each image's size, mtime and
   ctime as recorded, as it finds a run's own, and skips hashing it after a real ``stat`` of
   each;
3. the checkpoint gets those jobs through the store's own writes (:meth:`SqliteStore.plan_jobs`,
   ``commit_intent``, ``commit_success`` with the image's sha256 and stat) in large
   transactions: the rows a run would have written, attempt and success for each job.

The results, ledger and report of the seed run cover only its jobs; the rerun rewrites them
for all, as every run does at its end, so what it is timed on is the same work.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.figures import say
from bench.manifests import write_csv
from bench.procs import run_child, run_runner, succeeded
from runner.core.finding import pixel_size
from runner.jobs import Job
from runner.manifest import load_manifest
from runner.provider import PRICE_PER_IMAGE_MICRO_USD
from runner.store.base import ImageStat, Outcome, SavedImage
from runner.store.sqlite import SqliteStore

SEED_JOBS = 20
CONCURRENCY = 16
SEED_TIMEOUT_S = 120.0
ADD_TIMEOUT_S = 900.0
# ext4 allows 65,000 links to a file: each copy serves this many jobs, in one transaction.
LINKS_PER_FILE = 60_000


@dataclass(frozen=True)
class FinishedFolder:
    """A finished run's folder, the manifest it ran (and the seed's), and where its image copies
    are kept."""

    manifest: Path
    seed: Path
    out_dir: Path
    templates_dir: Path
    setup_s: float

    def remove(self) -> None:
        """Delete all of it."""
        shutil.rmtree(self.out_dir, ignore_errors=True)
        shutil.rmtree(self.templates_dir, ignore_errors=True)
        self.manifest.unlink(missing_ok=True)
        self.seed.unlink(missing_ok=True)


def make_finished(
    work_dir: Path, jobs: int, size: str, base_url: str, *, links_per_file: int = LINKS_PER_FILE
) -> FinishedFolder:
    """A folder in ``work_dir`` holding a finished run of ``jobs`` jobs of ``size``: the first
    :data:`SEED_JOBS` run against the emulator at ``base_url``, the rest made as the module's
    docstring says, ``links_per_file`` jobs to each copy of the image. Raises
    :class:`RuntimeError` (having deleted what it made) when making it fails."""
    started_s = time.perf_counter()
    manifest = write_csv(work_dir / f"finished-{jobs}.csv", jobs, size)
    seed = write_csv(work_dir / f"finished-{jobs}-seed.csv", min(jobs, SEED_JOBS), size)
    out_dir = work_dir / f"finished-{jobs}"
    templates_dir = work_dir / f"finished-{jobs}-templates"
    unfinished = FinishedFolder(manifest, seed, out_dir, templates_dir, 0.0)
    first = run_runner(seed, out_dir, base_url, concurrency=CONCURRENCY, timeout_s=SEED_TIMEOUT_S)
    if not first.ok or succeeded(first) != min(jobs, SEED_JOBS):
        unfinished.remove()
        raise RuntimeError(f"the seed run failed: {first.failure()}")
    args = [str(manifest), str(out_dir), str(templates_dir), str(links_per_file)]
    added = run_child(["-m", "bench.finished", *args], timeout_s=ADD_TIMEOUT_S)
    if not added.ok:
        unfinished.remove()
        raise RuntimeError(f"adding the jobs past the seed's failed: {added.failure()}")
    setup_s = time.perf_counter() - started_s
    say(f"  a finished {jobs:,}-job folder made in {setup_s:.0f} s")
    return dataclasses.replace(unfinished, setup_s=setup_s)


def _add_jobs(manifest_path: Path, out_dir: Path, templates_dir: Path, links_per_file: int) -> None:
    """Steps 2 and 3 of the module's docstring, for the manifest's jobs past the seed's: the
    links of each chunk of jobs made in a thread while the rows of the chunk before are
    written (the kernel's work beside SQLite's). Run in a child process (:func:`main`): the
    benchmark's own process must stay small, as Linux counts its memory into each later
    child's peak RSS."""
    manifest = load_manifest(manifest_path)
    try:
        with SqliteStore.open(out_dir) as store, ThreadPoolExecutor(1) as linker:
            first = store.job_records([manifest[0].id])[manifest[0].id]
            assert first.image_path is not None and first.sha256 is not None
            image = out_dir / first.image_path
            pixels = pixel_size(image)
            assert pixels is not None
            thumb = out_dir / "thumbs" / f"{first.job_id}-{first.sha256[:12]}.webp"
            made = _Made(image.suffix, first.sha256, pixels, image, thumb)
            templates_dir.mkdir()
            behind: tuple[list[Job], Future[ImageStat]] | None = None
            for start in range(SEED_JOBS, len(manifest), links_per_file):
                chunk = manifest[start : start + links_per_file]
                copies = templates_dir / str(start)
                ids = [job.id for job in chunk]
                linking = linker.submit(made.link, copies, out_dir, ids)
                if behind is not None:
                    made.record(store, *behind)
                behind = (chunk, linking)
            if behind is not None:
                made.record(store, *behind)
    finally:
        manifest.close()


@dataclass(frozen=True)
class _Made:
    """The seed's first image, which every other job's image and thumb are links to copies of."""

    suffix: str
    sha256: str
    pixels: tuple[int, int]
    image: Path
    thumb: Path

    def link(self, copies: Path, out_dir: Path, job_ids: list[str]) -> ImageStat:
        """Copy the image and its thumb into ``copies``, link them as those of ``job_ids``;
        return the image copy's stat once its last link is made (a link changes its ctime)."""
        copies.mkdir()
        image = Path(shutil.copy2(self.image, copies / self.image.name))
        thumb = Path(shutil.copy2(self.thumb, copies / self.thumb.name))
        _link(image, out_dir / "images", [f"{job_id}{self.suffix}" for job_id in job_ids])
        _link(
            thumb, out_dir / "thumbs", [f"{job_id}-{self.sha256[:12]}.webp" for job_id in job_ids]
        )
        return ImageStat.of(image.stat())

    def record(self, store: SqliteStore, jobs: list[Job], linked: Future[ImageStat]) -> None:
        """Plan ``jobs`` and record an attempt and a success for each, in one transaction."""
        stat = linked.result()
        outcome = Outcome("confirmed", PRICE_PER_IMAGE_MICRO_USD)
        width, height = self.pixels
        with store.batch():
            store.plan_jobs(jobs)
            for job in jobs:
                attempt = store.commit_intent(job)
                saved = SavedImage(
                    f"images/{job.id}{self.suffix}", width, height, self.sha256, stat
                )
                store.commit_success(job.id, attempt, outcome, saved)


def _link(source: Path, folder: Path, names: list[str]) -> None:
    """Hard-link ``source`` as each of ``names`` in ``folder``: by names relative to open
    directories, the kernel resolves no path a million times over."""
    source_dir = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        target_dir = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:
                os.link(source.name, name, src_dir_fd=source_dir, dst_dir_fd=target_dir)
        finally:
            os.close(target_dir)
    finally:
        os.close(source_dir)


def main(argv: list[str]) -> int:
    """``python -m bench.finished MANIFEST OUT_DIR TEMPLATES_DIR LINKS_PER_FILE``."""
    manifest, out_dir, templates_dir, links_per_file = argv
    _add_jobs(Path(manifest), Path(out_dir), Path(templates_dir), int(links_per_file))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
