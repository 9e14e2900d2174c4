"""What the after-run views (results, ledger, report, status, export) read from a store.

In progress (issue 10): the read queries of the views move here, behind this protocol.
"""

from __future__ import annotations

from typing import Protocol


class Views(Protocol):
    """The read side of a store, one consistent snapshot per call."""
