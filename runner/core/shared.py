"""What a run whose state is shared (``--state``) does besides what one machine does: its plan
queued for every worker (planned without sweeping away the temp files live workers write in a
shared local folder), and one pace for every worker of every run against the same API key.

On one machine (the SQLite checkpoint) neither applies: the plan goes to this process's pool as
it is, without a list of ids being made, and the pace is this process's own
(:class:`~runner.core.limiter.RateLimiter`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence

from runner.core.limiter import Limiter
from runner.core.pacer import PacerConfig
from runner.core.plan import Plan, make_plan
from runner.http.client import ClientConfig
from runner.jobs import Job
from runner.storage import Location
from runner.store import Store

Sleep = Callable[[float], Awaitable[None]]

TEMP_AGE_LEASES = 2  # a temp file unmodified for this many leases is no live worker's ...
TEMP_MIN_AGE_S = 60.0  # ... nor one younger than this (a lease of a few seconds in tests)


def plan_and_queue(
    jobs: Sequence[Job],
    store: Store,
    *,
    retry_failed: bool,
    only: frozenset[str],
    redo_edited: bool,
    dry_run: bool,
    location: Location | None,
    shared: bool,
) -> Plan:
    """The plan (:func:`~runner.core.plan.make_plan`), and with a ``shared`` state its to-do
    recorded as the run's queue for every worker (a dry run records nothing); in the planning
    thread."""
    plan = make_plan(
        jobs,
        store,
        retry_failed=retry_failed,
        only=only,
        redo_edited=redo_edited,
        dry_run=dry_run,
        location=location,
        temp_min_age_s=live_temp_age_s() if shared else 0.0,
    )
    if not dry_run and shared:  # one machine: the plan goes to this pool, no list is made
        store.queue([job.id for job in plan.todo])
    return plan


def live_temp_age_s() -> float:
    """How long a temp file in a shared local folder may go unmodified and still be a live
    worker's: twice the lease, at least a minute. A worker whose lease is that far gone has
    lost its claims; an answer it still streams is written at every chunk, so stays young."""
    from runner.store.postgres.claims import lease_s

    return max(TEMP_AGE_LEASES * lease_s(), TEMP_MIN_AGE_S)


def shared_limiter(
    state_url: str | None, client: ClientConfig, pacer: PacerConfig
) -> Callable[[Sleep], Limiter] | None:
    """With a shared state, the pace every worker of every run against the same API and key
    shares (one rate limit for one key), kept in the state's database; None: this process's
    own pacer. The rate group is named by digests of the base URL and the key, never by either:
    a base URL may carry a credential of its own (a gateway's ``?key=``), and the group is
    readable by every run in the database."""
    if state_url is None:
        return None
    from runner.core.sharedpace import SharedRateLimiter

    key = hashlib.sha256((client.api_key or "").encode()).hexdigest()[:12]
    api = hashlib.sha256(client.base_url.encode()).hexdigest()[:12]
    group = f"api {api} key {key}"

    def make(sleep: Sleep) -> Limiter:
        return SharedRateLimiter(state_url, group, pacer, sleep=sleep)

    return make
