"""The Python API: :func:`run` and :func:`arun` over a manifest, a list of dicts or a DataFrame,
returning a :class:`RunReport`; :func:`execute`, the run the CLI shares with them.

Jobs given as records (dicts, DataFrame rows) go through the manifest's validator,
:func:`~runner.manifest.load_jobs`: the same errors, ids and content hashes as a manifest file,
so resume works the same and an invalid job cannot be built by hand.

:func:`run` is synchronous, and must also work where an event loop already runs in the calling
thread (Jupyter, IPython): so it always runs the run on an event loop of its own, in a worker
thread, and waits for it. While it waits, a ``KeyboardInterrupt`` (a notebook's interrupt,
Ctrl-C in a script) stops the run as Ctrl-C does in the CLI: the first gracefully, the next at
once, each by a :meth:`~runner.core.lifecycle.Run.stop` handed to the run's loop; the run then
writes its books and :func:`run` returns the report, its ``stop_reason`` set, rather than
raising. However many interrupts come, and whenever, :func:`run` returns only once the run's
thread has ended: never with a run going on unattended, holding the folder's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypedDict, Unpack

from runner.core import lifecycle
from runner.core.lifecycle import Run, RunOptions
from runner.core.options import Options, dated, run_options
from runner.core.plan import Plan
from runner.core.progress import Progress
from runner.errors import RunnerError
from runner.jobs import Job
from runner.manifest import Manifest, load_jobs, load_manifest
from runner.outputs.ledger import LEDGER_COLUMNS, LedgerFiles
from runner.provider import MICRO
from runner.rehearsal import Emulator, served_by_the_callers_loop

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED, EXIT_LOCKED = 0, 1, 2, 3, 4
INTERRUPTED: Final = "interrupted by KeyboardInterrupt"

# What run() takes: a manifest's path, a loaded manifest, records, or a DataFrame of them.
JobsInput: TypeAlias = (
    "str | os.PathLike[str] | Manifest | Sequence[Mapping[str, Any]] | pd.DataFrame"
)

# ledger.csv's columns that are not text, as pandas reads them back.
LEDGER_DTYPES: Final = {
    "attempt": "int64",
    "cost_usd": "float64",
    "input_tokens": "Int64",
    "output_tokens": "Int64",
    "total_tokens": "Int64",
}


class OptionFields(TypedDict, total=False):
    """The fields of :class:`~runner.core.options.Options`, as keyword arguments of
    :func:`run` and :func:`arun` (documented there)."""

    concurrency: int
    max_attempts: int
    timeout_s: float
    on_ambiguous: Literal["retry", "fail"]
    max_retry_after_s: float
    grace_s: float
    max_cost_usd: float | None
    budget: str | None
    dry_run: bool
    max_outage_s: float
    retry_failed: bool
    only: frozenset[str]
    redo_edited: bool
    rpm: float | None
    base_url: str | None
    api_key: str | None
    emulate: bool
    state: str | None
    ray_address: str | None
    workers: int


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What a run did, in the output folder ``out``: its counts and spend, why it stopped, and
    its results and ledger as DataFrames.

    The counts are of the jobs passed to this run, whichever run did them, and the spend is
    the folder's, over all its runs, as the CLI's summary gives them; ``requests`` are this
    run's. After a dry run they are the plan's: ``succeeded`` done before,
    ``failed`` failed before and not retried, ``pending`` to do. ``rejected_redone``,
    ``edited_kept``, ``edited_redone`` and ``unreadable_redone`` are what the plan found of
    images reviewed, edited by hand or broken since they were made (see the README, "Review and
    regenerate"). ``exit_code`` is what
    ``image-runner run`` would exit with (0 all done, 1 some failed, 3 stopped early or jobs
    left). ``details`` is the core's report, for what the CLI's summary says beyond these: the
    plan, the pool's counters (failures by cause, rate limits), the files written. Its
    ``plan.todo``, the jobs this run was to send, stays readable while the report is kept
    (the jobs :func:`run` read are freed with it)."""

    out: Path | str  # a local folder, or an object store's URL
    succeeded: int
    failed: int
    pending: int
    requests: int
    confirmed_usd: float
    possible_usd: float
    stop_reason: str | None  # why the run ended before its end, if it did
    wall_s: float
    exit_code: int
    dry_run: bool
    rejected_redone: int  # images rejected in review, moved to rejected/ and made again
    edited_kept: int  # images found edited by hand by this run, kept as they are
    edited_redone: int  # images edited by hand, moved to edited/ and made again (redo_edited)
    unreadable_redone: int  # image files that no longer decode, moved to edited/, made again
    details: lifecycle.RunReport = dataclasses.field(compare=False)

    @classmethod
    def of(cls, outcome: lifecycle.RunReport, out: Path | str, *, dry_run: bool) -> RunReport:
        progress = outcome.pool.progress if outcome.pool else Progress()
        totals = outcome.ledger.totals if outcome.ledger else None
        if totals is not None:
            counts = (totals.succeeded, totals.failed, totals.pending)
            spend = (totals.confirmed_usd, totals.possible_usd)
        else:  # a dry run, or books the disk refused: the plan, moved on by this run's work
            plan, finished = outcome.plan, progress.succeeded + progress.failed
            counts = (
                plan.done + progress.succeeded,
                plan.failed + progress.failed,
                len(plan.todo) - finished,
            )
            confirmed, possible = plan.spent_micro_usd
            spend = (
                (confirmed + progress.confirmed_micro_usd) / MICRO,
                (possible + progress.possible_micro_usd) / MICRO,
            )
        return cls(
            out,
            *counts,
            requests=progress.requests,
            confirmed_usd=spend[0],
            possible_usd=spend[1],
            stop_reason=outcome.stop_reason,
            wall_s=outcome.wall_s,
            exit_code=EXIT_OK if dry_run else exit_code(outcome),
            dry_run=dry_run,
            rejected_redone=len(outcome.plan.rejected),
            edited_kept=len(outcome.plan.edited),
            edited_redone=len(outcome.plan.redo_edited),
            unreadable_redone=len(outcome.plan.unreadable),
            details=outcome,
        )

    def results(self) -> pd.DataFrame:
        """``results.parquet``: one row per job of the manifest, in its order."""
        import pandas as pd

        return pd.read_parquet(self._files().results_parquet)

    def ledger(self) -> pd.DataFrame:
        """``ledger.csv``: one row per billed or possibly billed request, over all runs. Text
        is read as text (an id ``001``, ``1e5`` or ``nan`` stays what it was, so the ledger
        merges with :meth:`results` on ``job_id``); an empty cell is NA only in the token
        counts, which a provider may not report."""
        import pandas as pd

        dtypes = {name: LEDGER_DTYPES.get(name, "str") for name in LEDGER_COLUMNS}
        return pd.read_csv(
            self._files().ledger_csv,
            dtype=dtypes,
            keep_default_na=False,
            na_values={name: [""] for name, dtype in dtypes.items() if dtype == "Int64"},
        )

    def _files(self) -> LedgerFiles:
        if self.dry_run:
            raise RunnerError("a dry run writes no results and no ledger")
        if self.details.ledger is None:
            raise RunnerError(self.details.books_error or "this run wrote no results or ledger")
        return self.details.ledger

    def __repr__(self) -> str:
        stopped = f", stop_reason={self.stop_reason!r}" if self.stop_reason else ""
        dry = ", dry_run=True" if self.dry_run else ""
        versions = "".join(
            f", {name}={n}"
            for name, n in (
                ("rejected_redone", self.rejected_redone),
                ("edited_kept", self.edited_kept),
                ("edited_redone", self.edited_redone),
                ("unreadable_redone", self.unreadable_redone),
            )
            if n
        )
        return (
            f"RunReport(out={str(self.out)!r}, succeeded={self.succeeded}, failed={self.failed}, "
            f"pending={self.pending}, requests={self.requests}, "
            f"confirmed_usd={self.confirmed_usd:.2f}, possible_usd={self.possible_usd:.2f}"
            f"{versions}{stopped}, wall_s={self.wall_s:.1f}, exit_code={self.exit_code}{dry})"
        )


