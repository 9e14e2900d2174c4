"""The shared rate limit's table: one row per (rate group, lane) in ``image_runner.pace_lanes``.

Every worker of every run that sends to the same API (the rate group, by default its base URL)
paces each endpoint (the lane) from the same row, so that together they keep to the provider's
one limit. The row holds the pace (:class:`PaceRow`); what the pace should be is decided by
:mod:`runner.core.sharedpace`, this module only keeps it:

- :meth:`PaceTable.grant`, once per request, is ONE statement: it takes the next start time
  on the grid of ``1 / rate`` (``--rpm`` included), after any pause, on the database's clock,
  and bumps the lane's grant sequence number, which numbers every worker's requests in one
  order. The row is locked for that statement only, so a worker that dies leaves nothing held.
- :meth:`PaceTable.change` is for the rare changes of the pace (a 429, an announced limit, a
  step of the learning): the row locked for one short transaction, the change decided by a
  function of the core, written back only if it changed anything.

Times are seconds since the epoch on the database's clock (``clock_timestamp()``), the one
clock all workers share. The table is created ``IF NOT EXISTS`` under the schema's advisory
lock, with the migrations of this module recorded in ``image_runner.pacing_migrations``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from runner.errors import StoreError
from runner.store.postgres.connect import SHARED_SCHEMA, connect, store_error
from runner.store.postgres.schema import SCHEMA_LOCK_KEY

# A lane unused this long starts over, as a fresh run does: the limit it learned may be stale.
IDLE_RESET_S = 600.0

MIGRATIONS = (
    f"""
    CREATE TABLE IF NOT EXISTS {SHARED_SCHEMA}.pace_lanes (
        rate_group TEXT NOT NULL,
        lane TEXT NOT NULL,
        grant_seq BIGINT NOT NULL DEFAULT 0,
        slot_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        paused_until_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        rate_per_s DOUBLE PRECISION NULL,
        phase TEXT NOT NULL DEFAULT 'free',
        limited_count BIGINT NOT NULL DEFAULT 0,
        waited BOOLEAN NOT NULL DEFAULT false,
        anchor_seq BIGINT NOT NULL DEFAULT 0,
        anchor_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        limited_seqs BIGINT[] NOT NULL DEFAULT '{{}}',
        grown BOOLEAN NOT NULL DEFAULT false,
        counting BOOLEAN NOT NULL DEFAULT false,
        last_change_seq BIGINT NOT NULL DEFAULT 0,
        last_change_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        last_limited_seq BIGINT NOT NULL DEFAULT 0,
        last_limited_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        next_probe_at_s DOUBLE PRECISION NOT NULL DEFAULT 'infinity',
        announced_per_s DOUBLE PRECISION NULL,
        mark_seq BIGINT NOT NULL DEFAULT 0,
        mark_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        prev_mark_seq BIGINT NOT NULL DEFAULT 0,
        prev_mark_at_s DOUBLE PRECISION NOT NULL DEFAULT '-infinity',
        PRIMARY KEY (rate_group, lane)
    )
    """,
    # Issue 13: the cruise pace the measurement found, under which a lone 429 is a scattered one.
    f"ALTER TABLE {SHARED_SCHEMA}.pace_lanes "
    "ADD COLUMN IF NOT EXISTS proven_per_s DOUBLE PRECISION",
)


@dataclass(slots=True)
class PaceRow:
    """One lane's pace, as stored; the core's :mod:`runner.core.sharedpace` says what it means.
    Times ``*_at_s`` are database epoch seconds; ``*_seq`` are grant sequence numbers."""

    rate_group: str
    lane: str
    grant_seq: int  # requests granted so far
    slot_at_s: float  # the grid's last slot
    paused_until_s: float
    rate_per_s: float | None  # the learned pace; None: unpaced (but for --rpm)
    phase: str
    limited_count: int  # 429s seen by all workers
    waited: bool  # a request was held back since the last probe
    anchor_seq: int  # measuring: the 429 the count starts from
    anchor_at_s: float
    limited_seqs: list[int]  # measuring: the 429'd grants after the anchor
    grown: bool
    counting: bool
    last_change_seq: int  # 429s of grants up to this one are stale
    last_change_at_s: float
    last_limited_seq: int
    last_limited_at_s: float
    next_probe_at_s: float
    announced_per_s: float | None
    mark_seq: int  # two marks about a second apart: the rate before the first 429
    mark_at_s: float
    prev_mark_seq: int
    prev_mark_at_s: float
    proven_per_s: float | None  # cruise: the measured pace; a lone 429 under it is scattered


_COLUMNS = tuple(field.name for field in dataclasses.fields(PaceRow))
_STATE = _COLUMNS[2:]  # all but the key

_NOW = "extract(epoch FROM clock_timestamp())::float8"

# The grid as pacer.Lane.take keeps it: a little late keeps the grid (sleeps overshoot), idle
# for long banks no credit; a pause comes first. `least` ignores NULLs: the --rpm ceiling
# (%(ceiling)s) alone, the learned rate alone, the smaller of both, or unpaced.
_GRANT = f"""
WITH cur AS (
    SELECT rate_group, lane, slot_at_s, paused_until_s, {_NOW} AS now_s, mark_at_s,
           least(rate_per_s, %(ceiling)s::float8) AS r
    FROM {SHARED_SCHEMA}.pace_lanes
    WHERE rate_group = %(group)s AND lane = %(lane)s
    FOR UPDATE
), step AS (
    SELECT rate_group, lane, now_s, now_s - mark_at_s >= 1 AS roll,
           greatest(paused_until_s, CASE
               WHEN r IS NULL OR now_s - (slot_at_s + 1 / r) >= 0.25 / r THEN now_s
               ELSE slot_at_s + 1 / r END) AS slot
    FROM cur
)
UPDATE {SHARED_SCHEMA}.pace_lanes AS p SET
    grant_seq = p.grant_seq + 1,
    slot_at_s = step.slot,
    waited = p.waited OR step.slot > step.now_s,
    prev_mark_seq = CASE WHEN step.roll THEN p.mark_seq ELSE p.prev_mark_seq END,
    prev_mark_at_s = CASE WHEN step.roll THEN p.mark_at_s ELSE p.prev_mark_at_s END,
    mark_seq = CASE WHEN step.roll THEN p.grant_seq + 1 ELSE p.mark_seq END,
    mark_at_s = CASE WHEN step.roll THEN step.now_s ELSE p.mark_at_s END
