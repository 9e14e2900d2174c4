"""Versions at their edges, end to end on the emulator: --redo-edited leaves an approved edit
alone; a file in an image's place that does not decode is no edit (kept in edited/, the job
made again); a move is finished only when recorded as not done (a user's cleaned-out rejected/
is not looked for again), a crash-window file follows its version even when the prompt then
changes (a dry run planning the same, moving nothing), and a batch's moves are made durable
before they are recorded as done."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from runner.core import versions as versions_module
from runner.core.plan import make_plan
from runner.emulator import Emulator
from runner.images.verify import inspect_image
from runner.manifest.load import load_manifest
from runner.store.sqlite import SqliteStore
from tests.conftest import db_exec, db_rows, folder_state, run_manifest, write_manifest
from tests.test_cli import run_cli
from tests.test_versions import (
    IDS,
    crash_before_the_move,
    decide,
    five_shots,
    results,
    retouch,
    run_with,
    sha256,
)


def moves(out: Path) -> list[tuple[object, ...]]:
    return db_rows(out, "SELECT job_id, version, image_path, reason, moved FROM versions")


async def test_redo_edited_leaves_an_approved_edit_alone(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    for i in ("shot-1", "shot-2"):
        retouch(out / "images" / f"{i}.png")
    await run_manifest(manifest, out, emulator.base_url)  # both kept as version 2
    decide(out, "approved", "shot-2")  # the edit is the image the user wants
    approved = (out / "images" / "shot-2.png").read_bytes()

    report = await run_with(manifest, out, emulator.base_url, redo_edited=True)
    assert report.plan.redo_edited == ["shot-1"] and len(emulator.requests) == 6
    assert (out / "images" / "shot-2.png").read_bytes() == approved
    assert not (out / "edited" / "shot-2.v2.png").exists()
    row = results(out).loc["shot-2"]
    assert (row["version"], row["review"], bool(row["edited"])) == (2, "approved", True)


async def test_a_file_that_does_not_decode_is_kept_aside_and_made_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    empty, cut = out / "images" / "shot-1.png", out / "images" / "shot-3.png"
    empty.write_bytes(b"")  # a full disk, a sync tool's placeholder
    cut.write_bytes(cut.read_bytes()[:200])  # a copy cut short
    cut_bytes = cut.read_bytes()

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.unreadable == ["shot-1", "shot-3"] and not report.plan.edited
    assert len(emulator.requests) == 7 and report.plan.done == 3
    assert (out / "edited" / "shot-1.v1.png").read_bytes() == b""
    assert (out / "edited" / "shot-3.v1.png").read_bytes() == cut_bytes
    assert db_rows(out, "SELECT job_id, sha256, width, height, reason, moved FROM versions") == [
        ("shot-1", hashlib.sha256(b"").hexdigest(), None, None, "unreadable", 1),
        ("shot-3", hashlib.sha256(cut_bytes).hexdigest(), None, None, "unreadable", 1),
    ]
    table = results(out)
    assert list(table["version"]) == [1, 2, 1, 2, 1] and not table["edited"].any()
    for path in (empty, cut):
        assert inspect_image(path).width == 1280
        assert table.loc[path.stem, "sha256"] == sha256(path)

    exported = run_cli("export", out, tmp_path / "dataset")
    assert exported.returncode == 0, exported.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "dataset").rglob("shot-*.png")}
    assert len(sizes) == 5 and min(sizes.values()) > 0


def test_the_cli_says_what_it_did_with_a_file_that_does_not_decode(tmp_path: Path) -> None:
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    assert run_cli("run", manifest, "--out", out, "--emulate", "--no-progress").returncode == 0
    (out / "images" / "shot-4.png").write_bytes(b"")

    again = run_cli("run", manifest, "--out", out, "--emulate", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "1 unreadable (not an image), made again" in again.stderr
    assert "1 image file that did not decode: made again (kept in " in again.stdout
    assert "1 request this run" in again.stdout
    (out / "images" / "shot-2.png").write_bytes(b"not a png")
    summary = json.loads(
        run_cli("run", manifest, "--out", out, "--emulate", "--no-progress", "--json").stdout
    )
    assert summary["versions"]["unreadable_redone"] == 1
    assert summary["counts"]["requests"] == 1


async def test_a_version_whose_file_the_user_deleted_is_not_looked_for(
    tmp_path: Path, emulator: Emulator
) -> None:
    """The rejected image moved, then rejected/ cleaned out by the user: an image of the same
    bytes found later for the pending job (here put back as a crash between the rename and the
    commit would leave it) is that job's, adopted, not taken for an unfinished move."""
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    image = out / "images" / "shot-3.png"
    first = image.read_bytes()
    decide(out, "rejected", "shot-3")
    await run_manifest(manifest, out, emulator.base_url)
    assert moves(out) == [("shot-3", 1, "rejected/shot-3.v1.png", "rejected", 1)]
    shutil.rmtree(out / "rejected")
    db_exec(out, "UPDATE jobs SET status = 'pending', sha256 = NULL WHERE job_id = 'shot-3'")
    image.write_bytes(first)

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.adopted == 1 and not report.plan.todo and len(emulator.requests) == 6
    assert image.read_bytes() == first and not (out / "rejected").exists()


