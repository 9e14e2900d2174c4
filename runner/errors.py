"""The one exception tree of the runner.

::

    RunnerError
     +-- ManifestError          the manifest is invalid; carries every problem found (exit 2)
     +-- OutputLockedError      another run holds the output folder (exit 4)
     +-- CredentialsError       no API key, or none that may go to the base URL (exit 2)
     +-- OptionsError           an option out of range, or contradicting another; also a
     |                          ValueError (exit 2)
     +-- StoreError             the output folder or its checkpoint cannot be used: unwritable,
     |    |                     untrustworthy, or written by another version (exit 2)
     |    +-- StoreWriteError   a write to the checkpoint failed (disk full, I/O error): final
     |    |                     for the run (exit 3 once a request was sent, else exit 2)
     |    +-- BudgetReached     the shared budget (PostgreSQL state) cannot take the next
     |    |                     attempt's price: final for the run, nothing was sent for it
     |    +-- ClaimLost         this worker no longer holds the job (PostgreSQL state): drop
     |                          it, send nothing; not final for the run
     +-- ImageWriteError        an image came back but the disk refused it (never a network
     |                          error: the client raises this only around its own file writes)
     +-- StorageError           an object store (S3, GCS, Azure) or folder refused an operation,
     |    |                     or its bucket is unknown; names the object and what to do
     |    +-- ChecksumMismatch  what the store holds is not the bytes that were sent
     +-- ApiError               one request's outcome; carries job_id, status, code, billing
          +-- RetryableError    worth another attempt, after a wait
          |    +-- NotSentError      the request never reached the server: billing "none"
          |    +-- ServerError       408, 409, 429, 5xx, x-should-retry: true: billing "none"
          |    +-- AmbiguousError    sent, outcome unknown (read timeout, reset, truncated or
          |    |                     malformed body): billing "possible"
          |    +-- UnfetchedImageError   the API answered 200 with a url (so it billed), but the
          |                              image could not be fetched from it: billing "confirmed"
          +-- JobFailedError    final for this job (400, 404, 413, 422, content policy)
          |    +-- ConfirmedJobFailedError   an image came back but is not the one asked for
          |                                  (wrong size): billing "confirmed"
          +-- RunStoppedError   final for the whole run (401, 403, spend limit, an endpoint that
                                does not exist): stop admitting work

"Retry or not" is one ``isinstance(err, RetryableError)``; the pool may still refuse to retry an
error that was (or may have been) billed without bringing an image, ``AmbiguousError`` and
``UnfetchedImageError``, when the user asked for ``--on-ambiguous fail``.

Every layer raises these, so this module imports nothing above it: the standard library and
:mod:`runner.provider` (for :class:`~runner.provider.RateLimitHeaders`) only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from runner.provider import RateLimitHeaders

Billing = Literal["none", "possible", "confirmed"]


class RunnerError(Exception):
    """Root of every error the runner raises on purpose."""


@dataclass(frozen=True)
class ManifestIssue:
    """One problem in a manifest: where it is and what is wrong."""

    row: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.row}, field {self.field}" if self.field else self.row
        return f"{where}: {self.message}"


class ManifestError(RunnerError):
    def __init__(self, source: str, issues: list[ManifestIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        count = f"{len(issues)} problem" + ("s" if len(issues) != 1 else "")
        super().__init__(f"{source}: {count}, nothing was sent:\n{lines}")


class ReviewError(RunnerError):
    """A review decision that cannot be recorded: an unknown job, one with no finished image,
    or a version that is no longer the job's current one."""


class OutputLockedError(RunnerError):
    pass


class CredentialsError(RunnerError):
    """No API key, or none that may be sent to the base URL; names what to set. Nothing sent."""


class OptionsError(RunnerError, ValueError):
    """An option of a run out of range, or at odds with another; nothing was sent.

    The message names the options by their Python names (``retry_failed``); the CLI shows
    the same message with its flags (``--retry-failed``) through :meth:`spelled`."""

    def __init__(self, template: str, *options: str) -> None:
        self.template = template  # "{0} narrows {1}": the options fill the fields
        self.options = options
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message, each option named by ``spell(name)``."""
        return self.template.format(*map(spell, self.options))


class StoreError(RunnerError):
    pass


class StoreWriteError(StoreError):
    """SQLite refused a write (disk full, I/O error, a read-only file): nothing more can be
    recorded, so nothing more may be sent."""


class BudgetReached(StoreError):
    """The budget row the run spends from (shared by the workers and runs that name it) cannot
    take the next attempt's price: the attempt was not recorded, so it must not be sent.
    ``in_flight``: attempts of the run in flight, each holding its price until its outcome is
    known; one that ends unbilled gives it back, so while there are any the budget may yet
    take this attempt."""

    def __init__(self, message: str, *, in_flight: int = 0) -> None:
        super().__init__(message)
        self.in_flight = in_flight


class ClaimLost(StoreError):
    """The job moved on while this worker held it (PostgreSQL state): its lease expired and
    another worker claimed it, it succeeded elsewhere, or a new plan changed its content.
    Raised before a request (nothing was recorded: drop the job, send nothing) or after one
    (the attempt's outcome was recorded, the job left untouched: an image made for it is a
    stray). ``job_id`` names the job."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class ImageWriteError(RunnerError):
    """The disk refused an image that came back (so it was billed): final for the run."""


class StorageError(RunnerError):
    """An output location (a local folder or an object store) refused an operation: a missing
    bucket or object, denied access, a missing extra. The message names the object, never a
    credential."""


class ChecksumMismatch(StorageError):
    """The checksum the store reports for an object, or that of the file given to upload, is
    not the one expected: the bytes were damaged on the way."""


class ApiError(RunnerError):
    """The outcome of one request that did not yield a usable image."""

    billing: Billing = "none"

    def __init__(
        self,
        message: str,
        *,
        job_id: str = "",
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        rate_limit: RateLimitHeaders | None = None,
    ) -> None:
        self.message = message
        self.job_id = job_id
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s
        self.rate_limit = rate_limit  # the x-ratelimit-* headers of the answer, if any
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [f"HTTP {self.status}" if self.status is not None else type(self).__name__]
        if self.code:
            parts.append(self.code)
        return f"{' '.join(parts)}: {self.message}"

    @property
    def cause(self) -> str:
        """A short, stable name for grouping failures: the error code, the status, or the class."""
        if self.code:
            return self.code
        if self.status is not None:
            return f"http_{self.status}"
        return _snake(type(self).__name__.removesuffix("Error"))


class RetryableError(ApiError):
    pass


class NotSentError(RetryableError):
    billing = "none"


class ServerError(RetryableError):
    billing = "none"


class AmbiguousError(RetryableError):
    billing = "possible"


class UnfetchedImageError(RetryableError):
    """The API answered 200 with an image url, so it billed the generation, but the image could
    not be downloaded (after the download's own retries) or is not an image."""

    billing = "confirmed"


class JobFailedError(ApiError):
    pass


class ConfirmedJobFailedError(JobFailedError):
    """An image came back (so it was billed) but it is not the image that was asked for."""

    billing = "confirmed"


class RunStoppedError(ApiError):
    pass


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