FROM step
WHERE p.rate_group = step.rate_group AND p.lane = step.lane
RETURNING step.now_s, greatest(step.slot, step.now_s), {", ".join("p." + c for c in _COLUMNS)}
"""

# A new lane, or one idle since long ago, starts free, at the slow start's first pace; one in
# use is left as it is.
_JOIN = f"""
INSERT INTO {SHARED_SCHEMA}.pace_lanes AS p
    (rate_group, lane, mark_at_s, prev_mark_at_s, rate_per_s)
VALUES (%(group)s, %(lane)s, {_NOW}, {_NOW}, %(start)s)
ON CONFLICT (rate_group, lane) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _STATE)}
WHERE greatest(p.slot_at_s, p.paused_until_s) < {_NOW} - %(idle)s
"""

_LOCK = f"""
SELECT {_NOW}, {", ".join(_COLUMNS)} FROM {SHARED_SCHEMA}.pace_lanes
WHERE rate_group = %(rate_group)s AND lane = %(lane)s FOR UPDATE
"""

_UPDATE = f"""
UPDATE {SHARED_SCHEMA}.pace_lanes SET {", ".join(f"{c} = %({c})s" for c in _STATE)}
WHERE rate_group = %(rate_group)s AND lane = %(lane)s
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """A request may start at ``start_at_s`` (``now_s`` or later), the ``seq``-th of its lane;
    ``row`` is the lane as this grant left it."""

    now_s: float
    start_at_s: float
    row: PaceRow

    @property
    def seq(self) -> int:
        return self.row.grant_seq


