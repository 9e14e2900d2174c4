"""What the CLI prints about a run: the progress bar, the summary at the end, the dry run's plan.

Everything passes :func:`~runner.redact.redact` on its way out. Counts are written with
:func:`plural`: "1 job", "2 jobs". The summary and the plan go to stdout (a script reads them);
the progress bar, with what the plan found, goes to stderr, as do errors. With ``run --json``
the summary and the plan go to stderr too, leaving stdout to the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Never, TextIO

from tqdm import tqdm

from runner.core.lifecycle import RunReport
from runner.core.options import under
from runner.core.plan import Plan
from runner.core.progress import Progress
from runner.http import client
from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD
from runner.redact import redact
from runner.store.base import Budget
from runner.words import plural, usd


def err(message: str) -> None:
    print(redact(message), file=sys.stderr, flush=True)


class ProgressBar:
    """The run's progress on stderr: what the plan found, then a tqdm bar fed by the pool's
    counters; the first failure of each cause is told as it happens."""

    def __init__(self, *, disable: bool | None) -> None:
        self.disable = disable
        self.bar: tqdm[Never] | None = None
        self.causes_told: set[str] = set()

    def start(self, plan: Plan) -> None:
        parts = [f"{len(plan.todo)} to do", f"{plan.done} done before"]
        if plan.failed:
            parts.append(f"{plan.failed} failed before (not retried)")
        if plan.adopted:
            parts.append(f"{plan.adopted} adopted from disk")
        if plan.missing:
            parts.append(f"{len(plan.missing)} redone (image missing)")
        if plan.rejected:
            parts.append(f"{len(plan.rejected)} rejected in review, made again")
        if plan.unreadable:
            parts.append(f"{len(plan.unreadable)} unreadable (not an image), made again")
        if plan.redo_edited:
            parts.append(f"{len(plan.redo_edited)} edited by hand, made again")
        if plan.edited:
            parts.append(f"{len(plan.edited)} found edited by hand, kept")
        if plan.retried_failed:
            parts.append(f"{len(plan.retried_failed)} failed before and retried")
        if plan.changed:
            parts.append(f"{len(plan.changed)} changed in the manifest")
        if plan.in_flight_settled:
            interrupted = plural(plan.in_flight_settled, "interrupted request")
            parts.append(f"{interrupted} counted as possible")
        err("image-runner: " + ", ".join(parts))
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


def print_worker_summary(
    report: RunReport, out_dir: Path | str, file: TextIO | None = None
) -> None:
    """The end of a worker that joined a run: what it did, and why it ended. The run's totals
    are in the planning run's summary, and ``image-runner status``."""
    progress = report.pool.progress if report.pool else None
    done = (progress.succeeded, progress.failed, progress.requests) if progress else (0, 0, 0)
    confirmed = progress.confirmed_micro_usd / MICRO if progress else 0.0
    possible = progress.possible_micro_usd / MICRO if progress else 0.0
    ended = f"stopped: {report.stop_reason}" if report.stop_reason else "no job left in the run"
    lines = [
        f"worker:    {done[0]} succeeded, {done[1]} failed, {plural(done[2], 'request')}; "
        f"${confirmed:.2f} confirmed + ${possible:.2f} possible",
        f"ended:     {ended}",
        f"wall time: {report.wall_s:.1f} s",
        f"the run:   image-runner status {out_dir} --state URL",
    ]
    print(redact("\n".join(lines)), file=file)


