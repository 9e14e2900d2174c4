"""The ``--state`` URL: which shared database holds a run's state, checked and shown safely.

A PostgreSQL URL (``postgresql://user:password@host:5432/db?sslmode=require``; ``postgres://``
too) as libpq takes it; the password may also come from libpq's own ``PGPASSWORD`` or
``~/.pgpass``, which is better than putting it on a command line. A password in the URL is
registered with :mod:`runner.redact` as soon as the URL is checked, so no message, log record
or file the runner writes can show it, and :func:`safe_url` is the URL as every message names
it: the password replaced by ``***``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

from runner.redact import register_secret

STATE_SCHEMES = ("postgresql", "postgres")


def state_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a run's shared state (``"must be ..."``), or None; a password
    in it is registered as a secret either way."""
    try:
        parts = urlsplit(url)
        password = parts.password
        _ = parts.port  # out of range: ValueError
    except ValueError:
        return f"must be a postgresql:// URL, got {safe_url(url)!r}"
    if password:  # as written, and as libpq reads it (percent-decoded)
        register_secret(password)
        register_secret(unquote(password))
    if parts.scheme not in STATE_SCHEMES:
        return (
            "must be a PostgreSQL URL such as postgresql://user@host:5432/dbname, "
            f"got {safe_url(url)!r}"
        )
    return None


def safe_url(state_url: str) -> str:
    """``state_url`` as shown in messages: without its password (in the URL's user part, or
    a ``password`` parameter; or a ``password=`` key of a libpq key=value string)."""
    if "://" in state_url:
        try:
            parts = urlsplit(state_url)
        except ValueError:  # the password could be anywhere in it
            return state_url.split(":", 1)[0] + "://***"
        netloc = parts.netloc
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else netloc
        query = re.sub(r"(?i)(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return re.sub(r"(?i)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", state_url)
