"""The pool's counters, as ``on_progress`` gets them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """The pool's counters; ``on_progress`` gets a copy after every change."""

    succeeded: int = 0
    failed: int = 0
    retrying: int = 0
    in_flight: int = 0
    requests: int = 0
    confirmed_micro_usd: int = 0
    possible_micro_usd: int = 0
    # The cause and message of the latest failed attempt ("not_sent", "connection refused to
    # 127.0.0.1:9"), so that a run going wrong says why while it goes on.
    last_error: tuple[str, str] | None = None
