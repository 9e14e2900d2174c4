"""The one filter that keeps the API key out of everything the runner writes.

Every piece of text that leaves the process, an error stored in the checkpoint, a ledger cell, a
log record, a line printed by the CLI, passes through :func:`redact` first. It masks the key the
runner was given and anything shaped like an OpenAI-style secret (``sk-...``).
"""

from __future__ import annotations

import logging
import re

_SECRET_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")
_secrets: set[str] = set()

MASK = "[REDACTED]"


def register_secret(secret: str) -> None:
    """Remember a secret so that :func:`redact` masks it from now on."""
    if len(secret) >= 4:
        _secrets.add(secret)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _SECRET_SHAPE.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that formats each record once and masks secrets in the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True
