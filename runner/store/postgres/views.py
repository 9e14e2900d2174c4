"""The views of a run in the PostgreSQL state: :class:`PostgresViews`, what the results, ledger,
report, status, export and review app read of it.

The queries are :mod:`runner.store.queries`' own, written once for both backends: this module
only gives them a :class:`~runner.store.queries.Reader` over a PostgreSQL connection whose
``search_path`` is the run's schema (:func:`~runner.store.postgres.schema.open_run`), where the
run's tables have the SQLite checkpoint's names and columns. It translates their placeholders
(:func:`~runner.store.postgres.connect.pg_sql`), orders jobs as planned by ``seq`` (SQLite's
``rowid``), and reads a ``SUM`` of ``BIGINT`` (a ``NUMERIC`` in PostgreSQL) as the ``int``
SQLite gives, so each view returns the same values on both.

- A snapshot (status, the report, a page of the review app) is one ``REPEATABLE READ READ
  ONLY`` transaction: every read inside sees the same moment, and writers never wait for it.
- A stream (the ledger's attempts, the report's jobs) is a server-side cursor (a named one),
  fetched :data:`STREAM_ROWS` rows at a time, in a snapshot of its own unless one is open: a
  run of a million jobs never sits in memory, here or in the driver.
- Reads outside a snapshot run in autocommit, each its own statement: the connection given
  must be in autocommit mode, so that nothing holds a transaction open between two views.
- Any error of the driver's is a :class:`~runner.errors.StoreError` naming the state without
  its password (:func:`~runner.store.postgres.connect.store_error`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from runner.store.postgres.connect import id_chunks, pg_sql, store_error
from runner.store.queries import SqlViews

# Rows a server-side cursor fetches at a time: few round trips, and bounded memory.
STREAM_ROWS = 2000

# A job-id lookup's ``{ids}``: the ids as one text array, whatever their number.
_IDS_ARRAY = "SELECT unnest(?::text[])"


class _WholeNumber(Loader):
    """``NUMERIC`` as ``int``: every ``NUMERIC`` these queries read is a sum of integers
    (micro-dollars), which SQLite returns as an ``int``."""

    def load(self, data: Buffer) -> int:
        return int(bytes(data))


class PostgresReader:
    """The :class:`~runner.store.queries.Reader` of the run of ``out_url`` in the state at
    ``state_url``, over ``conn`` (autocommit, its ``search_path`` the run's)."""

    planned_order = "seq"

    def __init__(self, conn: psycopg.Connection[Any], state_url: str, out_url: str) -> None:
        self._conn = conn
        self._state_url = state_url
        self._out_url = out_url
        self._names = (f"views_stream_{n}" for n in itertools.count(1))

    @contextmanager
    def reading(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise store_error(
                exc, self._state_url, f"cannot read the run of {self._out_url}"
            ) from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        began = self._conn.info.transaction_status == TransactionStatus.IDLE
        if began:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        finally:
            if began and self._conn.info.transaction_status != TransactionStatus.IDLE:
                self._conn.execute("ROLLBACK")  # it only read: nothing to keep

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cursor:
            cursor.adapters.register_loader("numeric", _WholeNumber)
            return cursor.execute(pg_sql(sql), params).fetchall()

    def stream(self, sql: str) -> Iterator[tuple[Any, ...]]:
        # A named cursor lives in a transaction: the caller's snapshot, or one of its own.
        with self.snapshot(), self._conn.cursor(name=next(self._names)) as cursor:
            cursor.adapters.register_loader("numeric", _WholeNumber)
            cursor.itersize = STREAM_ROWS
            cursor.execute(pg_sql(sql))
            yield from cursor

    def by_ids(self, sql: str, job_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        query = sql.format(ids=_IDS_ARRAY)
        rows: list[tuple[Any, ...]] = []
        for chunk in id_chunks(job_ids):
            rows += self.all(query, (chunk,))
        return rows

    def has_table(self, name: str) -> bool:
        # Through the search_path: the run's schema first.
        return bool(self.all("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0])

    def first_by_name(self, sql: str) -> dict[str, Any] | None:
        with self._conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(pg_sql(sql)).fetchone()


class PostgresViews(SqlViews):
    """The views of the run of ``out_url`` in the state at ``state_url``, read on ``conn``: an
    autocommit connection whose ``search_path`` is the run's. Shared with a store's writes (as
    :class:`~runner.store.postgres.store.PostgresStore` shares its own, like the SQLite store),
    a view read inside a write transaction reads that transaction's state."""

    def __init__(self, conn: psycopg.Connection[Any], state_url: str, out_url: str) -> None:
        super().__init__(PostgresReader(conn, state_url, out_url))
        self.out_url = out_url
