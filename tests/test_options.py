"""Options: the CLI's defaults, checked on construction, and turned into the lifecycle's
RunOptions with the key and base URL the CLI would use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from runner.cli.parser import flag
from runner.core.options import EMULATOR_KEY, Options, run_options
from runner.errors import CredentialsError, OptionsError, RunnerError
from runner.http.client import DEFAULT_BASE_URL
from runner.library import OptionFields


def test_the_defaults_are_the_clis() -> None:
    assert Options.defaults() == {
        "concurrency": 8,
        "max_attempts": 5,
        "timeout_s": 300,
        "on_ambiguous": "retry",
        "max_retry_after_s": 120,
        "grace_s": 60,
        "max_cost_usd": None,
        "budget": None,
        "dry_run": False,
        "max_outage_s": 600,
        "retry_failed": False,
        "only": frozenset(),
        "redo_edited": False,
        "rpm": None,
        "base_url": None,
        "api_key": None,
        "emulate": False,
        "state": None,
        "ray_address": None,
        "workers": 0,
    }


def test_run_takes_every_field_as_a_typed_keyword() -> None:
    assert get_type_hints(OptionFields) == get_type_hints(Options)
    assert list(get_type_hints(OptionFields)) == [f.name for f in dataclasses.fields(Options)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
        ({"concurrency": 2.5}, "concurrency must be a whole number, got 2.5"),
        ({"max_attempts": True}, "max_attempts must be a whole number, got True"),
        ({"timeout_s": 0}, "timeout_s must be more than 0, got 0"),
        ({"grace_s": float("nan")}, "grace_s must be more than 0, got nan"),
        ({"max_retry_after_s": "60"}, "max_retry_after_s must be a number, got '60'"),
        ({"max_outage_s": -1}, "max_outage_s must be more than 0, got -1"),
        ({"rpm": 0}, "rpm must be more than 0, got 0"),
        ({"max_cost_usd": -0.01}, "max_cost_usd must be at least 0, got -0.01"),
        ({"on_ambiguous": "skip"}, "on_ambiguous must be retry or fail, got 'skip'"),
        ({"only": {"server_error"}}, "only narrows retry_failed; add retry_failed"),
        ({"only": "server_error", "retry_failed": True}, "only must be a set of causes"),
        ({"base_url": 8000}, "base_url must be a string"),
        ({"base_url": "ftp://x/v1"}, "base_url must be an http(s) URL with a host"),
        ({"base_url": "not a url"}, "base_url must be an http(s) URL with a host"),
        ({"base_url": "https:///v1"}, "base_url must be an http(s) URL with a host"),
        ({"base_url": "http://h:99999/v1"}, "base_url must be an http(s) URL with a host"),
        ({"retry_failed": "no"}, "retry_failed must be True or False, got 'no'"),
        ({"dry_run": 1}, "dry_run must be True or False, got 1"),
        ({"emulate": None}, "emulate must be True or False, got None"),
        ({"only": None}, "only must be a set of causes"),
    ],
)
def test_invalid_options_are_refused_on_construction(values: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError) as caught:
        Options(**values)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RunnerError)


def test_a_message_names_the_options_as_the_cli_spells_them() -> None:
    with pytest.raises(OptionsError) as caught:
        Options(only=frozenset({"server_error"}))
    assert caught.value.spelled(flag) == "--only narrows --retry-failed; add --retry-failed"


def test_a_bad_base_url_is_named_as_the_cli_spells_it() -> None:
    with pytest.raises(OptionsError) as caught:
        Options(base_url="ftp://x/{v1}")
    assert caught.value.spelled(flag) == (
        f"--base-url must be an http(s) URL with a host, such as {DEFAULT_BASE_URL}, "
        "got 'ftp://x/{v1}'"
    )
    assert Options(base_url="").base_url == ""  # as an empty variable: not set


def test_only_becomes_a_frozenset_and_the_key_stays_out_of_repr() -> None:
    options = Options(retry_failed=True, only=["server_error", "timeout"], api_key="sk-secret-1")
    assert options.only == frozenset({"server_error", "timeout"})
    assert options.max_cost_usd is None and Options(max_cost_usd=0).max_cost_usd == 0
    assert "sk-secret" not in repr(options)


def test_the_key_stays_out_of_the_repr_of_what_the_run_is_given(tmp_path: Path) -> None:
    """RunOptions and its ClientConfig carry the key to the client: a repr of them (in a
    traceback's locals, a debug log) must not show it."""
    key = "sk-secret-canary-2"
    run = run_options(Options(api_key=key), tmp_path / "out")
    assert run.client.api_key == key
    assert key not in repr(run) and key not in repr(run.client)


def test_run_options_carry_every_option(tmp_path: Path) -> None:
    options = Options(
        concurrency=3,
        max_attempts=2,
        timeout_s=9.0,
        on_ambiguous="fail",
        max_retry_after_s=7.0,
        grace_s=4.0,
        max_cost_usd=1.5,
        max_outage_s=30.0,
        retry_failed=True,
        only=frozenset({"server_error"}),
        rpm=50.0,
        base_url="http://localhost:1/v1",
        api_key="sk-explicit-123",
    )
    prepared = run_options(options, tmp_path, environ={})
    assert prepared.out_dir == tmp_path
    assert (prepared.client.base_url, prepared.client.api_key) == (
        "http://localhost:1/v1",
        "sk-explicit-123",
    )
    assert prepared.client.timeout_s == 9.0
    assert (prepared.retry.max_attempts, prepared.retry.on_ambiguous) == (2, "fail")
    assert prepared.retry.max_retry_after_s == 7.0
    assert prepared.breaker.max_outage_s == 30.0 and prepared.pacer.ceiling_rpm == 50.0
    assert (prepared.concurrency, prepared.grace_s, prepared.max_cost_usd) == (3, 4.0, 1.5)
    assert prepared.retry_failed and prepared.retry_only == frozenset({"server_error"})
    assert not prepared.dry_run


def test_the_key_and_base_url_are_looked_up_as_the_cli_looks_them_up(tmp_path: Path) -> None:
    def lookup(options: Options, **environ: str) -> tuple[str, str]:
        client = run_options(options, tmp_path, environ=environ).client
        return client.base_url, client.api_key

    assert lookup(Options(), IMAGE_RUNNER_API_KEY="sk-runner-1") == (
        DEFAULT_BASE_URL,
        "sk-runner-1",
    )
    # A key given in Python goes where IMAGE_RUNNER_API_KEY would, and wins over it.
    assert lookup(Options(api_key="sk-mine-1"), IMAGE_RUNNER_API_KEY="sk-runner-1") == (
        DEFAULT_BASE_URL,
        "sk-mine-1",
    )
    assert lookup(Options(api_key="sk-mine-1"), IMAGE_RUNNER_BASE_URL="http://h/v1") == (
        "http://h/v1",
        "sk-mine-1",
    )
    # An OpenAI key is never sent to the default provider.
    with pytest.raises(CredentialsError, match="OPENAI_BASE_URL"):
        lookup(Options(), OPENAI_API_KEY="sk-openai-1")
    assert lookup(Options(dry_run=True)) == (DEFAULT_BASE_URL, "")  # sends nothing: no key
    # The emulator gets a key of its own, never the user's.
    assert lookup(Options(emulate=True), IMAGE_RUNNER_API_KEY="sk-runner-1")[1] == EMULATOR_KEY
    with pytest.raises(CredentialsError, match="no API key"):
        lookup(Options())


def test_a_state_url_must_be_postgresql_and_its_password_is_never_shown() -> None:
    assert Options(state="postgresql://runner@db.internal:5432/images").state is not None
    with pytest.raises(OptionsError) as refused:
        Options(state="mysql://runner:hunter2-secret@db/images")
    message = refused.value.spelled(flag)
    assert "--state must be a PostgreSQL URL" in message
    assert "hunter2-secret" not in message and "***" in message
    prepared = run_options(Options(state="postgres://u:pw-1234@h/db", emulate=True), Path("o"))
    assert prepared.state_url == "postgres://u:pw-1234@h/db"
    assert "pw-1234" not in repr(prepared) and "pw-1234" not in repr(
        Options(state="postgres://u:pw-1234@h/db")
    )