def run(
    manifest_or_jobs: JobsInput,
    out: str | os.PathLike[str] | None = None,
    *,
    options: Options | None = None,
    **fields: Unpack[OptionFields],
) -> RunReport:
    """Generate every image of ``manifest_or_jobs`` not yet done in ``out``; wait for the end.

    ``manifest_or_jobs``: a manifest's path (YAML or CSV), a list of dicts with the fields of a
    manifest's job, a pandas DataFrame with those columns (an empty cell is a field not set),
    or a manifest already loaded (:func:`load_manifest`, :func:`load_jobs`). ``out``: the
    output folder, its ``{date}`` and ``{datetime}`` filled in UTC
    (:func:`~runner.core.options.dated`); for a manifest's path it defaults to
    ``output/<manifest stem>``, as in the CLI. ``options``, and the keyword arguments that
    override its fields, are those of :class:`~runner.core.options.Options`
    (``concurrency=4``, ``emulate=True``, ...).

    Raises, before anything is sent, :class:`~runner.errors.ManifestError` (its ``str()`` is
    what the CLI prints), :class:`~runner.errors.OptionsError`,
    :class:`~runner.errors.CredentialsError`, :class:`~runner.errors.OutputLockedError` or
    :class:`~runner.errors.StoreError`; and :class:`~runner.errors.RunnerError` when
    ``base_url`` is a :class:`~runner.rehearsal.Emulator` of an ``async with`` on the loop
    running in this thread, which this call would block. Once requests went out it does not
    raise: whatever ended the run is the report's ``stop_reason``. A ``KeyboardInterrupt``
    while it runs stops it gracefully (a second one at once) and it returns the report."""
    prepared = _prepare(manifest_or_jobs, out, options, fields)
    if served_by_the_callers_loop(prepared.run_options.client.base_url):
        raise RunnerError(
            "base_url is an emulator served by the event loop of this thread (async with "
            "runner.Emulator()), which runner.run() would block while it waits: every request "
            "would time out. Use `with runner.Emulator()`, or `await runner.arun(...)`; "
            "nothing was sent"
        )
    outcome = _run_in_thread(prepared.jobs, prepared.run_options, emulate=prepared.options.emulate)
    return RunReport.of(outcome, prepared.run_options.out_dir, dry_run=prepared.options.dry_run)