def print_summary(report: RunReport, out_dir: Path | str, file: TextIO | None = None) -> None:
    """The end of a run, on ``file`` (default: stdout): counts, spend, stops and where the
    files are."""
    if report.ledger is None:  # the disk refused them: say so, and what stopped the run
        stopped = f"stopped:   {report.stop_reason}\n" if report.stop_reason else ""
        print(
            redact(f"{stopped}results:   {report.books_error}; rerun the same command"), file=file
        )
        return
    t = report.ledger.totals
    progress = report.pool.progress if report.pool else None
    requests = progress.requests if progress else 0
    lines = [
        f"jobs:      {t.jobs}: {t.succeeded} succeeded, {t.failed} failed"
        + (f" ({t.failed_retry_on_rerun} retried by a rerun)" if t.failed_retry_on_rerun else "")
        + f", {t.pending} pending",
        *version_lines(report.plan, out_dir, "versions:  "),
        f"spent:     ${t.confirmed_usd:.2f} confirmed + ${t.possible_usd:.2f} possible "
        f"(all runs in this folder); {plural(requests, 'request')} this run",
        f"wall time: {report.wall_s:.1f} s",
    ]
    for lane, (limited, rpm) in sorted((report.pool.rate_limits if report.pool else {}).items()):
        pace = f"; paced at {rpm:.0f} requests/min" if rpm else ""
        lines.append(f"rate limit: {lane}: {plural(limited, 'request')} answered 429{pace}")
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
        hint = stop_hint(report)
        if hint:
            lines.append(f"           {hint}")
        left = plural(t.pending, "job")
        lines.append(f"           left to do: {left}, {usd(t.pending)} at $0.03 each")
    lines += [
        f"images:    {under(out_dir, 'images')}/",
        f"results:   {report.ledger.results_parquet} (and .csv)",
        f"ledger:    {report.ledger.ledger_csv}",
    ]
    if not report.cancelled:
        lines.append(f"report:    {under(out_dir, 'report.html')}")
    print(redact("\n".join(lines)), file=file)


def print_plan(
    report: RunReport,
    manifest: Path,
    out_dir: Path | str,
    cap_usd: float | None,
    file: TextIO | None = None,
) -> None:
    """A dry run's plan, on ``file`` (default: stdout): what would be sent, what it would
    cost, what the budget allows, and where the first images would go."""
    plan, edits = report.plan, report.plan.todo_edits
    confirmed, possible = (micro_usd / MICRO for micro_usd in plan.spent_micro_usd)
    spent = confirmed + possible
    todo = len(plan.todo)
    lines = [
        f"plan for {manifest} -> {out_dir} (dry run: nothing was sent)",
        f"  to do:     {plural(todo, 'job')} ({plural(todo - edits, 'generation')}, "
        f"{plural(edits, 'edit')}) = {plural(todo, 'image')}",
        f"  estimated: {usd(todo)} at $0.03 an image, before retries",
        f"  done:      {plan.done} (verified on disk); failed before and not retried: "
        f"{plan.failed}",
        f"  spent:     ${confirmed:.2f} confirmed + ${possible:.2f} possible in this folder",
        *version_lines(plan, out_dir, "  versions:  "),
    ]
    if cap_usd is not None:
        budget = Budget(round(cap_usd * MICRO), round(spent * MICRO))
        left_micro_usd = budget.left_micro_usd or 0
        left = left_micro_usd / MICRO
        fits = left_micro_usd // PRICE_PER_IMAGE_MICRO_USD
        verdict = "enough" if fits >= todo else f"NOT enough: {plural(fits, 'image')} fit"
        lines.append(f"  budget:    ${cap_usd:.2f} cap, ${left:.2f} left: {verdict}")
    for i, job in enumerate(plan.todo[:3]):
        label = "  samples:   " if i == 0 else "             "
        lines.append(f"{label}{under(out_dir, 'images', job.id)}.png")
    print(redact("\n".join(lines)), file=file)


def version_lines(plan: Plan, out_dir: Path | str, label: str) -> list[str]:
    """What the plan does with images reviewed or edited since they were made: those rejected
    and made again, those replaced by a file that does not decode and made again, those edited
    by hand and kept (or made again); none if nothing."""
    notes = []
    if plan.rejected:
        rejected = plural(len(plan.rejected), "rejected image")
        notes.append(f"{rejected} made again (the old ones kept in {under(out_dir, 'rejected')}/)")
    if plan.unreadable:
        files = plural(len(plan.unreadable), "image file")
        notes.append(
            f"{files} that did not decode: made again (kept in {under(out_dir, 'edited')}/)"
        )
    if plan.redo_edited:
        edited = plural(len(plan.redo_edited), "image")
        notes.append(
            f"{edited} edited by hand made again (the edits kept in {under(out_dir, 'edited')}/)"
        )
    if plan.edited:
        n = len(plan.edited)
        notes.append(
            f"{plural(n, 'image')} found edited by hand: kept in place, not paid for again "
            f"(--redo-edited makes {'it' if n == 1 else 'them'} again)"
        )
    indent = " " * len(label)
    return [(label if i == 0 else indent) + note for i, note in enumerate(notes)]


def stop_hint(report: RunReport) -> str | None:
    """What to do about the error that stopped the run, when its HTTP status says."""
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
            f"before /images, usually ending in /v1, as in {client.DEFAULT_BASE_URL}; no job "
            "was marked failed"
        )
    return None
