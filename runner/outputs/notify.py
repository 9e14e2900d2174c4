"""The webhook of ``image-runner run --notify URL``: the run's summary POSTed as JSON when the
run ends, however it ends.

A notification is a courtesy, never part of the run: whatever the webhook does (refuses,
hangs, is not there) is returned as a message for the CLI to print, never raised, so it cannot
change the run's exit code, which cron and systemd act on. It waits :data:`TIMEOUT_S` at most,
so a hung receiver delays the end of a nightly run by seconds, not hours. The body passes
:func:`~runner.redact.redact`: the key never leaves in it. Messages name the webhook by its host
only, since a webhook's URL is often its secret (Slack's are).

Plain :mod:`urllib`, on purpose: one request after the run's event loop has closed needs no
session, and the standard library's client is enough for it.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

from runner import __version__
from runner.redact import redact

TIMEOUT_S: Final = 10.0


def webhook_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook, or ``None``: only http(s) URLs with a host are posted
    to (``urlopen`` would also read ``file:`` URLs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def post_summary(url: str, payload: dict[str, Any], *, timeout_s: float = TIMEOUT_S) -> str | None:
    """POST ``payload`` as JSON to ``url``; ``None`` once the webhook answered 2xx, else why it
    was not delivered."""
    request = urllib.request.Request(
        url,
        data=redact(json.dumps(payload)).encode(),
        headers={"Content-Type": "application/json", "User-Agent": f"image-runner/{__version__}"},
        method="POST",
    )
    host = urllib.parse.urlsplit(url).hostname or url
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        return f"the webhook at {host} answered {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return f"the webhook at {host} did not answer within {timeout_s:g} s"
        return redact(f"the webhook at {host} could not be reached: {reason}")
    return None