async def arun(
    manifest_or_jobs: JobsInput,
    out: str | os.PathLike[str] | None = None,
    *,
    options: Options | None = None,
    **fields: Unpack[OptionFields],
) -> RunReport:
    """:func:`run` on the running event loop. The jobs are read and validated in a worker
    thread; cancelling this coroutine stops the run at once (its books still written) and is
    then passed on."""
    prepared = await asyncio.to_thread(_prepare, manifest_or_jobs, out, options, fields)
    outcome = await execute(prepared.jobs, prepared.run_options, emulate=prepared.options.emulate)
    return RunReport.of(outcome, prepared.run_options.out_dir, dry_run=prepared.options.dry_run)


async def execute(
    jobs: Sequence[Job],
    options: RunOptions,
    *,
    emulate: bool = False,
    on_run: Callable[[Run], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> lifecycle.RunReport:
    """Run ``jobs``, against a built-in emulator started for the run when ``emulate`` (not for
    a dry run, which sends nothing). ``on_run`` gets the :class:`~runner.core.lifecycle.Run`
    before it starts, to wire stops to it (the CLI's signal handlers, :func:`run`'s
    interrupts)."""
    async with contextlib.AsyncExitStack() as stack:
        if emulate and not options.dry_run:
            emulator = await stack.enter_async_context(Emulator())
            options = dataclasses.replace(
                options, client=dataclasses.replace(options.client, base_url=emulator.url)
            )
        the_run = Run(jobs, options, on_plan=on_plan, on_progress=on_progress)
        if on_run is not None:
            on_run(the_run)
        return await the_run.execute()


def exit_code(outcome: lifecycle.RunReport) -> int:
    """The CLI's exit code for a run (not a dry run): 0 all jobs succeeded, 1 some failed, 3
    stopped early or jobs left pending (resumable)."""
    if outcome.stop_reason or outcome.ledger is None:
        return EXIT_STOPPED
    if outcome.ledger.totals.failed:
        return EXIT_FAILED
    return EXIT_STOPPED if outcome.ledger.totals.pending else EXIT_OK


def worker_exit_code(outcome: lifecycle.RunReport) -> int:
    """The exit code of a worker that joined a run (``image-runner work``): 3 stopped early
    (its share left to the others, or the run stopped), 1 some of the jobs it sent failed, 0
    it found no job left. The run's own totals are the planning run's to tell."""
    if outcome.stop_reason:
        return EXIT_STOPPED
    failed = outcome.pool.progress.failed if outcome.pool else 0
    return EXIT_FAILED if failed else EXIT_OK


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A run's jobs, options and output folder, checked.

    The jobs read here are not closed after the run: the report's plan still reads them
    (``details.plan.todo``). Their spool frees its temporary file once nothing refers to it,
    the report included."""

    jobs: Sequence[Job]
    options: Options
    run_options: RunOptions


def _prepare(
    manifest_or_jobs: JobsInput,
    out: str | os.PathLike[str] | None,
    options: Options | None,
    fields: OptionFields,
) -> _Prepared:
    """Check the options and the key, then read and validate the jobs: in the CLI's order."""
    chosen = dataclasses.replace(options or Options(), **fields)
    if isinstance(manifest_or_jobs, str | os.PathLike):
        path = Path(manifest_or_jobs)
        out_dir = Path("output") / path.stem if out is None else dated(out)
        prepared = run_options(chosen, out_dir)
        manifest = load_manifest(path)
        return _Prepared(manifest, chosen, prepared)
    if out is None:
        raise TypeError("out= is needed when the jobs are not a manifest's path")
    prepared = run_options(chosen, dated(out))
    if isinstance(manifest_or_jobs, Manifest):
        return _Prepared(manifest_or_jobs, chosen, prepared)
    return _Prepared(load_jobs(manifest_or_jobs), chosen, prepared)


def _run_in_thread(
    jobs: Sequence[Job], options: RunOptions, *, emulate: bool
) -> lifecycle.RunReport:
    """:func:`execute` on a loop of its own in a worker thread, waited for here until the
    thread has ended; interrupts meanwhile stop the run, and never end the wait."""
    interrupts = _Interrupts(options.grace_s)
    outcome: list[lifecycle.RunReport] = []
    failure: list[BaseException] = []
    finished = threading.Event()

    def work() -> None:
        try:
            outcome.append(
                asyncio.run(execute(jobs, options, emulate=emulate, on_run=interrupts.attach))
            )
        except BaseException as exc:  # handed to the waiting thread, which raises it
            failure.append(exc)
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="image-runner")
    with _sigint_counted(interrupts):
        worker.start()
        while True:
            try:
                interrupts.hand_over()
                # In slices: a signal's Python handler runs in this thread only once it wakes
                # up, and the signal may have woken another thread. Not worker.join(0.1): a
                # KeyboardInterrupt inside it can leave is_alive() false while the thread runs.
                if finished.wait(0.1):
                    worker.join()
                    break
            except KeyboardInterrupt:  # raised by a SIGINT handler of the program's own
                interrupts.hear()
    if failure:
        raise failure[0]
    return outcome[0]


@contextlib.contextmanager
def _sigint_counted(interrupts: _Interrupts) -> Iterator[None]:
    """While the run goes on, SIGINT is counted by ``interrupts`` instead of raised as a
    ``KeyboardInterrupt``: one raised while the last was being handled would escape the wait,
    and :func:`run` would return with the run going on unattended, the folder locked. Python's
    own handler only, in the main thread (where handlers are set); another handler is the
    program's, and a ``KeyboardInterrupt`` it raises is caught by the wait instead."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupts.hear)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Interrupts:
    """The interrupts heard while :func:`run` waits, handed to the run on its own thread's loop;
    those heard before the run exists are handed over as it starts.

    Hearing one only appends to a list (atomic, it cannot fail half-way: it may run as a
    signal handler inside the handling of the one before); handing them over is idempotent,
    so a hand-over cut short is simply done again, and the run is stopped once per
    interrupt, never more."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._heard: list[None] = []
        self._told = 0  # interrupts the user was told of (the waiting thread's)
        self._handed = 0  # interrupts handed to the run's loop (the waiting thread's)
        self._stopped = 0  # run.stop() calls made (the run's loop's)
        self._target: tuple[Run, asyncio.AbstractEventLoop] | None = None

    def hear(self, *_: object) -> None:
        """An interrupt: also a SIGINT handler (it takes the signal and the frame)."""
        self._heard.append(None)

    def attach(self, run: Run) -> None:
        """On the run's loop, before it starts."""
        self._target = run, asyncio.get_running_loop()
        self._stop_run()

    def hand_over(self) -> None:
        """In the waiting thread: tell the user of, and stop the run for, the interrupts heard
        since the last call. The first stops it gracefully, the next at once."""
        while self._told < len(self._heard):  # read again: one may come as one is told
            if self._told == 0:
                log.warning(
                    "interrupted: finishing requests in flight (up to %g s); interrupt again "
                    "to stop at once",
                    self.grace_s,
                )
            elif self._told == 1:
                log.warning("interrupted again: stopping at once; writing results and ledger")
            self._told += 1
        heard, target = len(self._heard), self._target
        if target is not None and self._handed < heard:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
                target[1].call_soon_threadsafe(self._stop_run)
            self._handed = heard

    def _stop_run(self) -> None:
        """On the run's loop: one :meth:`Run.stop` per interrupt heard and not yet acted on."""
        if self._target is None:
            return
        while self._stopped < len(self._heard):
            self._stopped += 1
            self._target[0].stop(INTERRUPTED)
