"""Which key goes to which host: every combination of keys and base URLs the runner reads.

End-to-end checks (the real command, a loopback emulator standing in for the default provider)
are in ``tests/test_security.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import runner
from runner.core.options import Options, run_options
from runner.errors import CredentialsError, RunnerError
from runner.http.client import DEFAULT_BASE_URL
from runner.http.credentials import Credentials, resolve_credentials

FLAG = "https://flag.example/v1"
RUNNER_URL = "https://runner-url.example/v1"
OPENAI_URL = "https://openai-url.example/v1"
RK, OK = "IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY"


@pytest.mark.parametrize(
    ("environ", "flag", "expected"),
    [
        # IMAGE_RUNNER_API_KEY: --base-url > IMAGE_RUNNER_BASE_URL > the default provider
        ({RK: "kr"}, None, Credentials(DEFAULT_BASE_URL, "kr", RK)),
        ({RK: "kr"}, FLAG, Credentials(FLAG, "kr", RK)),
        ({RK: "kr", "IMAGE_RUNNER_BASE_URL": RUNNER_URL}, None, Credentials(RUNNER_URL, "kr", RK)),
        ({RK: "kr", "IMAGE_RUNNER_BASE_URL": RUNNER_URL}, FLAG, Credentials(FLAG, "kr", RK)),
        # ... and never to OPENAI_BASE_URL, which belongs to OPENAI_API_KEY
        ({RK: "kr", "OPENAI_BASE_URL": OPENAI_URL}, None, Credentials(DEFAULT_BASE_URL, "kr", RK)),
        # IMAGE_RUNNER_API_KEY wins over OPENAI_API_KEY, whatever OPENAI_BASE_URL says
        ({RK: "kr", OK: "ko"}, None, Credentials(DEFAULT_BASE_URL, "kr", RK)),
        (
            {RK: "kr", OK: "ko", "OPENAI_BASE_URL": OPENAI_URL},
            None,
            Credentials(DEFAULT_BASE_URL, "kr", RK),
        ),
        # OPENAI_API_KEY: --base-url > OPENAI_BASE_URL > IMAGE_RUNNER_BASE_URL, never the default
        ({OK: "ko", "OPENAI_BASE_URL": OPENAI_URL}, None, Credentials(OPENAI_URL, "ko", OK)),
        ({OK: "ko"}, FLAG, Credentials(FLAG, "ko", OK)),
        ({OK: "ko", "OPENAI_BASE_URL": OPENAI_URL}, FLAG, Credentials(FLAG, "ko", OK)),
        ({OK: "ko", "IMAGE_RUNNER_BASE_URL": RUNNER_URL}, None, Credentials(RUNNER_URL, "ko", OK)),
        (  # the OpenAI key goes to its own base URL, not to the runner's
            {OK: "ko", "IMAGE_RUNNER_BASE_URL": RUNNER_URL, "OPENAI_BASE_URL": OPENAI_URL},
            None,
            Credentials(OPENAI_URL, "ko", OK),
        ),
        # an empty variable counts as unset
        (
            {RK: "", OK: "ko", "OPENAI_BASE_URL": OPENAI_URL},
            None,
            Credentials(OPENAI_URL, "ko", OK),
        ),
        ({RK: "kr", "IMAGE_RUNNER_BASE_URL": ""}, "", Credentials(DEFAULT_BASE_URL, "kr", RK)),
    ],
)
def test_which_key_goes_to_which_url(
    environ: dict[str, str], flag: str | None, expected: Credentials
) -> None:
    assert resolve_credentials(environ, flag) == expected


@pytest.mark.parametrize(
    ("environ", "flag", "named"),
    [
        # an OpenAI key and no base URL: the default provider is a third party, refuse
        ({OK: "sk-openai-0123456789"}, None, ("OPENAI_BASE_URL", "--base-url", RK)),
        ({OK: "sk-openai-0123456789", "OPENAI_BASE_URL": ""}, None, ("OPENAI_BASE_URL", RK)),
        ({OK: "sk-openai-0123456789", RK: ""}, "", ("OPENAI_BASE_URL", RK)),
        # no key at all, whatever URL is set
        ({}, None, (RK, OK)),
        ({"OPENAI_BASE_URL": OPENAI_URL}, None, (RK, OK)),
        ({}, FLAG, (RK, OK)),
        # a key with a stray newline or space: name the variable it came from
        ({RK: "sk-runner-0123456789\n"}, None, (RK, "spaces or control characters")),
        (
            {OK: " sk-openai-0123456789", "OPENAI_BASE_URL": OPENAI_URL},
            None,
            (OK, "spaces or control characters"),
        ),
    ],
)
def test_refused_with_a_message_naming_what_to_set(
    environ: dict[str, str], flag: str | None, named: tuple[str, ...]
) -> None:
    with pytest.raises(CredentialsError) as refused:
        resolve_credentials(environ, flag)
    assert isinstance(refused.value, RunnerError)  # the CLI's usage error: exit 2
    message = str(refused.value)
    for name in named:
        assert name in message
    for key in ("sk-openai-0123456789", "sk-runner-0123456789"):
        assert key not in message


@pytest.mark.parametrize(
    "environ",
    [{}, {OK: "sk-openai-0123456789"}, {"OPENAI_BASE_URL": OPENAI_URL}],
)
def test_without_a_usable_key_a_run_that_sends_nothing_gets_an_empty_key(
    environ: dict[str, str],
) -> None:
    """A dry run needs no key; an OpenAI key with no URL to pair it with is not handed on."""
    credentials = resolve_credentials(environ, None, key_required=False)
    assert credentials.api_key == ""
    assert credentials.key_source is None


def test_a_usable_key_is_kept_when_none_is_required() -> None:
    environ = {OK: "ko", "OPENAI_BASE_URL": OPENAI_URL}
    assert resolve_credentials(environ, None, key_required=False) == Credentials(
        OPENAI_URL, "ko", OK
    )


def test_no_repr_on_the_way_from_options_to_the_report_shows_the_key(tmp_path: Path) -> None:
    """The key passes through Credentials, Options, RunOptions and ClientConfig to the client,
    and a run's report is made from them: a repr of any (in a traceback's locals, a debug log,
    a notebook's output) must not show it."""
    canary = "sk-canary-repr-0123456789"
    credentials = resolve_credentials({RK: canary})
    options = Options(api_key=canary)
    prepared = run_options(options, tmp_path / "out", environ={})
    assert credentials.api_key == canary == prepared.client.api_key
    with runner.Emulator() as emu:
        report = runner.run(
            [{"prompt": "a fox", "size": "1280x544"}],
            out=tmp_path / "out",
            base_url=emu.url,
            api_key=canary,
        )
    assert report.succeeded == 1
    shown = [credentials, options, prepared, prepared.client, report, report.details]
    for value in shown:
        assert canary not in repr(value)


