"""The one filter that keeps the API key out of everything the runner writes.

Every piece of text that leaves the process, an error stored in the checkpoint, a ledger cell, a
log record, a line printed by the CLI, passes through :func:`redact` first. It masks the key the
runner was given and anything shaped like an OpenAI-style secret (``sk-...``).

Log records are masked where they are made, not only by the CLI's handlers: importing the
package puts a :class:`RedactingHandler` on the ``runner`` logger (:func:`install_log_redaction`),
so a library user's own handlers, on the root logger, get records of ``runner.*`` loggers
already masked.
"""

from __future__ import annotations

import logging
import re

_SECRET_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")
_secrets: set[str] = set()

MASK = "[REDACTED]"

# The attributes every LogRecord has; any other was passed with ``extra=``.
LOG_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}
_TRACEBACKS = logging.Formatter()


def register_secret(secret: str) -> None:
    """Remember a secret so that :func:`redact` masks it from now on."""
    if len(secret) >= 4:
        _secrets.add(secret)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _SECRET_SHAPE.sub(MASK, text)


def redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in ``record`` itself: its message (formatted once), its traceback (kept as
    text only) and stack, and the text fields passed with ``extra=``."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format: keep both, as text
        message = f"{record.msg} {record.args!r}"
    cleaned = redact(message)
    if cleaned != message or record.args:
        record.msg, record.args = cleaned, None
    if record.exc_info:
        # The traceback as masked text, which formatters print when set; the exception itself
        # goes, since some handlers format it on their own (JSON formatters, error trackers).
        if not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    for name, value in list(vars(record).items()):
        if name not in LOG_RECORD_FIELDS and isinstance(value, str):
            setattr(record, name, redact(value))


class RedactingFilter(logging.Filter):
    """A filter for handlers: masks secrets in every record the handler gets (also records of
    loggers outside ``runner``, such as aiohttp's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class RedactingHandler(logging.Handler):
    """On the ``runner`` logger, every record of a ``runner.*`` logger passes this handler
    before the handlers above it (the root logger's, where applications put theirs); it masks
    the record in place and emits nothing. A filter on ``runner`` would not do: a logger's
    filters see only the records logged on that very logger, not its children's.

    Being a handler, it would keep logging's last resort (warnings to stderr when no handler is
    configured at all) from acting; so when no other handler is on the record's way, it hands
    the record, masked, to the last resort itself."""

    def handle(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        last_resort = logging.lastResort
        if (
            last_resort is not None
            and record.levelno >= last_resort.level
            and not self._other_handlers(record.name)
        ):
            last_resort.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def _other_handlers(self, name: str) -> bool:
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


def install_log_redaction() -> None:
    """Mask secrets in every record of the ``runner`` logger and its children (idempotent)."""
    logger = logging.getLogger("runner")
    if not any(isinstance(handler, RedactingHandler) for handler in logger.handlers):
        logger.addHandler(RedactingHandler())
