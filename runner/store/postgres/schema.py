"""The PostgreSQL state's schema: one shared schema, one schema per run, and their migrations.

- ``image_runner`` (shared by every run of the database): ``locations`` (which schema holds
  the run of each output location), ``budgets`` (the spend caps runs share by name), its own
  ``migrations``; the shared rate limit's tables are :mod:`.pacing`'s.
- ``run_<16 hex of sha256(out_url)>`` (one run): the SQLite checkpoint's tables and columns
  (:mod:`runner.store.schema`, its migrations 1-4 as one), so that the SQL of one backend runs
  on the other through the ``search_path``: timestamps stay ISO-8601 text, money, sizes and
  nanoseconds are ``BIGINT``. Plus what workers share: ``jobs.seq`` (planning order, as
  SQLite's ``rowid``), the columns that rebuild a whole job without its manifest
  (``response_format``, ``row``, ``variant``), the run's to-do (``queued``, with a partial
  index in planning order) and who claimed each job (``claimed_by``), ``attempts.worker_id``,
  ``workers`` (their leases, on the database's clock), ``control`` (a run-wide stop, the
  budget the run spends from, the planning run's ``--rpm``) and ``runs.worker_id``.
- Creation and migrations run in one transaction under ``pg_advisory_xact_lock``: two workers
  starting together wait for each other instead of racing. A schema written by a newer
  image-runner is refused untouched.
"""

from __future__ import annotations

from typing import Any

import psycopg

from runner.errors import StoreError
from runner.store.postgres.connect import (
    SHARED_SCHEMA,
    connect,
    run_schema,
    set_search_path,
    store_error,
)
from runner.store.schema import now_iso
from runner.store.urls import safe_url

# Any constant both sides agree on: the key of the lock that serialises schema changes.
SCHEMA_LOCK_KEY = 0x1A6E_5C4E_3A00

SHARED_MIGRATIONS = (
    f"""
    CREATE TABLE IF NOT EXISTS {SHARED_SCHEMA}.locations (
        out_url TEXT PRIMARY KEY,
        schema_name TEXT UNIQUE NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {SHARED_SCHEMA}.budgets (
        name TEXT PRIMARY KEY,
        cap_micro_usd BIGINT NULL,
        committed_micro_usd BIGINT NOT NULL DEFAULT 0
    );
    """,
)

