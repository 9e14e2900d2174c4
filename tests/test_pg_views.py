"""The views on PostgreSQL read what they read on SQLite: the same state, built by real runs on
the emulator in a SQLite checkpoint and copied row for row into a run's schema of a real
PostgreSQL, gives equal results, ledger, status, report, export and review views on both (their
values and their types: a sum is an ``int`` on both). Snapshots are ``REPEATABLE READ READ
ONLY`` transactions, and streams server-side cursors."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runner.emulator import Emulator
from runner.errors import StoreError
from runner.storage.base import location_url as normalise_out
from runner.store import Decision, open_read_only, open_review_log
from runner.store.base import Store
from runner.store.postgres import open_pg_read_only
from runner.store.postgres.schema import open_run
from runner.store.postgres.views import PostgresViews
from runner.store.schema import now_iso
from runner.store.views import Views
from tests.conftest import db_exec, make_ref, run_manifest, write_manifest
from tests.services import PG_PASSWORD


def manifest_jobs(folder: Path) -> list[dict[str, Any]]:
    ref = make_ref(folder / "refs", "product.png")
    return [
        {"id": "a", "prompt": "an apple", "size": "1280x720"},
        {"id": "b", "prompt": "a banana", "size": "1280x720"},
        {"id": "c", "prompt": "a cherry", "size": "1280x1280"},
        {"id": "bad", "prompt": "refused [[faults:policy]]", "size": "1280x720"},
        {"id": "busy", "prompt": "later [[faults:503,503]]", "size": "1280x720"},
        {"id": "cut", "prompt": "cut off [[faults:truncate]]", "size": "1280x720"},
        {"id": "edit", "prompt": "on a table", "images": [str(ref)], "size": "auto"},
        {
            "id": "m",
            "prompt": "A {style} photo of a {subject}",
            "vars": {"style": ["watercolor", 2.5], "subject": ["cat", 7]},
            "repeat": 2,
        },
    ]


async def build_checkpoint(tmp_path: Path, base_url: str) -> Path:
    """A SQLite checkpoint with every kind of row: successes, failures (retryable or not, a
    possible charge), an edit with its reference, matrix jobs, reviews (an undo among them), a
    regenerated job with its earlier version, a pending job with an attempt in flight, and a
    run cut off."""
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, manifest_jobs(tmp_path))
    await run_manifest(manifest, out, base_url, max_attempts=1)
    with open_review_log(out) as log:
        log.decide([Decision("a", "approved"), Decision("b", "rejected")], "ana")
        log.decide([Decision("c", "rejected"), Decision("edit", "approved")], "bo")
        log.decide([Decision("c", "unreviewed")], "bo")
    await run_manifest(manifest, out, base_url, max_attempts=1)  # b again, as version 2
    stamp = now_iso()
    db_exec(out, f"INSERT INTO runs (started_at, pid) VALUES ('{stamp}', 4242)")
    db_exec(
        out,
        "INSERT INTO jobs (job_id, content_hash, status, endpoint, model, size, prompt, images, "
        "updated_at) SELECT 'later', content_hash, 'pending', endpoint, model, size, "
        f"'one more', '[]', '{stamp}' FROM jobs WHERE job_id = 'a'",
    )
    db_exec(
        out,
        "INSERT INTO attempts (job_id, attempt, endpoint, model, size, state, cost_micro_usd, "
        f"started_at) SELECT 'later', 1, endpoint, model, size, 'in_flight', 0, '{stamp}' "
        "FROM attempts WHERE job_id = 'a'",
    )
    return out


TABLES = ("jobs", "attempts", "runs", "versions", "reviews")


def copy_to_postgres(out: Path, pg_url: str) -> str:
    """Every row of the checkpoint of ``out`` into the run of ``out`` in ``pg_url`` (its schema
    created by the PostgreSQL store's own migration), jobs in planning order; returns the run's
    ``out_url``."""
    out_url = normalise_out(out)
    source = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        with open_run(pg_url, out_url, create=True) as pg:
            for table in TABLES:
                rows = source.execute(f"SELECT * FROM {table} ORDER BY rowid")
                columns = [d[0] for d in rows.description]
                values: list[tuple[Any, ...]] = rows.fetchall()
                if table == "jobs":  # PostgreSQL only: to rebuild a job without its manifest
                    columns.append("response_format")
                    values = [(*row, "b64_json") for row in values]
                marks = ", ".join(["%s"] * len(columns))
                with pg.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values
                    )
            for table, key in (("runs", "run_id"), ("reviews", "review_id")):
                pg.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                    f"(SELECT MAX({key}) FROM {table}))"
                )
    finally:
        source.close()
    return out_url


@dataclass
class Twin:
    """One state on both backends: the views of each."""

    out: Path
    out_url: str
    pg_url: str
    sqlite: Views
    pg: PostgresViews
    pg_conn: psycopg.Connection[Any]


@pytest.fixture
async def twin(tmp_path: Path, emulator: Emulator, pg_url: str) -> AsyncIterator[Twin]:
    out = await build_checkpoint(tmp_path, emulator.base_url)
    out_url = copy_to_postgres(out, pg_url)
    store: Store = open_read_only(out)
    conn = open_run(pg_url, out_url, create=False)
    try:
        yield Twin(out, out_url, pg_url, store.views(), PostgresViews(conn, pg_url, out_url), conn)
    finally:
        conn.close()
        store.close()


def same(pg: object, sqlite: object) -> None:
    """Equal, and of the same types all through (``repr`` tells ``5`` from ``Decimal('5')``
    and ``1`` from ``True``)."""
    assert pg == sqlite
    if isinstance(pg, dict) and isinstance(sqlite, dict):  # in no particular order
        pg, sqlite = sorted(pg.items()), sorted(sqlite.items())
    assert repr(pg) == repr(sqlite)


JOB_IDS = ["a", "b", "c", "bad", "busy", "cut", "edit", "later", "nope"]


def all_ids(views: Views) -> list[str]:
    return [item.job_id for item in views.review_items(limit=1000).items]


def test_results_and_ledger_are_the_same(twin: Twin) -> None:
    ids = all_ids(twin.sqlite)
    assert len(ids) == 16 and all_ids(twin.pg) == ids  # the matrix made 8 jobs
    same(twin.pg.job_states([*ids, "nope"]), twin.sqlite.job_states([*ids, "nope"]))
    same(twin.pg.job_spend(ids), twin.sqlite.job_spend(ids))
    attempts = list(twin.sqlite.billed_attempts())
    assert {a.billing for a in attempts} == {"confirmed", "possible"}
    same(list(twin.pg.billed_attempts()), attempts)
    same(twin.pg.spend(), twin.sqlite.spend())
    same(twin.pg.job_states([]), {})


def test_status_report_and_export_are_the_same(twin: Twin) -> None:
    facts = twin.sqlite.status_facts()
    assert facts is not None
    assert (facts.pending, facts.in_flight, facts.failed_retryable) == (1, 1, 1)
    assert facts.last_run is not None and facts.last_run.pid == 4242
    same(twin.pg.status_facts(), facts)
    with twin.sqlite.report_snapshot() as lite, twin.pg.report_snapshot() as pg:
        same(pg.summary, lite.summary)
        assert lite.summary.runs[-1].ended_at is not None  # the cut-off run, to its last attempt
        same(list(pg.jobs), list(lite.jobs))
    exported = twin.sqlite.exportable_jobs()
    assert {j.job_id for j in exported if j.vars} == {j for j in all_ids(twin.sqlite) if "-" in j}
    same(twin.pg.exportable_jobs(), exported)


def test_review_views_are_the_same(twin: Twin) -> None:
    same(twin.pg.review_counts(), twin.sqlite.review_counts())
    pages: list[dict[str, Any]] = [
        {},
        {"status": "failed"},
        {"status": "succeeded", "review": "approved"},
        {"review": "rejected"},
        {"review": "unreviewed", "offset": 2, "limit": 3},
        {"offset": 10, "limit": 5},
        {"offset": -1, "limit": -1},
    ]
    for filters in pages:
        same(twin.pg.review_items(**filters), twin.sqlite.review_items(**filters))
    for job_id in JOB_IDS:
        same(twin.pg.review_item(job_id), twin.sqlite.review_item(job_id))
        same(twin.pg.job_versions(job_id), twin.sqlite.job_versions(job_id))
    assert [v.version for v in twin.pg.job_versions("b")] == [1]  # b is at version 2


def test_the_report_reads_one_snapshot_while_a_run_writes(twin: Twin) -> None:
    """A job committed after the report's summary is read is in neither its summary nor its
    streamed jobs; the same job is in the next report."""
    writer = open_run(twin.pg_url, twin.out_url, create=False)
    try:
        with twin.pg.report_snapshot() as snap:
            writer.execute(
                "INSERT INTO jobs (job_id, content_hash, status, endpoint, model, prompt, images, "
                "response_format, updated_at) VALUES ('zz-new', 'h', 'pending', 'generations', "
                "'m', 'p', '[]', 'b64_json', %s)",
                (now_iso(),),
            )
            ids = [job.job_id for job in snap.jobs]
        assert "zz-new" not in ids and len(ids) == snap.summary.jobs
        with twin.pg.report_snapshot() as snap:
            assert [job.job_id for job in snap.jobs][-1] == "zz-new"
    finally:
        writer.close()


def test_streams_are_server_side_cursors_in_a_read_only_snapshot(twin: Twin) -> None:
    attempts = twin.pg.billed_attempts()
    next(attempts)
    conn = twin.pg_conn  # the stream holds its transaction open on the views' connection
    cursors = conn.execute("SELECT name FROM pg_cursors WHERE NOT is_holdable").fetchall()
    assert len(cursors) == 1
    assert conn.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
    assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
    rest = list(attempts)
    assert len(rest) + 1 == len(list(twin.sqlite.billed_attempts()))
    # Consumed: the cursor and its transaction are gone.
    assert conn.execute("SELECT COUNT(*) FROM pg_cursors").fetchone() == (0,)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_read_that_fails_is_a_store_error_without_the_password(twin: Twin) -> None:
    twin.pg_conn.execute("ALTER TABLE attempts RENAME TO attempts_gone")
    with pytest.raises(StoreError) as raised:
        twin.pg.spend()
    assert "cannot read the run of" in str(raised.value)
    assert PG_PASSWORD not in str(raised.value)
    with pytest.raises(StoreError):
        twin.pg.status_facts()
    # The failed snapshot left no transaction behind: the next read works.
    twin.pg_conn.execute("ALTER TABLE attempts_gone RENAME TO attempts")
    same(twin.pg.spend(), twin.sqlite.spend())


def test_the_postgres_store_reads_through_these_views(twin: Twin) -> None:
    store = open_pg_read_only(twin.pg_url, twin.out)
    try:
        views = store.views()
        assert isinstance(views, PostgresViews)
        same(views.status_facts(), twin.sqlite.status_facts())
        same(views.review_counts(), twin.sqlite.review_counts())
    finally:
        store.close()
