"""Where a run stands: ``image-runner status``, read from the checkpoint alone, safe at any time.

It owns telling where a run stands from an output folder's checkpoint without disturbing a run
that may be writing it: the store is opened read-only and without the folder's lock, and every
number comes from one snapshot (:meth:`~runner.store.views.Views.status_facts`), so counts and
spend belong to the same moment.

A run on one machine is *live* when the latest run recorded has not finished and its process is
still alive. A run in a database (``--state``) is worked on by processes on other machines, whose
pids say nothing here: it is live while a worker holds a valid lease (its heartbeat renews it;
:meth:`~runner.store.postgres.PostgresStore.live_workers`), and ``status`` says how many do.
Unfinished and without a live process or worker, the run died without settling (``kill -9``,
power loss): it is *interrupted*, and the requests it had in flight may have been billed; the
next run of the manifest counts them as possible charges and resumes the rest.

Jobs are those of the checkpoint: every job ever planned in the folder, so a manifest that
shrank since shows more here than in ``results.csv``, which follows the manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from runner.provider import MICRO, PRICE_PER_IMAGE_MICRO_USD
from runner.store.views import LastRun, Viewable
from runner.words import plural

RunState = Literal["live", "finished", "interrupted", "never_run"]


@runtime_checkable
class Staffed(Protocol):
    """A store whose run is worked on by leased workers, anywhere (the PostgreSQL one)."""

    def live_workers(self) -> int: ...


@dataclass(frozen=True)
class RunStatus:
    folder: Path
    state: RunState
    succeeded: int
    failed: int
    failed_retryable: int  # of ``failed``: a rerun of the manifest tries these again
    pending: int
    in_flight: int  # requests out right now; only while live
    cut_off: int  # requests an interrupted run left in flight: possibly billed
    confirmed_usd: float
    possible_usd: float  # recorded possible charges, plus ``cut_off`` at the image price
    last_activity_at: datetime | None
    idle_s: float | None  # since ``last_activity_at``
    last_run: LastRun | None
    failures: dict[str, int] = field(default_factory=dict)  # error cause -> failed jobs
    # Workers holding a valid lease on a run in a database; None: a run on one machine.
    workers_live: int | None = None

    @property
    def jobs(self) -> int:
        return self.succeeded + self.failed + self.pending

    @property
    def live(self) -> bool:
        return self.state == "live"

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe view, for ``status --json``."""
        last_run, last_at = self.last_run, self.last_activity_at
        return {
            "folder": str(self.folder),
            "state": self.state,
            "live": self.live,
            "jobs": {
                "total": self.jobs,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "failed_retryable": self.failed_retryable,
                "pending": self.pending,
            },
            "in_flight": self.in_flight,
            "workers_live": self.workers_live,
            "cut_off": self.cut_off,
            "spend_usd": {"confirmed": self.confirmed_usd, "possible": self.possible_usd},
            "last_activity_at": last_at.isoformat(timespec="milliseconds") if last_at else None,
            "idle_s": self.idle_s,
            "last_run": None
            if last_run is None
            else {
                "run_id": last_run.run_id,
                "started_at": last_run.started_at,
                "finished_at": last_run.finished_at,
                "outcome": last_run.outcome,
                "pid": last_run.pid,
            },
            "failures": dict(self.failures),
        }


def read_status(store: Viewable, *, now: datetime | None = None) -> RunStatus:
    """Read where the run in ``store``'s folder stands; ``now`` is for tests."""
    facts = store.views().status_facts()
    if facts is None:
        return _nothing_yet(store.folder)
    now = now or datetime.now(UTC)
    workers = store.live_workers() if isinstance(store, Staffed) else None
    state = _state(facts.last_run, workers)
    # A live run settles nothing yet; an interrupted one left these without an outcome.
    cut_off = facts.in_flight if state == "interrupted" else 0
    possible_micro = facts.possible_micro_usd + cut_off * PRICE_PER_IMAGE_MICRO_USD
    last_at = datetime.fromisoformat(facts.last_activity_at) if facts.last_activity_at else None
    return RunStatus(
        folder=store.folder,
        state=state,
        succeeded=facts.succeeded,
        failed=facts.failed,
        failed_retryable=facts.failed_retryable,
        pending=facts.pending,
        in_flight=facts.in_flight if state == "live" else 0,
        cut_off=cut_off,
        confirmed_usd=facts.confirmed_micro_usd / MICRO,
        possible_usd=possible_micro / MICRO,
        last_activity_at=last_at,
        idle_s=max(0.0, (now - last_at).total_seconds()) if last_at else None,
        last_run=facts.last_run,
        failures=facts.failures,
        workers_live=workers,
    )


