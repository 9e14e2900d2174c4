"""What a store held by one process answers about the other workers of its run: there are none.

The SQLite checkpoint is locked by the process that runs (see :mod:`runner.store.sqlite`), so
its plan goes to its own pool directly and no other worker can stop it; a shared backend
(PostgreSQL) answers these from the database.
"""

from __future__ import annotations

from collections.abc import Sequence


class SingleProcess:
    """The :class:`~runner.store.base.Store` operations about other workers, for one process."""

    def queue(self, job_ids: Sequence[str]) -> None:
        """Nothing to record: the plan's jobs go to this process's pool."""

    def ceiling_rpm(self, own_rpm: float | None) -> float | None:
        """This process's own ``--rpm``: no other worker shares its run."""
        return own_rpm

    def planned(self) -> bool:
        """This process planned the run it works on."""
        return True

    def stop_requested(self) -> str | None:
        """No other worker can stop this one."""
        return None

    def request_stop(self, reason: str) -> None:
        """No other worker to tell."""
