"""The real services the scale-out tests use start on loopback, and behave as the runner needs:
PostgreSQL refuses a TCP login without the password; moto's S3 refuses to overwrite an object
on a conditional create (``If-None-Match: *``), as S3 does."""

from __future__ import annotations

import psycopg
import pytest
import s3fs

from tests.services import Postgres


def test_postgres_needs_the_password_over_tcp(postgres: Postgres, pg_url: str) -> None:
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT current_database()").fetchone() == (pg_url.rsplit("/", 1)[1],)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(postgres.url(password=False), connect_timeout=5)


def test_moto_refuses_an_overwrite_on_a_conditional_create(s3_bucket: str) -> None:
    fs = s3fs.S3FileSystem()
    key = f"{s3_bucket}/images/a.png"
    fs.pipe_file(key, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(key, b"second", mode="create")
    assert fs.cat_file(key) == b"first"
