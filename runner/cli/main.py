"""The command line: parse arguments, call one core function, print, map outcomes to exit codes.

The only module that prints or owns a progress bar. Exit codes:
0 all jobs succeeded; 1 finished with failed jobs; 2 invalid manifest or usage (or a folder in
use, one that cannot be written, a checkpoint of another version), nothing sent; 3 stopped
early and resumable (interrupt, key refused, out of quota, budget reached, provider down, a
Retry-After too long, a database error once requests were sent). The run's core raises only
while nothing has been sent, so an error caught here is always an exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Never

from tqdm import tqdm

from runner import __version__
from runner.core.admission import BreakerConfig, Budget
from runner.core.lifecycle import Run, RunOptions, RunReport
from runner.core.pacer import PacerConfig
from runner.core.plan import Plan
from runner.core.pool import Progress
from runner.core.retry import RetryConfig
from runner.emulator import DEFAULT_FAULT_MIX, FAULT_KINDS, Emulator, EmulatorConfig, serve
from runner.errors import CredentialsError, ManifestError, RunnerError, StoreError
from runner.http.client import DEFAULT_BASE_URL, ClientConfig
from runner.http.credentials import Credentials, resolve_credentials
from runner.jobs import Job
from runner.logs import setup_logging
from runner.manifest.load import load_manifest
from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD
from runner.redact import redact
from runner.store.sqlite import SqliteStore

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3
EMULATOR_KEY = "sk-emulator-local"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_file)
    except OSError as exc:
        _err(f"error: cannot open the log file {args.log_file}: {exc.strerror or exc}")
        return EXIT_INVALID
    try:
        code: int = args.handler(args)
    except RunnerError as exc:
        _err(f"error: {exc}")
        return EXIT_INVALID
    except KeyboardInterrupt:  # before a run's own handlers: reading a large manifest, say
        _err("interrupted; nothing was sent")
        return EXIT_STOPPED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-runner",
        description="Generate images in bulk from a manifest, resumably, with a cost ledger.",
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
        "for cron",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", parents=[common], help="generate every image of a manifest not yet done"
    )
    run.add_argument("manifest", type=Path, help="YAML or CSV manifest")
    run.add_argument("--out", type=Path, help="output folder (default: output/<manifest stem>)")
    run.add_argument("--concurrency", type=_positive_int, default=8, help="requests at once")
    run.add_argument(
        "--max-attempts", type=_positive_int, default=5, help="attempts per job per run"
    )
    run.add_argument("--timeout", type=_positive_float, default=300.0, help="request timeout, s")
    run.add_argument(
        "--base-url",
        help="API base URL (else, with IMAGE_RUNNER_API_KEY: $IMAGE_RUNNER_BASE_URL or "
        f"{DEFAULT_BASE_URL}; with OPENAI_API_KEY: $OPENAI_BASE_URL or $IMAGE_RUNNER_BASE_URL)",
    )
    run.add_argument(
        "--emulate", action="store_true", help="use the built-in emulator: no key, no network"
    )
    run.add_argument(
        "--on-ambiguous",
        choices=("retry", "fail"),
        default="retry",
        help="when a request may have been billed but brought no image (default: retry)",
    )
    run.add_argument(
        "--max-retry-after",
        type=_positive_float,
        default=120.0,
        help="stop the run rather than wait longer than this many seconds for a Retry-After",
    )
    run.add_argument(
        "--grace",
        type=_positive_float,
        default=60.0,
        help="seconds in-flight requests get to "
        "finish after Ctrl-C or SIGTERM (a second Ctrl-C stops at once)",
    )
    run.add_argument(
        "--max-cost",
        type=_non_negative_float,
        metavar="USD",
        help="cap on the spend recorded in the output folder, confirmed + possible, all runs",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="show what would be done and its cost; send nothing"
    )
    run.add_argument(
        "--max-outage",
        type=_positive_float,
        default=600.0,
        help="seconds the provider may stay down (nearly every request failing) before the run "
        "stops",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="also retry jobs that failed for good in earlier runs (content policy, bad request)",
    )
    run.add_argument(
        "--only",
        action="append",
        metavar="CAUSE",
        help="with --retry-failed: only jobs that failed with this cause (as in the results' "
        "error_cause column, e.g. server_error); may be repeated",
    )
    run.add_argument(
        "--rpm",
        type=_positive_float,
        metavar="N",
        help="at most N requests a minute per endpoint; below that the runner adapts to the "
        "provider's rate limit by itself (429s, x-ratelimit headers)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser(
        "validate", parents=[common], help="check a manifest; send nothing"
    )
    validate.add_argument("manifest", type=Path)
    validate.set_defaults(handler=_cmd_validate)

    emulate = commands.add_parser(
        "emulate", parents=[common], help="serve the built-in API emulator"
    )
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument(
        "--port", type=int, default=8000, help="0: a free one; the URL is printed once listening"
    )
    emulate.add_argument("--latency", type=float, default=0.0, help="seconds per response")
    emulate.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of requests that get a fault"
    )
    emulate.add_argument(
        "--faults",
        default=",".join(DEFAULT_FAULT_MIX),
        help=f"fault kinds to draw from (known: {', '.join(FAULT_KINDS)})",
    )
    emulate.add_argument("--seed", type=int, help="seed for reproducible faults")
    emulate.add_argument(
        "--rate-limit",
        type=_positive_float,
        metavar="RPM",
        help="answer 429 past this many requests a minute (a token bucket; default: no limit)",
    )
    emulate.add_argument(
        "--burst", type=_positive_int, default=10, help="the rate limit's bucket size (default 10)"
    )
    emulate.add_argument(
        "--limit-scope",
        choices=("shared", "per_endpoint"),
        default="shared",
        help="one bucket for both endpoints (default) or one each",
    )
    emulate.add_argument(
        "--announce-limits",
        action="store_true",
        help="send x-ratelimit-* headers, and retry-after on a 429 (default: a bare 429)",
    )
    emulate.add_argument(
        "--payload",
        choices=("flat", "noise"),
        default="flat",
        help="flat: tiny two-colour PNGs (default); noise: incompressible, real-sized "
        "(~25 MB at 3840x2160)",
    )
    emulate.set_defaults(handler=_cmd_emulate)

    report = commands.add_parser(
        "report", parents=[common], help="write OUT/report.html: summary and contact sheet"
    )
    report.add_argument("out", type=Path, help="an output folder of image-runner run")
    report.set_defaults(handler=_cmd_report)

    status = commands.add_parser(
        "status", parents=[common], help="where a run stands; safe while it is running"
    )
    status.add_argument("out", type=Path, help="an output folder of image-runner run")
    status.add_argument("--json", action="store_true", help="print JSON, for scripts and cron")
    status.set_defaults(handler=_cmd_status)

    export = commands.add_parser(
        "export", parents=[common], help="export finished images as a dataset"
    )
    export.add_argument("out", type=Path, help="an output folder of image-runner run")
    export.add_argument("dest", type=Path, help="where to write the dataset")
    export.add_argument(
        "--format",
        choices=("imagefolder", "parquet"),
        default="imagefolder",
        help="imagefolder: images + metadata.jsonl (Hugging Face layout); "
        "parquet: one file with image bytes and metadata",
    )
    export.set_defaults(handler=_cmd_export)
    return parser


# --- run ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    if args.only and not args.retry_failed:
        _err("error: --only narrows --retry-failed; add --retry-failed")
        return EXIT_INVALID
    if args.emulate:  # the user's key is not needed, so not sent, even to the emulator
        credentials = Credentials(DEFAULT_BASE_URL, EMULATOR_KEY, None)
    else:
        try:  # a dry run sends nothing: it needs no key
            credentials = resolve_credentials(
                os.environ, args.base_url, key_required=not args.dry_run
            )
        except CredentialsError as exc:
            _err(f"error: {exc}\nnothing was sent; to rehearse without a key, add --emulate")
            return EXIT_INVALID
    try:
        jobs = load_manifest(args.manifest)
    except ManifestError as exc:
        _err(str(exc))
        return EXIT_INVALID
    out_dir: Path = args.out or Path("output") / args.manifest.stem
    options = RunOptions(
        out_dir=out_dir,
        client=ClientConfig(
            base_url=credentials.base_url,
            api_key=credentials.api_key,
            timeout_s=args.timeout,
        ),
        retry=RetryConfig(
            max_attempts=args.max_attempts,
            on_ambiguous=args.on_ambiguous,
            max_retry_after_s=args.max_retry_after,
        ),
        breaker=BreakerConfig(max_outage_s=args.max_outage),
        pacer=PacerConfig(ceiling_rpm=args.rpm),
        concurrency=args.concurrency,
        max_cost_usd=args.max_cost,
        dry_run=args.dry_run,
        retry_failed=args.retry_failed,
        retry_only=frozenset(args.only or ()),
        grace_s=args.grace,
    )
    try:
        report = asyncio.run(_run(jobs, options, args))
    except KeyboardInterrupt:  # a Ctrl-C after the run's own handlers were gone (or a dry run's)
        _err("interrupted" + ("" if args.dry_run else "; rerun the same command to resume"))
        return EXIT_STOPPED
    if args.dry_run:
        _print_plan(report, args.manifest, out_dir, args.max_cost)
        return EXIT_OK
    _print_summary(report, out_dir)
    return _exit_code(report)


async def _run(jobs: Sequence[Job], options: RunOptions, args: argparse.Namespace) -> RunReport:
    async with _maybe_emulator(args.emulate and not args.dry_run) as emulated_url:
        if emulated_url is not None:
            options = dataclasses.replace(
                options, client=dataclasses.replace(options.client, base_url=emulated_url)
            )
        bar = _ProgressBar(disable=True if args.no_progress or args.dry_run else None)
        run = Run(jobs, options, on_plan=bar.start, on_progress=bar.update)
        if not args.dry_run:  # which changes nothing: a Ctrl-C may simply end it
            # Not removed after the run: closing the loop does that, so that a signal while
            # the emulator shuts down is heard too (and does nothing).
            _SignalHandler(run, grace_s=options.grace_s).install()
        try:
            return await run.execute()
        finally:
            bar.close()


@contextlib.asynccontextmanager
async def _maybe_emulator(enabled: bool) -> AsyncIterator[str | None]:
    if not enabled:
        yield None
        return
    emulator = Emulator(EmulatorConfig())
    try:
        yield await emulator.start("127.0.0.1", 0)
    finally:
        await emulator.stop()


class _SignalHandler:
    """SIGINT and SIGTERM stop the run, gracefully the first time and at once the next (the run
    owns what that means: :meth:`Run.stop`); this wires them and tells the user."""

    def __init__(self, run: Run, *, grace_s: float) -> None:
        self.run, self.grace_s = run, grace_s
        self.count = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.count += 1
        if self.count == 1:
            _err(
                f"\n{sig.name}: finishing requests in flight (up to {self.grace_s:g} s); "
                "press Ctrl-C again to stop at once"
            )
        elif self.count == 2:
            _err(f"\n{sig.name}: stopping at once; writing results and ledger")
        self.run.stop(f"interrupted by {sig.name}")


class _ProgressBar:
    def __init__(self, *, disable: bool | None) -> None:
        self.disable = disable
        self.bar: tqdm[Never] | None = None
        self.base_done = 0
        self.causes_told: set[str] = set()  # each cause of failed attempts is told once

    def start(self, plan: Plan) -> None:
        parts = [f"{len(plan.todo)} to do", f"{plan.done} done before"]
        if plan.failed:
            parts.append(f"{plan.failed} failed before (not retried)")
        if plan.adopted:
            parts.append(f"{plan.adopted} adopted from disk")
        if plan.redo:
            parts.append(f"{len(plan.redo)} redone (image missing or altered)")
        if plan.retried_failed:
            parts.append(f"{len(plan.retried_failed)} failed before and retried")
        if plan.changed:
            parts.append(f"{len(plan.changed)} changed in the manifest")
        if plan.in_flight_settled:
            parts.append(f"{plan.in_flight_settled} interrupted requests counted as possible")
        _err("image-runner: " + ", ".join(parts))
        self.bar = tqdm(
            total=len(plan.todo), unit="img", disable=self.disable, file=sys.stderr, leave=False
        )

    def update(self, p: Progress) -> None:
        if self.bar is None:
            return
        if p.last_error is not None and p.last_error[0] not in self.causes_told:
            cause, message = p.last_error
            self.causes_told.add(cause)
            self.bar.write(
                redact(f"image-runner: a request failed ({cause}): {message}"), sys.stderr
            )
        self.bar.n = p.succeeded + p.failed
        spent = (p.confirmed_micro_usd + p.possible_micro_usd) / MICRO
        self.bar.set_postfix(
            done=p.succeeded,
            failed=p.failed,
            retrying=p.retrying,
            spent=f"${spent:.2f}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(report: RunReport, out_dir: Path) -> None:
    if report.ledger is None:  # the disk refused them: say so, and what stopped the run
        stopped = f"stopped:   {report.stop_reason}\n" if report.stop_reason else ""
        print(redact(f"{stopped}results:   {report.books_error}; rerun the same command"))
        return
    t = report.ledger.totals
    progress = report.pool.progress if report.pool else None
    requests = progress.requests if progress else 0
    lines = [
        f"jobs:      {t.jobs}: {t.succeeded} succeeded, {t.failed} failed"
        + (f" ({t.failed_retry_on_rerun} retried by a rerun)" if t.failed_retry_on_rerun else "")
        + f", {t.pending} pending",
        f"spent:     ${t.confirmed_usd:.2f} confirmed + ${t.possible_usd:.2f} possible "
        f"(all runs in this folder); {requests} requests this run",
        f"wall time: {report.wall_s:.1f} s",
    ]
    for lane, (limited, rpm) in sorted((report.pool.rate_limits if report.pool else {}).items()):
        pace = f"; paced at {rpm:.0f} requests/min" if rpm else ""
        lines.append(f"rate limit: {lane}: {limited} requests answered 429{pace}")
    if report.pool and report.pool.failures:
        messages = report.pool.failure_messages
        causes = ", ".join(
            f"{n} {cause} ({messages[cause]})" if cause in messages else f"{n} {cause}"
            for cause, n in sorted(report.pool.failures.items())
        )
        lines.append(f"failures:  {causes}")
    if report.cancelled:
        lines.append(
            f"stopped:   at once ({report.stop_reason}); finished images are kept and requests "
            "that were in flight are counted as possible; rerun the same command to resume"
        )
    elif report.stop_reason:
        lines.append(f"stopped:   {report.stop_reason}; rerun the same command to resume")
        hint = _stop_hint(report)
        if hint:
            lines.append(f"           {hint}")
        lines.append(f"           left to do: {t.pending} jobs, {_usd(t.pending)} at $0.03 each")
    lines += [
        f"images:    {out_dir / 'images'}/",
        f"results:   {report.ledger.results_parquet} (and .csv)",
        f"ledger:    {report.ledger.ledger_csv}",
    ]
    if not report.cancelled:
        lines.append(f"report:    {out_dir / 'report.html'}")
    print(redact("\n".join(lines)))


def _print_plan(report: RunReport, manifest: Path, out_dir: Path, cap_usd: float | None) -> None:
    plan, edits = report.plan, report.plan.todo_edits
    confirmed, possible = (micro_usd / MICRO for micro_usd in plan.spent_micro_usd)
    spent = confirmed + possible
    lines = [
        f"plan for {manifest} -> {out_dir} (dry run: nothing was sent)",
        f"  to do:     {len(plan.todo)} jobs ({len(plan.todo) - edits} generations, {edits} "
        f"edits) = {len(plan.todo)} images",
        f"  estimated: {_usd(len(plan.todo))} at $0.03 an image, before retries",
        f"  done:      {plan.done} (verified on disk); failed before and not retried: "
        f"{plan.failed}",
        f"  spent:     ${confirmed:.2f} confirmed + ${possible:.2f} possible in this folder",
    ]
    if cap_usd is not None:
        budget = Budget(round(cap_usd * MICRO), round(spent * MICRO))
        left_micro_usd = budget.left_micro_usd or 0
        left = left_micro_usd / MICRO
        fits = left_micro_usd // PRICE_PER_IMAGE_MICRO_USD
        verdict = "enough" if fits >= len(plan.todo) else f"NOT enough: {fits} images fit"
        lines.append(f"  budget:    ${cap_usd:.2f} cap, ${left:.2f} left: {verdict}")
    for i, job in enumerate(plan.todo[:3]):
        label = "  samples:   " if i == 0 else "             "
        lines.append(f"{label}{out_dir / 'images' / job.id}.png")
    print(redact("\n".join(lines)))


def _usd(images: int) -> str:
    return f"${images * PRICE_PER_IMAGE_MICRO_USD / MICRO:.2f}"


def _stop_hint(report: RunReport) -> str | None:
    error = report.stop_error
    if error is None or error.status is None:
        return None
    if error.status == 401:
        return "the API key was refused: check IMAGE_RUNNER_API_KEY (or OPENAI_API_KEY)"
    if error.status == 403:
        return "the key may not use this model or endpoint: check the account's permissions"
    if error.status == 429:
        return "the account is out of quota or over its spend limit: top it up, then rerun"
    if error.status in (404, 405):
        return (
            "check --base-url (or IMAGE_RUNNER_BASE_URL, OPENAI_BASE_URL): it is the part "
            f"before /images, usually ending in /v1, as in {DEFAULT_BASE_URL}; no job was "
            "marked failed"
        )
    return None


def _exit_code(report: RunReport) -> int:
    if report.stop_reason or report.ledger is None:
        return EXIT_STOPPED
    if report.ledger.totals.failed:
        return EXIT_FAILED
    return EXIT_STOPPED if report.ledger.totals.pending else EXIT_OK


# --- validate, emulate ----------------------------------------------------------------------


@contextlib.contextmanager
def _reading(out: Path) -> Iterator[SqliteStore]:
    """The checkpoint of ``out``, for report, status and export. A folder they cannot read (a
    checkpoint of another version, a damaged one) or a file they cannot write becomes an error
    message and exit 2, through :func:`main`, never a traceback."""
    try:
        with SqliteStore.open_read_only(out) as store:
            yield store
    except sqlite3.Error as exc:
        raise StoreError(f"{out}: cannot read the checkpoint: {exc}") from None
    except OSError as exc:
        raise RunnerError(f"{exc.filename or out}: {exc.strerror or exc}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from runner.outputs.report import write_report

    with _reading(args.out) as store:
        path = write_report(store)
    print(f"report: {path}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from runner.outputs.status import format_status, read_status

    with _reading(args.out) as store:
        status = read_status(store)
    print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from runner.outputs.export import export_dataset

    with _reading(args.out) as store:
        result = export_dataset(store, args.dest, args.format)
    skipped = f" ({result.skipped} skipped: image missing or altered)" if result.skipped else ""
    print(f"exported {result.images} images as {args.format} to {result.dest}{skipped}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        _err(str(exc))
        return EXIT_INVALID
    jobs, edits, rows = len(manifest), manifest.edits, manifest.rows
    expanded = f", from {rows} manifest rows" if rows != jobs else ""
    print(
        f"{args.manifest}: {jobs} jobs ({jobs - edits} generations, {edits} edits"
        f"{expanded}), {_usd(jobs)} at $0.03 an image, before retries"
    )
    return EXIT_OK


def _cmd_emulate(args: argparse.Namespace) -> int:
    try:
        config = EmulatorConfig(
            latency_s=args.latency,
            fault_rate=args.fault_rate,
            fault_kinds=tuple(k for k in args.faults.split(",") if k),
            seed=args.seed,
            payload=args.payload,
            rate_limit_rpm=args.rate_limit,
            rate_limit_burst=args.burst,
            rate_limit_headers=args.announce_limits,
            rate_limit_scope=args.limit_scope,
        )
    except ValueError as exc:
        _err(f"error: {exc}")
        return EXIT_INVALID

    def ready(url: str) -> None:
        print(f"emulator listening on {url} (Ctrl-C to stop)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port, on_ready=ready))
    return EXIT_OK


# --- helpers --------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(redact(message), file=sys.stderr, flush=True)


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
