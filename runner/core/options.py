"""The options of a run as a user chooses them: one flat, frozen, checked dataclass that the CLI
and the Python API share.

:class:`Options` holds the user's choices, each checked once, on construction. Its defaults are
the core's own (those of :class:`~runner.core.lifecycle.RunOptions` and of the retry, client and
breaker configurations), and the CLI's argparse defaults are read from it: no default is written
twice. :func:`run_options` turns it, with an output folder, into the nested
:class:`~runner.core.lifecycle.RunOptions` the lifecycle runs with, looking up the key and base
URL with :func:`~runner.http.credentials.resolve_credentials`: the CLI and the Python API send a
key to the same place because they go through this one function. :func:`dated` fills the
``{date}`` and ``{datetime}`` of an output folder, for both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from runner.core.admission import BreakerConfig
from runner.core.lifecycle import RunOptions
from runner.core.pacer import PacerConfig
from runner.core.retry import RetryConfig
from runner.errors import OptionsError
from runner.http import client
from runner.http.client import ClientConfig
from runner.http.credentials import (
    RUNNER_KEY,
    Credentials,
    base_url_problem,
    resolve_credentials,
)
from runner.storage.base import is_remote
from runner.store.urls import state_url_problem

# Sent to the built-in emulator, which takes any key: the user's own key is not needed there,
# so it is not sent, not even to the loopback.
EMULATOR_KEY: Final = "sk-emulator-local"
ON_AMBIGUOUS: Final = ("retry", "fail")
BUDGET_NAME_MAX: Final = 128


@dataclass(frozen=True)
class Options:
    """How to run a manifest. Every field has the CLI's default; ``Options()`` is ``image-runner
    run`` with no option. Invalid values raise :class:`~runner.errors.OptionsError` (also a
    ``ValueError``) here, before anything is read or sent."""

    concurrency: int = RunOptions.concurrency
    """Requests in flight at once (``--concurrency``)."""
    max_attempts: int = RetryConfig.max_attempts
    """Attempts per job per run, retries included (``--max-attempts``)."""
    timeout_s: float = ClientConfig.timeout_s
    """Seconds a request may take, answer included (``--timeout``)."""
    on_ambiguous: Literal["retry", "fail"] = RetryConfig.on_ambiguous
    """When a request may have been billed but brought no image (a timeout after it went out):
    ``"retry"`` it, or ``"fail"`` the job rather than risk paying twice (``--on-ambiguous``)."""
    max_retry_after_s: float = RetryConfig.max_retry_after_s
    """A Retry-After longer than this stops the run instead of holding workers
    (``--max-retry-after``)."""
    grace_s: float = RunOptions.grace_s
    """After a first stop (Ctrl-C, SIGTERM, an interrupt in a notebook), how long requests in
    flight get to finish before they are dropped (``--grace``)."""
    max_cost_usd: float | None = None
    """Cap on the spend recorded in the output folder, confirmed + possible, over all its runs;
    ``None``: no cap (``--max-cost``). With ``state``: the cap of the run's budget in the
    database, for all its workers, which stays as set until a run sets it again; ``None``
    keeps the cap the budget has (none for a new one)."""
    budget: str | None = None
    """With ``state``: the budget, by name, this run spends from, shared with every run that
    names it (created if new); ``max_cost_usd`` sets its cap. ``None``: the run's own budget,
    named after its output location (``--budget``)."""
    dry_run: bool = False
    """Only plan: what would be sent and what it would cost; sends nothing, changes nothing on
    disk, needs no key (``--dry-run``)."""
    max_outage_s: float = BreakerConfig.max_outage_s
    """How long the provider may stay down (nearly every request failing) before the run stops
    (``--max-outage``)."""
    retry_failed: bool = False
    """Also retry the jobs that failed for good in earlier runs (``--retry-failed``)."""
    only: frozenset[str] = frozenset()
    """With ``retry_failed``: only the failed jobs with one of these causes, as in the results'
    ``error_cause`` column, e.g. ``{"server_error"}`` (``--only``)."""
    redo_edited: bool = False
    """Make again the images found edited by hand (kept as they are by default), each moved
    to ``edited/`` first; one approved in review is never made again (``--redo-edited``)."""
    rpm: float | None = None
    """At most this many requests a minute per endpoint; below that, and with ``None``, the
    runner adapts to the provider's rate limit by itself (``--rpm``)."""
    base_url: str | None = None
    """The API's base URL, ending in ``/v1``; ``None``: from the environment, as the key's
    table in the README says (``--base-url``)."""
    api_key: str | None = field(default=None, repr=False)
    """The API key; ``None``: from ``IMAGE_RUNNER_API_KEY`` (or ``OPENAI_API_KEY`` with a base
    URL). A key given here is sent where ``IMAGE_RUNNER_API_KEY`` would be: to ``base_url``,
    else ``$IMAGE_RUNNER_BASE_URL``, else the default provider. Never shown in ``repr``."""
    emulate: bool = False
    """Run against the built-in emulator, started for the run: no key, no network
    (``--emulate``)."""
    state: str | None = field(default=None, repr=False)
    """Where the run's state lives when several workers share it: a PostgreSQL URL
    (``postgresql://user@host/db``; a password in it is never shown). ``None``: the SQLite
    checkpoint in the output folder, one worker (``--state``)."""
    ray_address: str | None = None
    """Run the jobs on ``workers`` worker actors on Ray instead of in this process
    (``--ray [ADDRESS]``): the address of the cluster, or ``""`` for Ray's own choice
    (``$RAY_ADDRESS``, else a Ray started on this machine); ``None``: no Ray. Needs ``state``,
    and Ray installed (``pip install "image-runner[ray]"``)."""
    workers: int = RunOptions.workers
    """How many worker actors ``ray_address`` starts, each working as ``image-runner work``
    does (``--workers``); 0 without Ray."""

    def __post_init__(self) -> None:
        # Not truthiness: retry_failed="no" would re-send, and pay for, every failed job.
        for name in ("dry_run", "retry_failed", "redo_edited", "emulate"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(
                    f"{{0}} must be True or False, got {_shown(getattr(self, name))}", name
                )
        object.__setattr__(self, "only", _causes(self.only))
        for name in ("concurrency", "max_attempts"):
            _check_number(self, name, integer=True, least=1)
        for name in ("timeout_s", "max_retry_after_s", "grace_s", "max_outage_s"):
            _check_number(self, name)
        _check_number(self, "rpm", optional=True)
        _check_number(self, "max_cost_usd", optional=True, least=0)
        if self.on_ambiguous not in ON_AMBIGUOUS:
            raise OptionsError(
                f"{{0}} must be retry or fail, got {_shown(self.on_ambiguous)}", "on_ambiguous"
            )
        if self.only and not self.retry_failed:
            raise OptionsError("{0} narrows {1}; add {1}", "only", "retry_failed")
        for name in ("base_url", "api_key"):
            if not isinstance(getattr(self, name), str | None):
                raise OptionsError("{0} must be a string", name)
        if self.base_url and (problem := base_url_problem(self.base_url)):  # "": not set
            raise OptionsError("{0} " + problem.replace("{", "{{").replace("}", "}}"), "base_url")
        if self.state is not None and (problem := state_url_problem(self.state)):
            raise OptionsError("{0} " + problem, "state")
        self._check_budget()
        self._check_workers()

    def _check_budget(self) -> None:
        """A budget by name lives in the shared state, and its name is shown in messages."""
        if self.budget is None:
            return
        if not isinstance(self.budget, str) or not 0 < len(self.budget) <= BUDGET_NAME_MAX:
            raise OptionsError(
                f"{{0}} must be a name of 1 to {BUDGET_NAME_MAX} characters, got "
                f"{_shown(self.budget)}",
                "budget",
            )
        if not self.budget.isprintable() or self.budget.strip() != self.budget:
            raise OptionsError(
                "{0} must be printable, without spaces around it, got " + _shown(self.budget),
                "budget",
            )
        if self.state is None:
            raise OptionsError(
                "{0} names a budget shared in PostgreSQL: add {1} postgresql://... (one "
                "machine: {2} caps the output folder's own spend)",
                "budget",
                "state",
                "max_cost_usd",
            )

    def _check_workers(self) -> None:
        """Ray's options go together: workers need a cluster to start on and a state they
        share; Ray must be installed (checked without importing it, which takes a second)."""
        _check_number(self, "workers", integer=True, least=0)
        if not isinstance(self.ray_address, str | None):
            raise OptionsError("{0} must be a string", "ray_address")
        if self.workers and self.ray_address is None:
            raise OptionsError("{0} starts worker actors on Ray: add {1}", "workers", "ray_address")
        if self.ray_address is None:
            return
        if not self.workers:
            raise OptionsError(
                "{0} needs {1}: how many worker actors to start", "ray_address", "workers"
            )
        if self.state is None:
            raise OptionsError(
                "{0} needs {1}: the worker actors share the run's state in PostgreSQL",
                "ray_address",
                "state",
            )
        if importlib.util.find_spec("ray") is None:
            raise OptionsError(
                '{0} needs Ray, which is not installed here: pip install "image-runner[ray]"',
                "ray_address",
            )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default, by name: what the CLI's arguments default to."""
        return {f.name: f.default for f in fields(cls)}


def run_options(
    options: Options, out_dir: Path | str, *, environ: Mapping[str, str] | None = None
) -> RunOptions:
    """The lifecycle's options for a run of ``options`` into ``out_dir``, with the key and base
    URL looked up in ``environ`` (default: ``os.environ``). Raises
    :class:`~runner.errors.CredentialsError` when no key may be sent to the base URL (never for
    a dry run or an emulated one), and :class:`~runner.errors.OptionsError` for an object
    store's ``out_dir`` without ``state``: its workers and the runs after them can only find
    what was done there in a shared state. With ``emulate``, the base URL is a placeholder:
    the caller points it at the emulator once that listens (:func:`runner.library.execute`)."""
    if is_remote(out_dir) and options.state is None:
        raise OptionsError(
            f"{{0}} {_braced(str(out_dir))} is object storage: it needs a shared state; add {{1}} "
            "postgresql://... (or write to a local folder)",
            "out",
            "state",
        )
    credentials = _credentials(options, os.environ if environ is None else environ)
    return RunOptions(
        out_dir=out_dir,
        client=ClientConfig(
            base_url=credentials.base_url,
            api_key=credentials.api_key,
            timeout_s=options.timeout_s,
        ),
        retry=RetryConfig(
            max_attempts=options.max_attempts,
            on_ambiguous=options.on_ambiguous,
            max_retry_after_s=options.max_retry_after_s,
        ),
        breaker=BreakerConfig(max_outage_s=options.max_outage_s),
        pacer=PacerConfig(ceiling_rpm=options.rpm),
        concurrency=options.concurrency,
        max_cost_usd=options.max_cost_usd,
        budget=options.budget,
        dry_run=options.dry_run,
        retry_failed=options.retry_failed,
        retry_only=options.only,
        redo_edited=options.redo_edited,
        grace_s=options.grace_s,
        state_url=options.state,
        ray_address=options.ray_address,
        workers=options.workers,
    )


def dated(out: str | os.PathLike[str], now: datetime | None = None) -> Path | str:
    """The output location ``out`` with ``{date}`` and ``{datetime}`` replaced by ``now``
    (default: the present) in UTC, ``2026-11-29`` and ``2026-11-29T0200Z``: a fresh folder per
    night from one unchanging cron line. UTC so that a daylight-saving change neither repeats
    nor skips a night; no colons, which some file systems and tools refuse in a path. Other
    braces are left as they are: a folder may be named ``{x}``. A local folder comes back as a
    Path, an object store's URL as a string (:func:`out_location`)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    text = os.fspath(out)
    text = text.replace("{date}", f"{moment:%Y-%m-%d}")
    return out_location(text.replace("{datetime}", f"{moment:%Y-%m-%dT%H%MZ}"))


def under(out: Path | str, *parts: str) -> str:
    """The path or URL of ``parts`` in the output location ``out``, as shown to a user."""
    return (
        "/".join([str(out).rstrip("/"), *parts])
        if isinstance(out, str)
        else str(out.joinpath(*parts))
    )


def out_location(text: str) -> Path | str:
    """``--out`` as given: an object store's URL (``s3://bucket/prefix``) stays a string, as a
    Path would fold its ``//``; anything else is a local folder's Path."""
    return text if is_remote(text) else Path(text)


def _credentials(options: Options, environ: Mapping[str, str]) -> Credentials:
    if options.emulate:
        return Credentials(client.DEFAULT_BASE_URL, EMULATOR_KEY, None)
    if options.api_key is not None:  # the caller's own key: it goes where the runner's key goes
        environ = {**environ, RUNNER_KEY: options.api_key}
    return resolve_credentials(environ, options.base_url, key_required=not options.dry_run)


def _causes(only: object) -> frozenset[str]:
    """``only`` as a frozenset of causes; any other shape (a lone string, ``None``) raises."""
    if isinstance(only, Iterable) and not isinstance(only, str):
        with contextlib.suppress(TypeError):  # unhashable members
            causes = frozenset(only)
            if all(isinstance(cause, str) for cause in causes):
                return causes
    raise OptionsError("{0} must be a set of causes, such as {{'server_error'}}", "only")


def _check_number(
    options: Options,
    name: str,
    *,
    integer: bool = False,
    optional: bool = False,
    least: float | None = None,
) -> None:
    """Check that the field ``name`` is a number (or, if ``optional``, ``None``), more than 0
    or at least ``least``."""
    value = getattr(options, name)
    if value is None and optional:
        return
    kinds = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise OptionsError(f"{{0}} must be {kinds}, got {_shown(value)}", name)
    if math.isnan(value) or (value <= 0 if least is None else value < least):
        bound = "more than 0" if least is None else f"at least {least:g}"
        raise OptionsError(f"{{0}} must be {bound}, got {_shown(value)}", name)


def _shown(value: object) -> str:
    """``value`` for a message template: its braces doubled."""
    return _braced(repr(value))


def _braced(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
