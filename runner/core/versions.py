"""Earlier images of a job, on disk: where they go, and how they get there crash-safely.

A new image of a job takes the place of its current one when a reviewer rejected it (the old
file goes to ``rejected/``), when the user asks to redo an image edited by hand
(``--redo-edited``: to ``edited/``), or when the job's content changed in the manifest (to
``replaced/``). The old file is named ``<job id>.v<N>.<ext>``, N its version, and never
overwrites a file already there: ``<job id>.v<N>.1.<ext>``, ``.2``, ... Every one of them was
paid for, so every one is kept.

**Record first, move after, then record the move.** The planner records the earlier version,
with the path its file is going to, in the planning batch's transaction
(:meth:`~runner.store.base.Store.retire_image`), as a move not done yet; :class:`Moves` moves
the files only once that batch has committed, fsyncs the folders they left and entered, and
then records the moves as done (:meth:`~runner.store.base.Store.mark_moved`). A crash in
between leaves a version whose move is recorded as not done: the next plan, before anything
else (:meth:`Moves.finish_interrupted`), moves the file still in ``images/`` to where its
version is recorded, if its sha256 is that version's, and records the move done either way. Only
a move recorded as not done is finished: a version whose file a user later deleted from
``rejected/`` is never looked for again, so an image that happens to match it is not taken away
from its job. The other order would be worse: a crash after the move and before the commit
would leave a success whose image is gone, made again as missing, and a file in ``rejected/``
that nothing records.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Final

from runner.images.files import fsync_dir, sha256_file
from runner.store.base import Store

REJECTED_DIR: Final = "rejected"
EDITED_DIR: Final = "edited"
REPLACED_DIR: Final = "replaced"


class Moves:
    """The image files a planning batch moves aside once its records are durable; on a dry
    run, those it would move (never moved, but no longer in ``images/`` as far as the plan is
    concerned)."""

    def __init__(self, store: Store, *, dry_run: bool) -> None:
        self.store = store
        self.folder = store.folder
        self.dry_run = dry_run
        # (source, target, the (job id, version) recorded as going there, if one is)
        self._pending: list[tuple[Path, Path, tuple[str, int] | None]] = []
        self.sources: set[Path] = set()  # files moved aside, or to be, by this plan
        self._targets: set[Path] = set()  # names promised to files not moved yet

    def target(self, source: Path, aside: str, job_id: str, version: int) -> Path:
        """Where ``source``, version ``version`` of ``job_id``, goes in the folder ``aside``:
        a name no file has, nor one promised to another file of this plan."""
        for name in aside_names(aside, job_id, version, source.suffix):
            target = self.folder / name
            if target not in self._targets and not target.exists():
                return target
        raise AssertionError("aside_names() never ends")

    def add(self, source: Path, target: Path, version: tuple[str, int] | None = None) -> None:
        """Move ``source`` to ``target`` at :meth:`finish`; ``version`` (job id, version) is
        the earlier version recorded as going there, if one is, to record as moved then."""
        self._pending.append((source, target, version))
        self._targets.add(target)
        self.sources.add(source)

    def discard(self) -> None:
        """Forget the moves of a batch that did not commit."""
        self._pending.clear()
        self._targets.clear()

    def finish(self) -> None:
        """Move the files of the batch that just committed, durably, and record their versions
        as moved (a dry run moves nothing)."""
        pending, self._pending = self._pending, []
        self._targets.clear()
        if self.dry_run or not pending:
            return
        for source, target, _ in pending:
            _move(source, target)
        self._done([(s, t) for s, t, _ in pending], [v for _, _, v in pending if v is not None])

    def finish_interrupted(self, images_dir: Path) -> None:
        """Finish the moves a crash cut off: each earlier version recorded as not moved yet
        whose file is still in ``images_dir`` (its job's image name, with the sha256 recorded)
        goes where the version is recorded; every such move is then recorded as done, the
        file found or not (a dry run only counts the file as moved aside)."""
        moved: list[tuple[Path, Path]] = []
        done: list[tuple[str, int]] = []
        for kept in self.store.unmoved_versions():
            target = self.folder / kept.image_path
            source = images_dir / f"{kept.job_id}{target.suffix}"
            if not target.exists() and source.is_file() and sha256_file(source) == kept.sha256:
                self.sources.add(source)
                moved.append((source, target))
            done.append((kept.job_id, kept.version))
        if self.dry_run or not done:
            return
        for source, target in moved:
            _move(source, target)
        self._done(moved, done)

    def _done(self, moved: list[tuple[Path, Path]], versions: list[tuple[str, int]]) -> None:
        """Make the renames of ``moved`` durable (both folders of each, and the output folder,
        which may have gained ``rejected/``...), then record the moves of ``versions`` as done:
        never recorded before a power cut could undo them."""
        folders = {path.parent for pair in moved for path in pair}
        if folders:
            folders.add(self.folder)
        for folder in folders:
            fsync_dir(folder)
        if versions:
            self.store.mark_moved(versions)


def aside_names(aside: str, job_id: str, version: int, ext: str) -> Iterator[str]:
    """The names, in order, an earlier version (``ext`` with its dot) may take in the folder
    ``aside``: ``<job id>.v<N><ext>``, then ``<job id>.v<N>.1<ext>``, ``.2``...; the first
    free one is taken (on disk or in an object store alike)."""
    yield f"{aside}/{job_id}.v{version}{ext}"
    for n in count(1):
        yield f"{aside}/{job_id}.v{version}.{n}{ext}"


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing left to keep
        source.replace(target)
