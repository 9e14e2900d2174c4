"""Connecting to the PostgreSQL state: the ``--state`` URL, the run's identity, and errors.

- A run is identified by its output location (``--out``), normalised into ``out_url`` by
  :func:`runner.storage.base.location_url`, the one function that names a location
  (``file:///abs/path`` for a local folder, ``s3://bucket/prefix`` without a trailing slash
  for a remote one): the same folder named two ways is one run. Its tables live in the schema
  :func:`run_schema` names after it.
- The ``--state`` URL may carry a password: :func:`safe_url` is the form every message shows,
  and opening a connection registers the password with :mod:`runner.redact`, so that a driver
  message quoting it is masked too (:func:`store_error`). libpq's own ways (``PGPASSWORD``,
  ``.pgpass``) keep it out of the URL altogether.
- Every connection's ``search_path`` is the run's schema, then the shared ``image_runner``:
  SQL written for the SQLite checkpoint's tables runs here unchanged but for its placeholders,
  which :class:`Translated` rewrites (``?`` and ``:name`` to psycopg's ``%s`` and
  ``%(name)s``, a literal ``%`` doubled), so each statement has one home for both backends.
- Driver errors never leave this package: :func:`store_error` turns them into
  :class:`~runner.errors.StoreError` / :class:`~runner.errors.StoreWriteError`, the password
  masked.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from runner.errors import StoreError, StoreWriteError
from runner.redact import redact, register_secret
from runner.store.urls import safe_url

SHARED_SCHEMA = "image_runner"
# How long a statement may wait for a lock another worker holds before the store gives up with
# a StoreError (a stuck transaction elsewhere must not hang every worker forever).
LOCK_TIMEOUT_MS = 60_000
# Job ids a lookup sends at a time, as one array parameter.
IDS_PER_QUERY = 10_000


def run_schema(out_url: str) -> str:
    """The schema holding the run at ``out_url``: ``run_`` + 16 hex digits of its sha256."""
    return "run_" + hashlib.sha256(out_url.encode()).hexdigest()[:16]


def remember_password(state_url: str) -> None:
    """Register the URL's password (if any) with :mod:`runner.redact`, so nothing the runner
    writes can show it, whichever message quotes it."""
    try:
        password = conninfo_to_dict(state_url).get("password")
    except psycopg.Error:
        return  # an unparsable URL: connecting says so, through safe_url
    if password:
        register_secret(str(password))


def store_error(
    exc: BaseException, state_url: str, doing: str, *, write: bool = False
) -> StoreError:
    """A driver error as the runner's own: what was being done, where (without the password),
    and the server's message, masked."""
    message = redact(str(exc).strip()) or type(exc).__name__
    text = f"PostgreSQL state {safe_url(state_url)}: {doing}: {message}"
    return StoreWriteError(text) if write else StoreError(text)


def connect(state_url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A new connection to the database of ``state_url``; a failure is a :class:`StoreError`
    saying where, without the password."""
    remember_password(state_url)
    try:
        conn = psycopg.connect(state_url, autocommit=autocommit, connect_timeout=30)
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        return conn
    except psycopg.Error as exc:
        raise store_error(
            exc, state_url, "cannot connect (check the URL, the server and the credentials)"
        ) from None


def id_chunks(job_ids: Sequence[str]) -> Iterator[list[str]]:
    """``job_ids`` :data:`IDS_PER_QUERY` at a time, each one array parameter of a lookup."""
    for start in range(0, len(job_ids), IDS_PER_QUERY):
        yield list(job_ids[start : start + IDS_PER_QUERY])


def set_search_path(conn: psycopg.Connection[Any], schema: str) -> None:
    """Make the run's tables (then the shared ones) those unqualified names mean."""
    conn.execute(f'SET search_path TO "{schema}", {SHARED_SCHEMA}')


@functools.lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """``sql`` with SQLite's placeholders (``?``, ``:name``) as psycopg's (``%s``,
    ``%(name)s``) and literal ``%`` doubled; quoted strings are left alone."""
    out: list[str] = []
    for i, piece in enumerate(re.split(r"('(?:[^']|'')*')", sql)):
        if i % 2:  # a string literal
            out.append(piece.replace("%", "%%"))
            continue
        piece = piece.replace("%", "%%").replace("?", "%s")
        out.append(re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", piece))
    return "".join(out)


class Translated:
    """A psycopg connection that takes SQL written for :mod:`sqlite3` (its placeholders), for
    the statements both backends share (:mod:`runner.store.versioning`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    @property
    def in_transaction(self) -> bool:
        """Also while a failed statement holds the transaction aborted: a savepoint may still
        be rolled back to (:class:`runner.store.groupcommit.GroupCommit`)."""
        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(pg_sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any] | dict[str, Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(pg_sql(sql), rows)
