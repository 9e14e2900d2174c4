"""The command line's arguments: every command, option, default and help text.

The options of ``run`` are the fields of :class:`~runner.core.options.Options`, each added by
:func:`_option` under its field's name, with its default read from the field: ``--timeout``
is ``timeout_s``, and ``Options(**vars)`` is a run's options (:func:`options_from`). Likewise
``emulate``'s defaults are those of :class:`~runner.emulator.EmulatorConfig`. ``--help`` shows
every default: :class:`_HelpFormatter` adds it to every option that takes a value and has one,
and those whose default is "not set" say what that means.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

from runner import __version__
from runner.core.options import ON_AMBIGUOUS, Options, out_location
from runner.emulator import FAULT_KINDS, EmulatorConfig
from runner.http import client
from runner.outputs.export_splits import TRAIN_ONLY, SplitSpec, parse_split
from runner.outputs.notify import webhook_problem

OPTION_DEFAULTS: Final = Options.defaults()
OUT_HELP: Final = "an output folder (or s3://, gs://, az:// location) of image-runner run"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``image-runner``; each command's ``command`` default names it."""
    parser = argparse.ArgumentParser(
        prog="image-runner",
        description="Generate images in bulk from a manifest, resumably, with a cost ledger.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"image-runner {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr: -v retries, stops and possible charges; -vv also debug records",
    )
    common.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="append the log to PATH as JSON lines with timestamps (INFO, DEBUG with -vv), "
        "for cron (default: no log file)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, formatter_class=_HelpFormatter)
        sub.set_defaults(command=name)
        return sub

    _add_run(command("run", "generate every image of a manifest not yet done"))
    _add_run(
        command("work", "join a run planned with --state as one more worker, until no job is left"),
        worker=True,
    )
    _add_stop(command("stop", "stop every worker of a run with --state (each finishes in flight)"))

    command("validate", "check a manifest; send nothing").add_argument("manifest", type=Path)

    _add_emulate(command("emulate", "serve the built-in API emulator"))

    report = command("report", "write OUT/report.html: summary and contact sheet")
    report.add_argument("out", type=out_location, help=OUT_HELP)
    _add_state(report)

    status = command("status", "where a run stands; safe while it is running")
    status.add_argument("out", type=out_location, help=OUT_HELP)
    _add_state(status)
    status.add_argument("--json", action="store_true", help="print JSON, for scripts and cron")

    _add_review(command("review", "approve or reject finished images, in the browser"))

    _add_export(command("export", "export finished images as a dataset"))
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """The options of ``run``, from its parsed arguments; raises
    :class:`~runner.errors.OptionsError` for options at odds (``--only`` alone)."""
    values = {name: getattr(args, name) for name in OPTION_DEFAULTS if hasattr(args, name)}
    values["only"] = frozenset(getattr(args, "only", None) or ())  # `work` plans nothing
    return Options(**values)


def emulator_config_from(args: argparse.Namespace) -> EmulatorConfig:
    """The configuration of ``emulate``, from its parsed arguments; raises ``ValueError`` for
    a bad value. ``--faults`` takes kinds separated by commas, spaces allowed."""
    return EmulatorConfig(
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        fault_rate=args.fault_rate,
        retry_after_s=args.retry_after,
        fault_kinds=tuple(k.strip() for k in args.faults.split(",") if k.strip()),
        seed=args.seed,
        payload=args.payload,
        rate_limit_rpm=args.rate_limit,
        rate_limit_burst=args.burst,
        rate_limit_headers=args.announce_limits,
        rate_limit_scope=args.limit_scope,
    )


def flag(name: str) -> str:
    """The flag of the option named ``name`` in :class:`~runner.core.options.Options`: its
    name without the unit, dashed (``max_retry_after_s``: ``--max-retry-after``)."""
    return "--" + name.removesuffix("_s").removesuffix("_usd").removesuffix("_address").replace(
        "_", "-"
    )


def _add_run(run: argparse.ArgumentParser, *, worker: bool = False) -> None:
    """The options of ``run``; with ``worker``, those of ``work``: no manifest, and neither
    what only planning decides (dry run, what to retry or redo) nor the budget and its cap,
    which are the planning run's."""
    if not worker:
        run.add_argument("manifest", type=Path, help="YAML or CSV manifest")
    run.add_argument(
        "--out",
        type=out_location,
        metavar="DIR|URL",
        required=worker,
        help="output folder, or s3://, gs://, az:// bucket/prefix (needs --state); {date} and "
        "{datetime} in it become the UTC date (2026-11-29) and "
        "time (2026-11-29T0200Z)"
        + (", as the planning run had them" if worker else " (default: output/<manifest stem>)"),
    )
    _option(
        run,
        "state",
        metavar="URL",
        required=worker,
        help="the run's state in PostgreSQL (postgresql://user@host/db; the password best "
        "in PGPASSWORD or ~/.pgpass), shared by every worker of the run "
        + ("" if worker else "(default: the SQLite checkpoint in the output folder)"),
    )
    if not worker:
        _option(
            run,
            "ray_address",
            nargs="?",
            const="",  # --ray alone: Ray's own choice
            metavar="ADDRESS",
            help="send from --workers N worker actors on the Ray cluster at ADDRESS (with no "
            "ADDRESS: $RAY_ADDRESS, else a Ray started here); needs --state "
            "(default: no Ray, this process sends)",
        )
        _option(
            run,
            "workers",
            type=_positive_int,
            metavar="N",
            help="with --ray: worker actors to start, each working as image-runner work does",
        )
    _option(run, "concurrency", type=_positive_int, metavar="N", help="requests at once")
    _option(run, "max_attempts", type=_positive_int, metavar="N", help="attempts per job per run")
    _option(run, "timeout_s", type=_positive_float, metavar="S", help="request timeout, s")
    _option(
        run,
        "base_url",
        metavar="URL",
        help="API base URL (default: with IMAGE_RUNNER_API_KEY, $IMAGE_RUNNER_BASE_URL or "
        f"{client.DEFAULT_BASE_URL}; with OPENAI_API_KEY, $OPENAI_BASE_URL or "
        "$IMAGE_RUNNER_BASE_URL)",
    )
    _option(
        run,
        "emulate",
        action="store_true",
        help="use the built-in emulator: no key, no network",
    )
    _option(
        run,
        "on_ambiguous",
        choices=ON_AMBIGUOUS,
        help="when a request may have been billed but brought no image",
    )
    _option(
        run,
        "max_retry_after_s",
        type=_positive_float,
        metavar="S",
        help="stop the run rather than wait longer than this many seconds for a Retry-After",
    )
    _option(
        run,
        "grace_s",
        type=_positive_float,
        metavar="S",
        help="seconds in-flight requests get to finish after Ctrl-C or SIGTERM (a second "
        "Ctrl-C stops at once)",
    )
    if not worker:
        _option(
            run,
            "max_cost_usd",
            type=_non_negative_float,
            metavar="USD",
            help="cap on the spend recorded in the output folder, confirmed + possible, all runs "
            "(default: no cap); with --state, the cap of the run's budget for every worker of "
            "it together, which stays as set until a run sets it again (default: the cap the "
            "budget has, none for a new one)",
        )
        _option(
            run,
            "budget",
            metavar="NAME",
            help="with --state: spend from the budget NAME, shared with every run naming it "
            "(created if new); --max-cost sets its cap (default: the budget an earlier run of this "
            "output named, else the run's own)",
        )
        _option(
            run,
            "dry_run",
            action="store_true",
            help="show what would be done and its cost; send nothing",
        )
    _option(
        run,
        "max_outage_s",
        type=_positive_float,
        metavar="S",
        help="seconds the provider may stay down (nearly every request failing) before the "
        "run stops",
    )
    if not worker:
        _option(
            run,
            "retry_failed",
            action="store_true",
            help="also retry jobs that failed for good in earlier runs (content policy, "
            "bad request)",
        )
    if not worker:
        _option(
            run,
            "only",
            default=None,  # a list to append to; None: no cause named
            action="append",
            metavar="CAUSE",
            help="with --retry-failed: only jobs that failed with this cause (as in the results' "
            "error_cause column, e.g. server_error); may be repeated (default: every cause)",
        )
    if not worker:
        _option(
            run,
            "redo_edited",
            action="store_true",
            help="make again the images edited by hand since they were made (kept as they are "
            "by default), each moved to edited/ first; an approved one is never made again",
        )
    _option(
        run,
        "rpm",
        type=_positive_float,
        metavar="N",
        help="at most N requests a minute per endpoint; below that the runner adapts to the "
        "provider's rate limit by itself (429s, x-ratelimit headers) (default: no ceiling)"
        + (
            "; the planning run's --rpm is the ceiling of all its workers together: this one "
            "only lowers it, for this worker"
            if worker
            else "; with --state, for all the run's workers together, and kept for the run "
            "until a run of it gives --rpm again"
        ),
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    if worker:  # the planning run's summary is the run's; a worker's is its share
        run.set_defaults(json=False, notify=None)
        return
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary on stdout and nothing else there (the human summary goes "
        "to stderr); its keys are in the README, Nightly runs",
    )
    run.add_argument(
        "--notify",
        type=_webhook,
        metavar="URL",
        help="POST the JSON summary, with a one-line 'text' for Slack, to URL when the run ends "
        "(default: no webhook)",
    )


def _add_review(review: argparse.ArgumentParser) -> None:
    review.add_argument("out", type=out_location, help=OUT_HELP)
    _add_state(review)
    review.add_argument(
        "--port", type=_port, default=0, help="the port on 127.0.0.1 to serve on; 0: a free one"
    )
    review.add_argument(
        "--no-browser", action="store_true", help="print the address; do not open a browser"
    )
    review.add_argument(
        "--reviewer",
        metavar="NAME",
        help="who the decisions are recorded as (default: the user you are logged in as)",
    )
    for option, decision in (("--approve", "approve"), ("--reject", "reject")):
        review.add_argument(
            option,
            nargs="+",
            action="extend",
            metavar="ID",
            help=f"{decision} these jobs' current images and exit, for scripts (no server); "
            "every id is checked before any is written",
        )


def _option(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add the option of :class:`~runner.core.options.Options` named ``name``, with its
    default."""
    kwargs.setdefault("default", OPTION_DEFAULTS[name])
    parser.add_argument(flag(name), dest=name, **kwargs)


def _add_export(export: argparse.ArgumentParser) -> None:
    export.add_argument("out", type=out_location, help=OUT_HELP)
    _add_state(export)
    export.add_argument("dest", type=Path, help="the dataset's folder, new or empty")
    export.add_argument(
        "--format",
        choices=("imagefolder", "parquet"),
        default="imagefolder",
        help="imagefolder: a folder per split with the images and metadata.jsonl; "
        "parquet: data/<split>-00000-of-00001.parquet with image bytes and metadata",
    )
    export.add_argument(
        "--split",
        type=_split_spec,
        default=TRAIN_ONLY,
        metavar="NAME=FRACTION,...",
        help="split by a hash of the job id, e.g. train=0.9,test=0.1: a job stays in its split "
        "on every export (imagefolder: train, validation, test; parquet: any names)",
    )
    export.add_argument(
        "--approved-only",
        action="store_true",
        help="export only images approved in image-runner review",
    )


def _add_emulate(emulate: argparse.ArgumentParser) -> None:
    config = EmulatorConfig()
    emulate.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    emulate.add_argument(
        "--port", type=int, default=8000, help="0: a free one; the URL is printed once listening"
    )
    emulate.add_argument(
        "--latency", type=float, default=config.latency_s, help="seconds per response"
    )
    emulate.add_argument(
        "--latency-jitter",
        type=float,
        default=config.latency_jitter_s,
        metavar="S",
        help="plus a uniform random 0 to S seconds per response",
    )
    emulate.add_argument(
        "--fault-rate",
        type=float,
        default=config.fault_rate,
        help="share of requests that get a fault",
    )
    emulate.add_argument(
        "--faults",
        default=", ".join(config.fault_kinds),  # ", ": the help wraps between kinds
        help=f"fault kinds to draw from (known: {', '.join(FAULT_KINDS)})",
    )
    emulate.add_argument(
        "--retry-after",
        type=float,
        default=config.retry_after_s,
        metavar="S",
        help="the Retry-After of injected 429 and 503 faults, in seconds",
    )
    emulate.add_argument(
        "--seed", type=int, help="seed for reproducible faults (default: a random one)"
    )
    emulate.add_argument(
        "--rate-limit",
        type=_positive_float,
        metavar="RPM",
        help="answer 429 past this many requests a minute (a token bucket) (default: no limit)",
    )
    emulate.add_argument(
        "--burst",
        type=_positive_int,
        default=config.rate_limit_burst,
        help="the rate limit's bucket size",
    )
    emulate.add_argument(
        "--limit-scope",
        choices=("shared", "per_endpoint"),
        default=config.rate_limit_scope,
        help="one bucket for both endpoints, or one each",
    )
    emulate.add_argument(
        "--announce-limits",
        action="store_true",
        help="send x-ratelimit-* headers, and retry-after on a 429 (default: a bare 429)",
    )
    emulate.add_argument(
        "--payload",
        choices=("flat", "noise"),
        default=config.payload,
        help="flat: tiny two-colour PNGs; noise: incompressible, real-sized (~25 MB at 3840x2160)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to the help of every option that takes a value and has a default;
    a flag's default is to be off, which goes without saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and action.default is not None
        if shown and action.default is not argparse.SUPPRESS and "(default" not in text:
            default = action.default
            value = f"{default:g}" if isinstance(default, float) else str(default)
            text += f" (default: {value.replace('%', '%%')})"
        return text


def _webhook(text: str) -> str:
    problem = webhook_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _split_spec(text: str) -> SplitSpec:
    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be from 0 to 65535")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _add_state(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "state",
        metavar="URL",
        help="the run's state in PostgreSQL, for a run made with --state (default: the SQLite "
        "checkpoint in the output folder)",
    )


def _add_stop(stop: argparse.ArgumentParser) -> None:
    stop.add_argument(
        "out", type=out_location, help="the output location of the run, as its workers have it"
    )
    _option(stop, "state", metavar="URL", required=True, help="the run's state in PostgreSQL")
    stop.add_argument(
        "--reason",
        default="stopped by an operator (image-runner stop)",
        help="what every worker and the run's status will say",
    )
