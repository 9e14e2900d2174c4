"""A run whose output location is an object store (``--out s3://bucket/prefix``): the local
spool its images pass through, and its books and report put there.

The pool's client writes each answer into the spool, where it is verified and tagged before it
is created in the store (:class:`~runner.core.sinks.LocationSink`); results and ledger are
written into the spool as for a folder, then put in the location, replacing the earlier ones;
so is the HTML report, its thumbnails made from the images read back from the store.
The spool is a fresh temp folder, removed when the run ends: nothing in it outlives the run,
and nothing is in it for long.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from runner.jobs import Job
from runner.outputs.ledger import LedgerFiles, write_ledger
from runner.outputs.report import put_report
from runner.storage import Location, open_location
from runner.store.views import Viewable


@dataclass(frozen=True)
class RemoteOut:
    """The object store ``location`` of a run and its local ``spool`` folder."""

    location: Location
    spool: Path

    @classmethod
    def open(cls, out: str) -> RemoteOut:
        """The location ``out`` names (StorageError when its extra is missing), and a new
        spool."""
        location = open_location(out)
        return cls(location, Path(tempfile.mkdtemp(prefix="image-runner-spool-")))

    def close(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)

    def write_ledger(self, jobs: Iterable[Job], store: Viewable) -> LedgerFiles:
        """Results and ledger, written in the spool and put in the location (each replaced
        whole: a reader sees the old file or the new one); their URLs and the totals."""
        files = write_ledger(jobs, store, self.spool)
        urls = []
        for path in (files.results_parquet, files.results_csv, files.ledger_csv):
            local = Path(path)
            try:
                self.location.put(local.name, local)
            finally:
                local.unlink(missing_ok=True)
            urls.append(f"{self.location.url}/{local.name}")
        return LedgerFiles(urls[0], urls[1], urls[2], files.totals)

    def write_report(self, store: Viewable) -> str:
        """The HTML report, with its thumbnails, put in the location; its URL."""
        return put_report(store, self.location, self.spool)