class PaceTable:
    """The lanes of one rate group, over a connection of its own (used from one thread at a
    time: the limiter runs it in a thread of its own, off the event loop). ``group`` is
    stored as given and readable by every run of the database: the caller passes a digest
    (of the base URL and of the key's digest), never a URL that may carry credentials."""

    def __init__(self, conninfo: str, group: str) -> None:
        self.group = group
        self._state_url = conninfo
        self._conn = connect(conninfo)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"<PaceTable {self.group}>"

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        """Create the shared schema and this module's tables if they are missing, under the
        schema lock; refuse tables written by a newer image-runner."""
        conn = self._conn
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SHARED_SCHEMA}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SHARED_SCHEMA}.pacing_migrations "
                    "(version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                rows = conn.execute(f"SELECT version FROM {SHARED_SCHEMA}.pacing_migrations")
                done = {row[0] for row in rows}
                if done and max(done) > len(MIGRATIONS):
                    raise StoreError(
                        f"the shared rate limit's tables are at version {max(done)}, newer "
                        f"than this image-runner knows ({len(MIGRATIONS)}): upgrade it"
                    )
                for version, script in enumerate(MIGRATIONS, start=1):
                    if version not in done:
                        conn.execute(script)
                        conn.execute(
                            f"INSERT INTO {SHARED_SCHEMA}.pacing_migrations (version) VALUES (%s)",
                            (version,),
                        )
        except psycopg.Error as exc:
            raise store_error(
                exc, self._state_url, "cannot create the shared rate limit's tables", write=True
            ) from None

    def join(self, lane: str, start_per_s: float | None) -> None:
        """Make sure the lane has its row: a new one starts free at ``start_per_s`` (None:
        unpaced), one idle for :data:`IDLE_RESET_S` starts over, one in use keeps the pace its
        workers learned."""
        params = {"group": self.group, "lane": lane, "idle": IDLE_RESET_S, "start": start_per_s}
        try:
            self._conn.execute(_JOIN, params)
        except psycopg.Error as exc:
            raise store_error(
                exc, self._state_url, f"cannot add the rate lane {lane}", write=True
            ) from None

    def grant(self, lane: str, ceiling_per_s: float | None) -> Grant:
        """The next start time of a request in the lane (its row must exist: :meth:`join`)."""
        params = {"group": self.group, "lane": lane, "ceiling": ceiling_per_s}
        try:
            found = self._conn.execute(_GRANT, params).fetchone()
        except psycopg.Error as exc:
            raise store_error(
                exc, self._state_url, f"cannot pace a request to {lane}", write=True
            ) from None
        if found is None:
            raise StoreError(self._missing(lane))
        now_s, start_at_s, *state = found
        return Grant(now_s, start_at_s, PaceRow(*state))

    def change(self, lane: str, decide: Callable[[PaceRow, float], bool]) -> PaceRow:
        """Lock the lane's row, let ``decide(row, now_s)`` change it in place (True: it did),
        write it back if so; returns the row as it now is."""
        conn = self._conn
        try:
            with conn.transaction():
                found = conn.execute(_LOCK, {"rate_group": self.group, "lane": lane}).fetchone()
                if found is None:
                    raise StoreError(self._missing(lane))
                now_s, *state = found
                row = PaceRow(*state)
                if decide(row, now_s):
                    conn.execute(_UPDATE, dataclasses.asdict(row))
                return row
        except psycopg.Error as exc:
            raise store_error(
                exc, self._state_url, f"cannot change the pace of {lane}", write=True
            ) from None

    def _missing(self, lane: str) -> str:
        return f"the rate lane {lane} of {self.group} is missing from {SHARED_SCHEMA}.pace_lanes"
