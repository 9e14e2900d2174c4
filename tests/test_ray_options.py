"""run --ray [ADDRESS] --workers N: the options that go together, the flags as parsed, and a
missing Ray refused before anything is read or sent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from runner.cli.main import main
from runner.cli.parser import build_parser, flag, options_from
from runner.core.options import Options, run_options
from runner.emulator import Emulator
from runner.errors import OptionsError
from tests.conftest import write_manifest

STATE = "postgresql://runner:pw-canary-77@127.0.0.1:1/runs"  # never reached: refused first


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": 4}, "--workers starts worker actors on Ray: add --ray"),
        ({"workers": 4, "state": STATE}, "--workers starts worker actors on Ray: add --ray"),
        ({"ray_address": "", "state": STATE}, "--ray needs --workers: how many worker actors"),
        (
            {"ray_address": "", "workers": 2},
            "--ray needs --state: the worker actors share the run's state in PostgreSQL",
        ),
        ({"ray_address": "", "workers": -1, "state": STATE}, "--workers must be at least 0"),
        ({"ray_address": "", "workers": 1.5, "state": STATE}, "--workers must be a whole number"),
        ({"ray_address": 6379, "workers": 2, "state": STATE}, "--ray must be a string"),
    ],
)
def test_ray_options_that_do_not_go_together_are_refused(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(OptionsError) as caught:
        Options(**values)
    assert caught.value.spelled(flag).startswith(message)


def test_ray_with_workers_and_state_go_through_to_the_run(tmp_path: Path) -> None:
    options = Options(ray_address="10.0.0.5:6379", workers=3, state=STATE, emulate=True)
    run = run_options(options, tmp_path / "out")
    assert (run.ray_address, run.workers, run.state_url) == ("10.0.0.5:6379", 3, STATE)
    assert "pw-canary-77" not in repr(run)


def test_ray_alone_means_rays_own_choice_and_an_address_is_kept() -> None:
    parser = build_parser()
    alone = parser.parse_args(["run", "m.yaml", "--ray", "--workers", "2", "--state", STATE])
    assert options_from(alone).ray_address == ""
    given = parser.parse_args(["run", "m.yaml", "--ray", "head:6379", "--workers", "2"])
    assert given.ray_address == "head:6379"
    without = parser.parse_args(["run", "m.yaml"])
    assert (without.ray_address, without.workers) == (None, 0)
    with pytest.raises(SystemExit):  # a worker joins a run: it starts no actors
        parser.parse_args(["work", "--out", "o", "--state", STATE, "--ray"])


def test_a_missing_ray_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import ray fails
    with pytest.raises(OptionsError) as caught:
        Options(ray_address="", workers=2, state=STATE)
    assert caught.value.spelled(flag) == (
        '--ray needs Ray, which is not installed here: pip install "image-runner[ray]"'
    )


async def test_the_cli_without_ray_exits_2_and_sends_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    emulator: Emulator,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "a fox"}])
    out = tmp_path / "out"
    argv = ["run", str(manifest), "--out", str(out), "--state", STATE, "--ray", "--workers", "2"]
    code = main([*argv, "--base-url", emulator.base_url, "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert 'pip install "image-runner[ray]"' in stderr and "--ray" in stderr
    assert "pw-canary-77" not in stderr
    assert not emulator.requests and not out.exists()