RUN_MIGRATIONS = (
    """
    CREATE TABLE jobs (
        job_id TEXT COLLATE "C" PRIMARY KEY,
        seq BIGSERIAL NOT NULL,
        content_hash TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
        endpoint TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        size TEXT COLLATE "C",
        prompt TEXT COLLATE "C" NOT NULL,
        images TEXT COLLATE "C" NOT NULL,
        response_format TEXT COLLATE "C" NOT NULL,
        row TEXT COLLATE "C" NOT NULL DEFAULT '',
        variant TEXT COLLATE "C" NOT NULL DEFAULT '',
        image_path TEXT COLLATE "C",
        width INTEGER,
        height INTEGER,
        sha256 TEXT COLLATE "C",
        error TEXT COLLATE "C",
        error_cause TEXT COLLATE "C",
        retryable INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT COLLATE "C" NOT NULL,
        image_size_bytes BIGINT,
        image_mtime_ns BIGINT,
        image_ctime_ns BIGINT,
        version INTEGER NOT NULL DEFAULT 1,
        edited_at TEXT COLLATE "C",
        vars TEXT COLLATE "C",
        repeat_index INTEGER,
        template TEXT COLLATE "C",
        queued BOOLEAN NOT NULL DEFAULT false,
        claimed_by BIGINT NULL
    );
    CREATE INDEX jobs_seq ON jobs (seq);
    CREATE INDEX jobs_queued ON jobs (seq) WHERE queued;
    CREATE INDEX jobs_claimed_by ON jobs (claimed_by) WHERE claimed_by IS NOT NULL;
    CREATE TABLE attempts (
        job_id TEXT COLLATE "C" NOT NULL,
        attempt INTEGER NOT NULL,
        endpoint TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        size TEXT COLLATE "C",
        state TEXT COLLATE "C" NOT NULL
            CHECK (state IN ('in_flight', 'confirmed', 'possible', 'unbilled')),
        cost_micro_usd BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT,
        output_tokens BIGINT,
        total_tokens BIGINT,
        error TEXT COLLATE "C",
        started_at TEXT COLLATE "C" NOT NULL,
        finished_at TEXT COLLATE "C",
        worker_id BIGINT NULL,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE INDEX attempts_state ON attempts (state);
    CREATE INDEX attempts_in_flight ON attempts (worker_id) WHERE state = 'in_flight';
    CREATE TABLE runs (
        run_id BIGSERIAL PRIMARY KEY,
        started_at TEXT COLLATE "C" NOT NULL,
        finished_at TEXT COLLATE "C",
        outcome TEXT COLLATE "C",
        pid INTEGER,
        worker_id BIGINT NULL
    );
    CREATE TABLE versions (
        job_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        image_path TEXT COLLATE "C",
        sha256 TEXT COLLATE "C",
        width INTEGER,
        height INTEGER,
        reason TEXT COLLATE "C" NOT NULL
            CHECK (reason IN ('rejected', 'edited', 'changed', 'missing', 'unreadable')),
        retired_at TEXT COLLATE "C" NOT NULL,
        moved INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, version)
    );
    CREATE INDEX versions_unmoved ON versions (job_id) WHERE moved = 0;
    CREATE TABLE reviews (
        review_id BIGSERIAL PRIMARY KEY,
        job_id TEXT COLLATE "C" NOT NULL,
        version INTEGER NOT NULL,
        decision TEXT COLLATE "C" NOT NULL
            CHECK (decision IN ('approved', 'rejected', 'unreviewed')),
        reviewer TEXT COLLATE "C" NOT NULL,
        decided_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX reviews_of_version ON reviews (job_id, version, review_id);
    CREATE TABLE workers (
        worker_id BIGSERIAL PRIMARY KEY,
        host TEXT COLLATE "C",
        pid INTEGER,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        lease_expires_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ NULL
    );
    CREATE TABLE control (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        stop_reason TEXT COLLATE "C" NULL,
        stopped_at TIMESTAMPTZ,
        budget TEXT COLLATE "C" NOT NULL
    );
    """,
    # The plan marker; jobs rewritten in place often (claims, queue, outcomes): room on each
    # page and early vacuums; attempts_state dropped (settling reads attempts_in_flight).
    """
    ALTER TABLE control ADD COLUMN planned_at TIMESTAMPTZ NULL;
    ALTER TABLE jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                          autovacuum_analyze_scale_factor = 0.02);
    DROP INDEX IF EXISTS attempts_state;
    CREATE INDEX jobs_failed ON jobs (seq) WHERE status = 'failed';
    """,
    # The planning run's --rpm: the ceiling every worker of the run paces under.
    """
    ALTER TABLE control ADD COLUMN rpm DOUBLE PRECISION NULL;
    """,
)