async def test_a_crash_window_file_follows_its_version_when_the_prompt_changes(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rejection is committed, the process dies before the file moves, and the user then
    changes the job's prompt: the file goes where its versions row says, not to replaced/
    under the next version's name with no row."""
    manifest, out, _, rejected, inode = await crash_before_the_move(
        tmp_path, emulator.base_url, monkeypatch
    )
    assert moves(out) == [("shot-3", 1, "rejected/shot-3.v1.png", "rejected", 0)]
    jobs = [{"id": i, "prompt": f"a picture of {i}", "size": "1280x544"} for i in IDS]
    jobs[3]["prompt"] = "another picture"
    manifest = write_manifest(tmp_path, jobs)
    before = folder_state(out)
    dry = await run_with(manifest, out, emulator.base_url, dry_run=True)
    assert folder_state(out) == before

    report = await run_manifest(manifest, out, emulator.base_url)
    assert report.plan.changed == dry.plan.changed == ["shot-3"]
    assert report.plan.adopted == dry.plan.adopted == 0
    assert [j.id for j in dry.plan.todo] == [j.id for j in report.plan.todo] == ["shot-3"]
    assert len(emulator.requests) == 6
    kept = out / "rejected" / "shot-3.v1.png"
    assert (sha256(kept), kept.stat().st_ino) == (rejected, inode)
    assert not (out / "replaced").exists()
    assert moves(out) == [("shot-3", 1, "rejected/shot-3.v1.png", "rejected", 1)]
    assert results(out).loc["shot-3", "version"] == 2


async def test_moves_are_durable_before_they_are_recorded_done(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both folders of every move, and the output folder that gained rejected/, are fsynced
    before the moves are recorded as done: a power cut cannot undo a move recorded done."""
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    decide(out, "rejected", "shot-0", "shot-4")
    events: list[tuple[str, object]] = []
    fsync_dir, mark_moved = versions_module.fsync_dir, SqliteStore.mark_moved

    def fsync_spy(folder: Path) -> None:
        events.append(("fsync", folder))
        fsync_dir(folder)

    def mark_spy(store: SqliteStore, versions: list[tuple[str, int]]) -> None:
        events.append(("recorded", sorted(versions)))
        mark_moved(store, versions)

    monkeypatch.setattr(versions_module, "fsync_dir", fsync_spy)
    monkeypatch.setattr(SqliteStore, "mark_moved", mark_spy)
    await run_manifest(manifest, out, emulator.base_url)
    *synced, recorded = events
    assert recorded == ("recorded", [("shot-0", 1), ("shot-4", 1)])
    assert {folder for _, folder in synced} == {out, out / "images", out / "rejected"}


async def test_a_crash_after_the_move_before_it_is_recorded_done(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is in rejected/ but its move is not recorded as done: the next run records it
    done and makes the job again, without touching the kept file."""
    manifest, out = five_shots(tmp_path), tmp_path / "out"
    await run_manifest(manifest, out, emulator.base_url)
    decide(out, "rejected", "shot-2")

    def crash(store: SqliteStore, versions: list[tuple[str, int]]) -> None:
        raise SystemExit("killed before recording the move")

    with monkeypatch.context() as patch:
        patch.setattr(SqliteStore, "mark_moved", crash)
        with SqliteStore.open(out) as store, pytest.raises(SystemExit):
            make_plan(load_manifest(manifest), store)
    kept = out / "rejected" / "shot-2.v1.png"
    inode = kept.stat().st_ino
    assert moves(out) == [("shot-2", 1, "rejected/shot-2.v1.png", "rejected", 0)]

    report = await run_manifest(manifest, out, emulator.base_url)
    assert [j.id for j in report.plan.todo] == ["shot-2"] and len(emulator.requests) == 6
    assert kept.stat().st_ino == inode and sorted(p.name for p in kept.parent.iterdir()) == [
        "shot-2.v1.png"
    ]
    assert moves(out) == [("shot-2", 1, "rejected/shot-2.v1.png", "rejected", 1)]
