"""A run's order is SQLite's on any PostgreSQL database: job ids and timestamps compare byte by
byte (``COLLATE "C"``, SQLite's BINARY), not by the database's language collation, under which
``a-1`` and ``a_1`` or ``B`` and ``a`` change places, and with them the report's pages and the
ledger's order."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg

from runner.store.postgres import open_pg_store
from tests.conftest import make_job
from tests.services import Postgres

IDS = ["b", "B", "a_1", "a-1", "A", "a.2", "Z9", "z10"]


def test_job_ids_sort_byte_by_byte_under_a_language_collation(
    postgres: Postgres, tmp_path: Path
) -> None:
    name = f"icu_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as db:
        db.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
        # the database itself sorts as a language does: a-1 after a_1 would be byte order
        language = db.execute(
            'SELECT array_agg(x ORDER BY x COLLATE "en-US-x-icu") FROM unnest(%s::text[]) x',
            (IDS,),
        ).fetchone()
    assert language is not None and language[0] != sorted(IDS)
    with open_pg_store(postgres.url(name), tmp_path / "out", worker=False) as store:
        store.plan_jobs([make_job(job_id, f"picture {job_id}") for job_id in IDS])
        with store.views().report_snapshot() as snapshot:
            order = [job.job_id for job in snapshot.jobs]
    assert order == sorted(IDS)  # Python's sort of str: by code point, as SQLite's BINARY
