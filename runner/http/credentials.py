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

A base URL, wherever it comes from, must be ``http`` or ``https`` with a host
(:func:`base_url_problem`): anything else would fail every request without one leaving, yet
each would be tried, retried and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from runner.errors import CredentialsError
from runner.http.client import DEFAULT_BASE_URL

RUNNER_KEY, OPENAI_KEY = "IMAGE_RUNNER_API_KEY", "OPENAI_API_KEY"
RUNNER_URL, OPENAI_URL = "IMAGE_RUNNER_BASE_URL", "OPENAI_BASE_URL"
BASE_URL_FLAG = "--base-url (base_url= in Python)"


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
    empty key. A base URL that is not http(s) with a host raises too, naming where it came
    from."""
    explicit_url = _first_url(base_url, environ, RUNNER_URL)
    if environ.get(RUNNER_KEY):
        return _checked(explicit_url or DEFAULT_BASE_URL, environ[RUNNER_KEY], RUNNER_KEY)
    if environ.get(OPENAI_KEY) and (
        paired_url := _first_url(base_url, environ, OPENAI_URL, RUNNER_URL)
    ):
        return _checked(paired_url, environ[OPENAI_KEY], OPENAI_KEY)
    if not key_required:
        return Credentials(explicit_url or DEFAULT_BASE_URL, "", None)
    if environ.get(OPENAI_KEY):
        raise CredentialsError(
            f"{OPENAI_KEY} is set but no base URL goes with it, and it is not sent to the "
            f"default provider ({DEFAULT_BASE_URL}, not OpenAI): set {OPENAI_URL} (or "
            f"pass {BASE_URL_FLAG}) to the API the key belongs to, or set {RUNNER_KEY} to a key of "
            "the default provider"
        )
    raise CredentialsError(
        f"no API key: set {RUNNER_KEY} (or {OPENAI_KEY} with {OPENAI_URL} or {BASE_URL_FLAG})"
    )


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an API's base URL (``"must be ..., got ..."``), or None."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # out of range: ValueError
    except ValueError:
        usable = False
    if usable:
        return None
    return f"must be an http(s) URL with a host, such as {DEFAULT_BASE_URL}, got {url!r}"


def _first_url(base_url: str | None, environ: Mapping[str, str], *names: str) -> str | None:
    """The first set of ``base_url`` and the variables ``names``, checked: a bad one raises
    :class:`CredentialsError` naming where it came from. Only the URL the key will go to is
    checked: ``OPENAI_BASE_URL`` may be set, for other tools, to what they alone read."""
    for source, url in ((BASE_URL_FLAG, base_url), *((name, environ.get(name)) for name in names)):
        if url:
            if problem := base_url_problem(url):
                raise CredentialsError(f"{source} {problem}")
            return url
    return None


def _checked(base_url: str, api_key: str, source: str) -> Credentials:
    if api_key != api_key.strip() or not api_key.isprintable():
        raise CredentialsError(
            f"{source} has spaces or control characters (a stray newline?); fix it"
        )
    return Credentials(base_url, api_key, source)
