"""The built-in emulator of the provider's images API, for the offline demo, tests and benchmarks.

It owns a small aiohttp server that answers ``POST /v1/images/generations`` (JSON) and
``POST /v1/images/edits`` (multipart, reference parts named ``image`` or ``image[]``) the way
``shared/API.md`` describes: the same validation, OpenAI-shaped errors, real PNGs of exactly the
requested size, ``url`` images served from ``/cdn/<name>.png`` for a limited time, and a bill of
$0.03 for every image the server generated.

On top of that it injects faults, each a string from :data:`FAULT_KINDS`:

* error replies (``"429"``, ``"quota"``, ``"401"``, ``"403"``, ``"500"``, ``"502"``, ``"503"``,
  ``"504"``, ``"500_noretry"``, ``"400_retry"``, ``"policy"``) and ``"drop"`` (connection closed
  before any work): never billed;
* :data:`BILLED_FAULTS` (``"reset"``, ``"truncate"``, ``"malformed"``, ``"badb64"``, ``"slow"``,
  ``"badsize"``): the server did the work, so the image is billed, but the client gets nothing
  usable in time.

A fault is chosen, in order of precedence, by a ``[[faults:K1,K2,...]]`` directive in the prompt
(the Nth valid request with that exact prompt gets ``KN``; ``ok`` or running past the list means
no fault), by ``EmulatorConfig.script`` (the Nth valid request overall), or at random with
``fault_rate``. Choosing, recording and billing happen without an ``await`` in between, so the
books are exact under any concurrency. Everything a test may assert on is kept in
``Emulator.requests`` and ``Emulator.bills`` and served as JSON from ``GET /_emulator/stats``.

Two settings make it a stand-in for load tests: ``rate_limit_rpm`` puts a token bucket in front
of the endpoints (a refused request is answered 429 at once, recorded with the fault
:data:`RATE_LIMITED`, never billed; whether the answers carry OpenAI's ``x-ratelimit-*`` and
``retry-after`` headers is ``rate_limit_headers``), and ``payload="noise"`` makes every image as
big as a real one. Each request record carries ``received_at`` and ``answered_at``
(``time.time()``), so a benchmark in another process can time the request phase of a run.

The submodules, one subject each:

* :mod:`~runner.emulator.config`: :class:`EmulatorConfig`, checked when it is made;
* :mod:`~runner.emulator.server`: :class:`Emulator` (the handlers, the rate limit, fault choice,
  the CDN, the stats) and its books (:class:`Bill`, :class:`RequestRecord`);
* :mod:`~runner.emulator.running`: :class:`EmulatorThread`, an emulator on a thread of its own,
  and :func:`serve` behind ``image-runner emulate``;
* :mod:`~runner.emulator.incoming`: a request as received: its body parsed, its key checked,
  its fields validated into the job to render;
* :mod:`~runner.emulator.faults`: the fault kinds, the error reply of each error fault, and the
  parsing of the ``[[faults:...]]`` directive;
* :mod:`~runner.emulator.wire`: sending an answer in slices, cut short, or not at all (a closed
  or reset connection), and the escaped base64 of ``"escaped_b64"``;
* :mod:`~runner.emulator.render`: the PNGs (flat or noise), the closest size for ``size=auto``
  and the edit target, the usage numbers of an edits reply, the dimensions of uploaded
  references;
* :mod:`~runner.emulator.bucket`: the rate limit's token bucket and its headers;
* :mod:`~runner.emulator.errors`: the OpenAI-shaped error reply they all raise.
"""

from __future__ import annotations

from runner.emulator.config import EmulatorConfig
from runner.emulator.faults import (
    BILLED_FAULTS,
    DEFAULT_FAULT_MIX,
    FAULT_KINDS,
    NO_FAULT,
    RATE_LIMITED,
)
from runner.emulator.incoming import DEFAULT_GENERATION_SIZE
from runner.emulator.running import EmulatorThread, serve
from runner.emulator.server import Bill, Emulator, RequestRecord

__all__ = [
    "BILLED_FAULTS",
    "DEFAULT_FAULT_MIX",
    "DEFAULT_GENERATION_SIZE",
    "FAULT_KINDS",
    "NO_FAULT",
    "RATE_LIMITED",
    "Bill",
    "Emulator",
    "EmulatorConfig",
    "EmulatorThread",
    "RequestRecord",
    "serve",
]
