"""The PostgreSQL state's connection layer: run identity, schema creation, and no password in
any message (tests/services.py's cluster, over TCP with its password)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runner.errors import StoreError
from runner.storage.base import location_url as normalise_out
from runner.store.postgres.connect import pg_sql, run_schema
from runner.store.postgres.schema import RUN_MIGRATIONS, open_run
from runner.store.urls import safe_url
from tests.services import PG_PASSWORD


def test_out_locations_normalise_to_one_identity(tmp_path: Path) -> None:
    assert normalise_out(tmp_path) == tmp_path.resolve().as_uri()
    assert normalise_out(f"{tmp_path}/") == normalise_out(tmp_path.resolve().as_uri())
    assert normalise_out("s3://bucket/night/") == "s3://bucket/night"
    assert run_schema("s3://bucket/night").startswith("run_")
    assert len(run_schema("s3://bucket/night")) == 4 + 16


def test_safe_url_drops_the_password() -> None:
    url = f"postgresql://me:{PG_PASSWORD}@db:5432/runs?sslmode=require"
    assert safe_url(url) == "postgresql://me:***@db:5432/runs?sslmode=require"
    assert PG_PASSWORD not in safe_url(f"postgresql://db/runs?password={PG_PASSWORD}")
    assert PG_PASSWORD not in safe_url(f"host=db password={PG_PASSWORD} dbname=runs")


def test_sqlite_placeholders_become_psycopg_ones() -> None:
    assert pg_sql("SELECT ? WHERE a LIKE 'x%?' AND b = :name::int") == (
        "SELECT %s WHERE a LIKE 'x%%?' AND b = %(name)s::int"
    )


def test_schema_is_made_once_by_workers_starting_together(pg_url: str, tmp_path: Path) -> None:
    out = normalise_out(tmp_path)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_run(pg_url, out, create=True).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with open_run(pg_url, out, create=False) as conn:
        versions = conn.execute("SELECT version FROM migrations").fetchall()
        assert [v for (v,) in versions] == list(range(1, len(RUN_MIGRATIONS) + 1))
        assert conn.execute("SELECT budget FROM control").fetchall() == [(out,)]
        assert conn.execute("SELECT name, cap_micro_usd FROM budgets").fetchall() == [(out, None)]


def test_reading_a_run_that_is_not_there_says_what_to_do(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"no run planned at .* plan it with `image-runner run`"
    ) as e:
        open_run(pg_url, normalise_out(tmp_path), create=False)
    assert PG_PASSWORD not in str(e.value)


def test_a_refused_connection_never_shows_the_password(pg_url: str, tmp_path: Path) -> None:
    wrong = pg_url.replace(PG_PASSWORD, PG_PASSWORD + "-wrong")
    with pytest.raises(StoreError, match="cannot connect") as e:
        open_run(wrong, normalise_out(tmp_path), create=True)
    assert PG_PASSWORD not in str(e.value)
    assert "postgres:***@127.0.0.1" in str(e.value)
