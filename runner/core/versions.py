"""Earlier images of a job, on disk: where they go, and how they get there crash-safely.

A new image of a job takes the place of its current one when a reviewer rejected it (the old
file goes to ``rejected/``), when the user asks to redo an image edited by hand
(``--redo-edited``: to ``edited/``), or when the job's content changed in the manifest (to
``replaced/``). The old file is named ``<job id>.v<N>.<ext>``, N its version, and never
overwrites a file already there: ``<job id>.v<N>.1.<ext>``, ``.2``, ... Every one of them was
paid for, so every one is kept.

**Record first, move after.** The planner records the earlier version, with the path its file
is going to, in the planning batch's transaction (:meth:`~runner.store.base.Store.retire_image`),
and :class:`Moves` moves the files only once that batch has committed. A crash between the
two leaves a committed version whose file is still in ``images/``, its job pending: the next
plan finds that file as an image no success accounts for, and before adopting it as the new
image of the pending job, :meth:`Moves.finish_interrupted` compares its sha256 with those of
the job's kept versions whose file is not where it was recorded: a match is that move, finished
then. The other order would be worse: a crash after the move and before the commit would leave
a success whose image is gone, made again as missing, and a file in ``rejected/`` that nothing
records.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Final

from runner.images.files import sha256_file
from runner.store.base import Store

REJECTED_DIR: Final = "rejected"
EDITED_DIR: Final = "edited"
REPLACED_DIR: Final = "replaced"


class Moves:
    """The image files a planning batch moves aside once its records are durable; on a dry
    run, those it would move (never moved, but no longer in ``images/`` as far as the plan is
    concerned)."""

    def __init__(self, folder: Path, *, dry_run: bool) -> None:
        self.folder = folder
        self.dry_run = dry_run
        self._pending: list[tuple[Path, Path]] = []
        self.sources: set[Path] = set()  # files moved aside, or to be, by this plan
        self._targets: set[Path] = set()  # names promised to files not moved yet

    def target(self, source: Path, aside: str, job_id: str, version: int) -> Path:
        """Where ``source``, version ``version`` of ``job_id``, goes in the folder ``aside``:
        a name no file has, nor one promised to another file of this plan."""
        folder = self.folder / aside
        stem, ext = f"{job_id}.v{version}", source.suffix
        target, n = folder / f"{stem}{ext}", 1
        while target in self._targets or target.exists():
            target, n = folder / f"{stem}.{n}{ext}", n + 1
        return target

    def add(self, source: Path, target: Path) -> None:
        """Move ``source`` to ``target`` at :meth:`finish`."""
        self._pending.append((source, target))
        self._targets.add(target)
        self.sources.add(source)

    def discard(self) -> None:
        """Forget the moves of a batch that did not commit."""
        self._pending.clear()
        self._targets.clear()

    def finish(self) -> None:
        """Move the files of the batch that just committed (a dry run moves nothing)."""
        pending, self._pending = self._pending, []
        self._targets.clear()
        if self.dry_run:
            return
        for source, target in pending:
            _move(source, target)

    def finish_interrupted(self, store: Store, job_id: str, paths: list[Path]) -> list[Path]:
        """Of ``paths``, image files in ``images/`` no success of ``job_id`` accounts for, move
        those that are a kept version of the job that a crash left unmoved to where that version
        is recorded; return the others."""
        kept = {
            version.sha256: self.folder / version.image_path
            for version in store.kept_versions(job_id)
            if version.sha256 and not (self.folder / version.image_path).exists()
        }
        if not kept:
            return paths
        others = []
        for path in paths:
            target = kept.pop(sha256_file(path), None)
            if target is None:
                others.append(path)
            elif self.dry_run:
                self.sources.add(path)
            else:
                _move(path, target)
        return others


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing left to keep
        source.replace(target)
