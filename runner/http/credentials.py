"""Which API key goes to which host: the one rule that pairs a key with a base URL.

A key is a credential for one provider, so where it may be sent depends on where it came from:

============================  ========================================================
key                           base URL it is sent to (first that is set)
============================  ========================================================
``IMAGE_RUNNER_API_KEY``      ``--base-url``, ``IMAGE_RUNNER_BASE_URL``, the default
                              provider (:data:`~runner.http.client.DEFAULT_BASE_URL`)
``OPENAI_API_KEY`` (alone)    ``--base-url``, ``OPENAI_BASE_URL``,
                              ``IMAGE_RUNNER_BASE_URL``; never the default provider
============================  ========================================================

``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` are the official SDK's pair: an OpenAI key is not
handed to the default provider, a third party, unless the user names a base URL; and when
``OPENAI_BASE_URL`` names one, the key goes there, not to ``IMAGE_RUNNER_BASE_URL``, which names
the URL of the runner's own key. Likewise ``IMAGE_RUNNER_API_KEY`` never follows
``OPENAI_BASE_URL``, which may be set for other tools.
``IMAGE_RUNNER_API_KEY`` wins when both keys are set; an empty variable counts as unset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from runner.errors import CredentialsError
from runner.http.client import DEFAULT_BASE_URL

RUNNER_KEY, OPENAI_KEY = "IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY"
RUNNER_URL, OPENAI_URL = "IMAGE_RUNNER_BASE_URL", "OPENAI_BASE_URL"


@dataclass(frozen=True)
class Credentials:
    base_url: str
    api_key: str = field(repr=False)  # "" when none is needed; never in a repr or a traceback
    key_source: str | None  # the variable the key came from


def resolve_credentials(
    environ: Mapping[str, str], base_url: str | None = None, *, key_required: bool = True
) -> Credentials:
    """The base URL and the key that may be sent to it, from ``--base-url`` (``base_url``) and
    the environment. Without a key that may go there, raise :class:`CredentialsError` naming
    what to set, or, when ``key_required`` is false (a run that sends nothing), return an
    empty key."""
    explicit_url = base_url or environ.get(RUNNER_URL) or None
    if environ.get(RUNNER_KEY):
        return _checked(explicit_url or DEFAULT_BASE_URL, environ[RUNNER_KEY], RUNNER_KEY)
    paired_url = base_url or environ.get(OPENAI_URL) or environ.get(RUNNER_URL) or None
    if environ.get(OPENAI_KEY) and paired_url:
        return _checked(paired_url, environ[OPENAI_KEY], OPENAI_KEY)
    if not key_required:
        return Credentials(explicit_url or DEFAULT_BASE_URL, "", None)
    if environ.get(OPENAI_KEY):
        raise CredentialsError(
            f"{OPENAI_KEY} is set but no base URL goes with it, and it is not sent to the "
            f"default provider ({DEFAULT_BASE_URL}, not OpenAI): set {OPENAI_URL} (or "
            f"pass --base-url) to the API the key belongs to, or set {RUNNER_KEY} to a key of "
            "the default provider"
        )
    raise CredentialsError(
        f"no API key: set {RUNNER_KEY} (or {OPENAI_KEY} with {OPENAI_URL} or --base-url)"
    )


def _checked(base_url: str, api_key: str, source: str) -> Credentials:
    if api_key != api_key.strip() or not api_key.isprintable():
        raise CredentialsError(
            f"{source} has spaces or control characters (a stray newline?); fix it"
        )
    return Credentials(base_url, api_key, source)
