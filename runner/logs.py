"""Where the log goes when the command line runs: ``-v`` / ``-vv`` on stderr, ``--log-file``.

The core logs through :mod:`logging` under ``runner.*`` and never configures it: each retry with
its cause and delay, each stop with its reason, each possible charge, at INFO, with the facts as
``extra=`` fields (``job_id``, ``attempt``, ``cause``, ``delay_s``, ``billing``, ...). A library
user gets the same records through their own handlers, masked (see :mod:`runner.redact`).

:func:`setup_logging` is what the CLI calls. stderr shows warnings, INFO with ``-v`` and DEBUG
with ``-vv``. A log file, meant for cron, gets INFO (DEBUG with ``-vv``) whatever ``-v`` says,
one JSON object a line (:class:`JsonLinesFormatter`); it is appended to, and created readable by
its owner only. Other libraries' loggers stay at WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from runner.redact import LOG_RECORD_FIELDS, RedactingFilter, redact

_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # by verbosity: none, -v, -vv
_installed: list[logging.Handler] = []


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, then the record's ``extra=`` fields, and ``exc`` / ``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (name, value)
            for name, value in vars(record).items()
            if name not in LOG_RECORD_FIELDS and not name.startswith("_")
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


def setup_logging(verbosity: int, log_file: Path | None = None) -> None:
    """Log ``runner.*`` to stderr (WARNING; INFO at ``verbosity`` 1, DEBUG at 2 or more) and,
    when given, to ``log_file`` as JSON lines (INFO, or DEBUG at 2 or more). Replaces what an
    earlier call set up. Raises ``OSError`` when ``log_file`` cannot be opened."""
    for handler in _installed:
        logging.getLogger().removeHandler(handler)
        handler.close()
    _installed.clear()
    handlers: list[logging.Handler] = []
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(_LEVELS[min(verbosity, 2)])
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers.append(stderr)
    if log_file is not None:
        stream = open(log_file, "a", encoding="utf-8", opener=_owner_only)  # noqa: SIM115
        to_file = _ClosingStreamHandler(stream)
        to_file.setLevel(_LEVELS[min(max(verbosity, 1), 2)])
        to_file.setFormatter(JsonLinesFormatter())
        handlers.append(to_file)
    for handler in handlers:
        handler.addFilter(RedactingFilter())  # also records of other libraries' loggers
        logging.getLogger().addHandler(handler)
    _installed.extend(handlers)
    logging.getLogger("runner").setLevel(min(handler.level for handler in handlers))


class _ClosingStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that owns its file: closing the handler closes it."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