def _nothing_yet(folder: Path) -> RunStatus:
    return RunStatus(
        folder=folder,
        state="never_run",
        succeeded=0,
        failed=0,
        failed_retryable=0,
        pending=0,
        in_flight=0,
        cut_off=0,
        confirmed_usd=0.0,
        possible_usd=0.0,
        last_activity_at=None,
        idle_s=None,
        last_run=None,
    )


def _state(last_run: LastRun | None, workers_live: int | None) -> RunState:
    if workers_live:
        return "live"
    if last_run is None:
        return "never_run"
    if last_run.finished_at is not None:
        return "finished"
    if workers_live is None and last_run.pid is not None and _process_alive(last_run.pid):
        return "live"
    return "interrupted"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


# --- the human view -------------------------------------------------------------------------


def format_status(status: RunStatus) -> str:
    """A few aligned lines, like the summary of ``image-runner run``."""
    s = status
    failed = f"{s.failed} failed"
    if s.failed_retryable:
        failed += f" ({s.failed_retryable} retried by a rerun)"
    lines = [
        f"folder:    {s.folder}",
        f"state:     {_describe_state(s)}",
        f"jobs:      {s.jobs}: {s.succeeded} succeeded, {failed}, {s.pending} pending",
    ]
    if s.workers_live is not None:
        lines.append(f"workers:   {s.workers_live} live")
    if s.live:
        lines.append(f"in flight: {plural(s.in_flight, 'request')}")
    lines.append(
        f"spent:     ${s.confirmed_usd:.2f} confirmed + ${s.possible_usd:.2f} possible "
        "(all runs in this folder)"
    )
    if s.cut_off:
        lines.append(
            f"cut off:   {plural(s.cut_off, 'request')} "
            f"{'was' if s.cut_off == 1 else 'were'} in flight when it ended: "
            "counted above as possible"
        )
    if s.last_activity_at is not None and s.idle_s is not None:
        lines.append(f"activity:  last {_when(s.last_activity_at)}, {_ago(s.idle_s)}")
    if s.failures:
        causes = ", ".join(f"{n} {cause}" for cause, n in s.failures.items())
        lines.append(f"failures:  {causes}")
    return "\n".join(lines)


def _describe_state(s: RunStatus) -> str:
    run = s.last_run
    if s.state == "live" and s.workers_live is not None:
        since = f", latest run {run.run_id} started {_when(run.started_at)}" if run else ""
        return f"live: {plural(s.workers_live, 'worker')} holding a lease{since}"
    if run is None:
        return "no run recorded yet"
    if s.state == "live":
        return f"live: run {run.run_id}, pid {run.pid}, started {_when(run.started_at)}"
    if s.state == "interrupted" and s.workers_live is not None:
        return (
            f"interrupted: run {run.run_id} ended without finishing and no worker holds a "
            "lease; rerun the same command to resume"
        )
    if s.state == "interrupted":
        return (
            f"interrupted: run {run.run_id} (pid {run.pid}) ended without finishing; "
            "rerun the same command to resume"
        )
    if run.outcome not in (None, "finished"):
        return f"stopped: run {run.run_id}: {run.outcome}; rerun the same command to resume"
    finished = f"finished (run {run.run_id}, {_when(run.finished_at or run.started_at)})"
    left = s.pending + s.failed_retryable
    if not left:
        return finished
    return f"{finished}; {plural(left, 'job')} left: rerun the same command to do them"


def _when(moment: str | datetime) -> str:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"
