"""The finished folder the scale benchmark reruns (:mod:`bench.finished`), made small: it must be
one a rerun takes as finished the way it takes a real run's, every image's stat checked and
none re-hashed, and no request sent (speed is for ``make bench``)."""

from __future__ import annotations

from pathlib import Path

from bench.emulator import EmulatorProcess
from bench.finished import SEED_JOBS, make_finished
from bench.procs import run_runner, succeeded
from runner.core.plan import make_plan
from runner.manifest import load_manifest
from runner.store.sqlite import SqliteStore

JOBS = SEED_JOBS + 25


def test_a_made_folder_is_finished_for_the_plan_and_for_a_real_rerun(tmp_path: Path) -> None:
    with EmulatorProcess() as emulator:
        seed_mark = emulator.mark()
        # 10 links to each copy of the image: three copies, each with its own recorded stat
        folder = make_finished(tmp_path, JOBS, "1280x544", emulator.base_url, links_per_file=10)
        assert emulator.mark() - seed_mark == SEED_JOBS
        images = sorted(p.name for p in (folder.out_dir / "images").iterdir())
        assert len(images) == JOBS
        assert len(list((folder.out_dir / "thumbs").iterdir())) == JOBS
        assert len(list(folder.templates_dir.iterdir())) == 3

        manifest = load_manifest(folder.manifest)
        try:
            with SqliteStore.open_for_dry_run(folder.out_dir) as store:
                plan = make_plan(manifest, store, dry_run=True)
        finally:
            manifest.close()
        assert (len(plan.todo), plan.done, plan.rehashed) == (0, JOBS, 0)

        mark = emulator.mark()
        rerun = run_runner(
            folder.manifest, folder.out_dir, emulator.base_url, concurrency=4, timeout_s=120
        )
        assert rerun.ok, rerun.failure()
        assert succeeded(rerun) == JOBS
        assert f"0 to do, {JOBS} done before" in rerun.stderr
        assert emulator.mark() == mark
    folder.remove()
    assert list(tmp_path.iterdir()) == []
