"""The command line's entry point: parse, dispatch to a command, map outcomes to exit codes; and
the ``run`` command, which wires SIGINT and SIGTERM to the run's graceful stop.

Exit codes: 0 all jobs succeeded; 1 finished with failed jobs; 2 invalid manifest or usage (or
a folder that cannot be written, a checkpoint of another version), nothing sent; 3 stopped
early and resumable (interrupt, key refused, out of quota, budget reached, provider down, a
Retry-After too long, a database error once requests were sent); 4 another run holds the
output folder, nothing sent. The run's core raises only while nothing has been sent, so an
error caught here is always an exit 2, or 4 for a folder in use.

``run --json`` prints the summary of :mod:`~runner.cli.summary` on stdout, whatever the
outcome, and ``--notify`` posts it (:mod:`~runner.outputs.notify`); neither changes the exit
code.

The run itself is the Python API's (:func:`runner.library.execute`, with the same
:class:`~runner.core.options.Options`, key lookup and exit codes as :func:`runner.run`); what
the CLI adds is the progress bar, the summary, and signals: a run's stop policy belongs to
:class:`~runner.core.lifecycle.Run`, the CLI only tells it when a signal came.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from runner.cli import commands
from runner.cli.parser import build_parser, flag, options_from
from runner.cli.printing import (
    ProgressBar,
    err,
    print_plan,
    print_summary,
    print_worker_summary,
)
from runner.cli.summary import run_summary, summary_json, summary_line
from runner.core import lifecycle
from runner.core.lifecycle import Run, RunOptions
from runner.core.options import Options, dated, run_options
from runner.errors import (
    CredentialsError,
    ManifestError,
    OptionsError,
    OutputLockedError,
    RunnerError,
)
from runner.jobs import Job
from runner.library import (
    EXIT_INVALID,
    EXIT_LOCKED,
    EXIT_STOPPED,
    RunReport,
    execute,
    worker_exit_code,
)
from runner.logs import setup_logging
from runner.manifest import load_manifest
from runner.outputs.notify import post_summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging(args.verbose, args.log_file)
    except OSError as exc:
        err(f"error: cannot open the log file {args.log_file}: {exc.strerror or exc}")
        return EXIT_INVALID
    try:
        return COMMANDS[args.command](args)
    except RunnerError as exc:
        err(f"error: {exc}")
        return exit_code_of(exc)
    except KeyboardInterrupt:  # before a run's own handlers: reading a large manifest, say
        err("interrupted; nothing was sent")
        return EXIT_STOPPED


def run(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)  # also the {date} of --out: the folder and started_at agree
    out_dir = dated(args.out, started) if args.out else Path("output") / args.manifest.stem
    report, code, error = _run_command(args, out_dir)
    if args.json or args.notify:
        summary = run_summary(
            report,
            out_dir,
            started=started,
            finished=datetime.now(UTC),
            exit_code=code,
            dry_run=args.dry_run,
            error=error,
        )
        if args.json:
            print(summary_json(summary), flush=True)
        if args.notify:
            problem = post_summary(args.notify, {**summary, "text": summary_line(summary)})
            if problem:
                err(f"notify: {problem}; the exit code is unchanged")
    return code


def _run_command(
    args: argparse.Namespace, out_dir: Path | str
) -> tuple[RunReport | None, int, str | None]:
    """Run ``args.manifest`` into ``out_dir`` and print what happened: the report (``None``
    when the run was refused before it began), the exit code, and the error that refused it.
    With ``--json`` what would go to stdout goes to stderr."""
    shown = sys.stderr if args.json else None

    def refused(message: str, code: int = EXIT_INVALID) -> tuple[None, int, str]:
        err(message)
        return None, code, message

    try:
        options = options_from(args)
    except OptionsError as exc:
        return refused(f"error: {exc.spelled(flag)}")
    try:  # a dry run sends nothing: it needs no key; --emulate sends none of the user's
        prepared = run_options(options, out_dir)
    except OptionsError as exc:  # an object store's --out without --state
        return refused(f"error: {exc.spelled(flag)}\nnothing was sent")
    except CredentialsError as exc:
        return refused(f"error: {exc}\nnothing was sent; to rehearse without a key, add --emulate")
    jobs: Sequence[Job] = []  # a worker claims the planning run's jobs from its state
    if args.command == "work":
        prepared = dataclasses.replace(prepared, join=True)
    else:
        try:
            jobs = load_manifest(args.manifest)
        except ManifestError as exc:
            return refused(str(exc))
        except KeyboardInterrupt:  # a large manifest is read before the run's handlers exist
            return refused("interrupted; nothing was sent", EXIT_STOPPED)
    try:
        outcome = asyncio.run(_run(jobs, prepared, options, no_progress=args.no_progress))
    except KeyboardInterrupt:  # a Ctrl-C after the run's own handlers were gone (or a dry run's)
        resume = "" if options.dry_run else "; rerun the same command to resume"
        return refused("interrupted" + resume, EXIT_STOPPED)
    except RunnerError as exc:  # refused before anything was sent: the folder is in use, ...
        return refused(f"error: {exc}", exit_code_of(exc))
    if prepared.join:
        print_worker_summary(outcome, out_dir, shown)
        return None, worker_exit_code(outcome), None
    report = RunReport.of(outcome, out_dir, dry_run=options.dry_run)
    if options.dry_run:
        print_plan(outcome, args.manifest, out_dir, options.max_cost_usd, shown)
    else:
        print_summary(outcome, out_dir, shown)
    return report, report.exit_code, None


def exit_code_of(exc: RunnerError) -> int:
    """The exit code of an error raised before anything was sent: 4 when another run holds
    the folder (a nightly job that overlaps yesterday's: try later, nothing is wrong), else 2
    (fix the manifest, options or folder first)."""
    return EXIT_LOCKED if isinstance(exc, OutputLockedError) else EXIT_INVALID


async def _run(
    jobs: Sequence[Job], prepared: RunOptions, options: Options, *, no_progress: bool
) -> lifecycle.RunReport:
    # A worker that joined a run has no plan of its own to show progress against.
    quiet = no_progress or options.dry_run or prepared.join
    bar = ProgressBar(disable=True if quiet else None)
    # A dry run changes nothing: a Ctrl-C may simply end it. A run's handlers are not removed
    # after it: closing the loop does that, so that a signal while the emulator shuts down is
    # heard too (and does nothing).
    on_run = None if options.dry_run else _install_signal_handlers(options.grace_s)
    try:
        return await execute(
            jobs,
            prepared,
            emulate=options.emulate,
            on_run=on_run,
            on_plan=None if prepared.join else bar.start,
            on_progress=bar.update,
        )
    finally:
        bar.close()


def _install_signal_handlers(grace_s: float) -> Callable[[Run], None]:
    """What wires SIGINT and SIGTERM to a run, once it exists: the first stops it gracefully,
    the next at once (:meth:`Run.stop` owns what that means); each tells the user."""

    def install(run: Run) -> None:
        count = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal count
            count += 1
            if count == 1:
                err(
                    f"\n{sig.name}: finishing requests in flight (up to {grace_s:g} s); "
                    "press Ctrl-C again to stop at once"
                )
            elif count == 2:
                err(f"\n{sig.name}: stopping at once; writing results and ledger")
            run.stop(f"interrupted by {sig.name}")

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)

    return install


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run,
    "work": run,
    "stop": commands.stop,
    "validate": commands.validate,
    "emulate": commands.emulate,
    "report": commands.report,
    "status": commands.status,
    "export": commands.export,
    "review": commands.review,
}