@pytest.mark.parametrize(
    ("environ", "flag", "named"),
    [
        ({RK: "kr"}, "ftp://x/v1", "--base-url (base_url= in Python) must be an http(s) URL"),
        ({RK: "kr", "IMAGE_RUNNER_BASE_URL": "not a url"}, None, "IMAGE_RUNNER_BASE_URL must be"),
        ({OK: "ko", "OPENAI_BASE_URL": "api.example/v1"}, None, "OPENAI_BASE_URL must be"),
        ({"IMAGE_RUNNER_BASE_URL": "http://h:99999/v1"}, None, "IMAGE_RUNNER_BASE_URL must be"),
    ],
)
def test_a_base_url_that_cannot_be_sent_to_is_refused_naming_its_source(
    environ: dict[str, str], flag: str | None, named: str
) -> None:
    """Not http(s) with a host: every request would fail before leaving, yet be retried and
    counted; refused up front, even for a run that sends nothing."""
    with pytest.raises(CredentialsError, match=re.escape(named)):
        resolve_credentials(environ, flag, key_required=False)


def test_a_base_url_the_key_does_not_go_to_is_not_checked() -> None:
    """OPENAI_BASE_URL may be set for other tools, to what only they read."""
    environ = {RK: "kr", "OPENAI_BASE_URL": "not for us"}
    assert resolve_credentials(environ).base_url == DEFAULT_BASE_URL
