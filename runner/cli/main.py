"""The command line's entry point: parse, dispatch to a command, map outcomes to exit codes; and
the ``run`` command, which wires SIGINT and SIGTERM to the run's graceful stop.

Exit codes: 0 all jobs succeeded; 1 finished with failed jobs; 2 invalid manifest or usage (or
a folder in use, one that cannot be written, a checkpoint of another version), nothing sent; 3
stopped early and resumable (interrupt, key refused, out of quota, budget reached, provider
down, a Retry-After too long, a database error once requests were sent). The run's core raises
only while nothing has been sent, so an error caught here is always an exit 2.

The run itself is the Python API's (:func:`runner.library.execute`, with the same
:class:`~runner.core.options.Options`, key lookup and exit codes as :func:`runner.run`); what
the CLI adds is the progress bar, the summary, and signals: a run's stop policy belongs to
:class:`~runner.core.lifecycle.Run`, the CLI only tells it when a signal came.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from runner.cli import commands
from runner.cli.parser import build_parser, flag, options_from
from runner.cli.printing import ProgressBar, err, print_plan, print_summary
from runner.core.lifecycle import Run, RunOptions, RunReport
from runner.core.options import Options, run_options
from runner.errors import CredentialsError, ManifestError, OptionsError, RunnerError
from runner.jobs import Job
from runner.library import EXIT_INVALID, EXIT_OK, EXIT_STOPPED, execute, exit_code
from runner.logs import setup_logging
from runner.manifest import load_manifest


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
        return EXIT_INVALID
    except KeyboardInterrupt:  # before a run's own handlers: reading a large manifest, say
        err("interrupted; nothing was sent")
        return EXIT_STOPPED


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
    except OptionsError as exc:
        err(f"error: {exc.spelled(flag)}")
        return EXIT_INVALID
    out_dir: Path = args.out or Path("output") / args.manifest.stem
    try:  # a dry run sends nothing: it needs no key; --emulate sends none of the user's
        prepared = run_options(options, out_dir)
    except CredentialsError as exc:
        err(f"error: {exc}\nnothing was sent; to rehearse without a key, add --emulate")
        return EXIT_INVALID
    try:
        jobs = load_manifest(args.manifest)
    except ManifestError as exc:
        err(str(exc))
        return EXIT_INVALID
    try:
        report = asyncio.run(_run(jobs, prepared, options, no_progress=args.no_progress))
    except KeyboardInterrupt:  # a Ctrl-C after the run's own handlers were gone (or a dry run's)
        err("interrupted" + ("" if options.dry_run else "; rerun the same command to resume"))
        return EXIT_STOPPED
    if options.dry_run:
        print_plan(report, args.manifest, out_dir, options.max_cost_usd)
        return EXIT_OK
    print_summary(report, out_dir)
    return exit_code(report)


async def _run(
    jobs: Sequence[Job], prepared: RunOptions, options: Options, *, no_progress: bool
) -> RunReport:
    bar = ProgressBar(disable=True if no_progress or options.dry_run else None)
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
            on_plan=bar.start,
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
    "validate": commands.validate,
    "emulate": commands.emulate,
    "report": commands.report,
    "status": commands.status,
    "export": commands.export,
}