def open_run(
    state_url: str,
    out_url: str,
    *,
    create: bool,
    budget: str | None = None,
    rpm: float | None = None,
    autocommit: bool = True,
) -> psycopg.Connection[Any]:
    """A connection to the run of ``out_url`` with its ``search_path`` set: its schema created
    or brought up to date first when ``create`` (the planning run; ``budget`` names the shared
    budget it spends from, default its own, ``out_url``; ``rpm`` is its ``--rpm``, the run's
    ceiling), else required to exist at this version (a joining worker, the views, a dry run).
    Closed on every failure."""
    conn = connect(state_url, autocommit=True)
    schema = run_schema(out_url)
    try:
        if create:
            migrate(conn, state_url, out_url, budget, rpm)
        else:
            check_exists(conn, state_url, out_url)
        set_search_path(conn, schema)
        conn.autocommit = autocommit
    except psycopg.Error as exc:
        conn.close()
        raise store_error(exc, state_url, f"cannot open the run of {out_url}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(
    conn: psycopg.Connection[Any],
    state_url: str,
    out_url: str,
    budget: str | None,
    rpm: float | None = None,
) -> None:
    """Create the shared schema and the run's (tables, control row) or apply the migrations
    they lack, make ``budget`` the run's budget (its row created if new) and ``rpm`` its
    ceiling, all in one transaction under the schema lock. Either, when None, stays as an
    earlier run recorded it (a new run: its own budget, named ``out_url``, and no ceiling): a
    rerun without ``--budget`` must not move the run off the budget it shares, nor one without
    ``--rpm`` lift its ceiling. Recorded before the plan is queued, so that a worker waiting
    for the plan finds them once it is."""
    schema = run_schema(out_url)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SHARED_SCHEMA}")
        _apply(conn, state_url, SHARED_SCHEMA, SHARED_MIGRATIONS, "the shared schema")
        conn.execute(
            f"INSERT INTO {SHARED_SCHEMA}.locations (out_url, schema_name) VALUES (%s, %s) "
            "ON CONFLICT (out_url) DO NOTHING",
            (out_url, schema),
        )
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        _apply(conn, state_url, schema, RUN_MIGRATIONS, f"the run of {out_url}")
        recorded = conn.execute(
            f'INSERT INTO "{schema}".control AS c (id, budget, rpm) '
            "VALUES (1, COALESCE(%(budget)s, %(out)s), %(rpm)s) "
            "ON CONFLICT (id) DO UPDATE SET budget = COALESCE(%(budget)s, c.budget), "
            "rpm = COALESCE(%(rpm)s, c.rpm) RETURNING budget",
            {"budget": budget, "out": out_url, "rpm": rpm},
        ).fetchone()
        assert recorded is not None  # an upsert with RETURNING returns its row
        conn.execute(
            f"INSERT INTO {SHARED_SCHEMA}.budgets (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
            (recorded[0],),
        )


def _apply(
    conn: psycopg.Connection[Any],
    state_url: str,
    schema: str,
    migrations: tuple[str, ...],
    what: str,
) -> None:
    conn.execute(
        f'CREATE TABLE IF NOT EXISTS "{schema}".migrations '
        "(version INTEGER PRIMARY KEY, applied_at TEXT)"
    )
    done = {r[0] for r in conn.execute(f'SELECT version FROM "{schema}".migrations')}
    if done and max(done) > len(migrations):
        raise StoreError(_newer(state_url, what, max(done), len(migrations)))
    set_search_path(conn, schema)
    for version, script in enumerate(migrations, start=1):
        if version not in done:
            conn.execute(script)
            conn.execute(f'INSERT INTO "{schema}".migrations VALUES (%s, %s)', (version, now_iso()))


def check_exists(conn: psycopg.Connection[Any], state_url: str, out_url: str) -> None:
    """Refuse a run the database does not hold, or holds at another version than this one's."""
    known = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
        (f"{SHARED_SCHEMA}.locations", f'"{run_schema(out_url)}".migrations'),
    ).fetchone()
    if known is None or not all(known):
        raise StoreError(
            f"no run planned at {out_url} in PostgreSQL state {safe_url(state_url)}: plan it "
            "with `image-runner run` first (--state and --out as given here)"
        )
    row = conn.execute(f'SELECT MAX(version) FROM "{run_schema(out_url)}".migrations').fetchone()
    version = int(row[0] or 0) if row else 0
    if version > len(RUN_MIGRATIONS):
        raise StoreError(_newer(state_url, f"the run of {out_url}", version, len(RUN_MIGRATIONS)))
    if version < len(RUN_MIGRATIONS):
        raise StoreError(
            f"the run of {out_url} in {safe_url(state_url)} was written by an older "
            "image-runner: run `image-runner run` on it once to upgrade it"
        )


def _newer(state_url: str, what: str, version: int, known: int) -> str:
    return (
        f"{what} in PostgreSQL state {safe_url(state_url)} was written by a newer image-runner "
        f"(its schema is at version {version}, this one knows up to {known}): use that "
        "version, or upgrade this one; it was left as it is"
    )
