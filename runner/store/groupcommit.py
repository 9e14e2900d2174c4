"""Group commit: the checkpoint writes of all workers, committed together off the event loop.

Every attempt commits twice (its intent before the request, its outcome after), and with
``synchronous=FULL`` each commit is an fsync: milliseconds on a real disk, during which a
synchronous commit would hold the whole event loop, and with it every request in flight. Here a
worker hands its write over and awaits it; one writer runs every write waiting at that moment in
a single transaction, in a thread, and wakes each worker once the transaction is durable. The
promise stays whole (the worker goes on only after *its* write is committed) while a batch of N
writes costs one fsync instead of N.

Each write runs under its own savepoint, so one that fails is rolled back alone and raises in its
own worker; the others commit. When SQLite ends the whole transaction itself instead (it may, on
a full disk or an I/O error), or the ``COMMIT`` fails, every write of the batch fails with that
error, and the transaction is rolled back so that the next batch starts clean.

Over a network a savepoint costs two round trips (``SAVEPOINT``, ``RELEASE``), most of what a
one-statement write costs. A writer made with ``optimistic=True`` (PostgreSQL's) first runs the
batch without them; when any write raises, that transaction is rolled back whole and the batch
run again a savepoint a write, as above. Nothing of the first try is committed or answered, so
each write still succeeds or fails alone; a batch in which a write fails costs twice.

A write may name a folder to fsync first (``sync_first``): a success's image was renamed into
it, and the rename must be durable before the success is. Each folder named in a batch is
fsynced once, in the writer's thread, before the batch's transaction: one fsync for all the
images of the batch, not one an image. A folder that cannot be fsynced fails the writes that
named it (:class:`~runner.errors.StoreWriteError`); the others commit. One that is gone holds
no image to keep: its writes commit, and the next run finds their images missing.

Both backends use it: any connection with ``execute`` and ``in_transaction`` will do (SQLite's
own; for PostgreSQL, :class:`runner.store.postgres.connect.Translated`), with the ``transaction``
that opens and commits a batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from runner.errors import StoreWriteError
from runner.images.files import fsync_dir
from runner.stages import timed

T = TypeVar("T")


class Connection(Protocol):
    """What the writer needs of a connection: statements, and whether a transaction is open
    (a backend that ends the whole transaction on an error says False)."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, /) -> object: ...


C = TypeVar("C", bound=Connection)


class GroupCommit(Generic[C]):
    """Use as ``result = await commits.run(lambda db: db.execute(...))``. The connection must
    be opened with ``check_same_thread=False`` and used by nobody else while writes are
    pending (:meth:`drain` waits for them). ``transaction`` opens and commits the batch's
    transaction (default: ``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``db``)."""

    def __init__(
        self,
        db: C,
        transaction: Callable[[], AbstractContextManager[C]] | None = None,
        *,
        optimistic: bool = False,
        sync_folder: Callable[[Path], None] | None = None,  # fsync_dir, or a test's
    ) -> None:
        self.db = db
        self.optimistic = optimistic
        self._sync_folder = sync_folder or fsync_dir
        self._transaction = transaction or (
            lambda: batch_transaction(db, "BEGIN IMMEDIATE", sqlite3.Error)
        )
        self.batches = 0  # transactions committed, for tests and benchmarks
        self.writes = 0
        self.retried = 0  # optimistic batches run again a savepoint a write
        self._pending: list[tuple[Callable[[C], Any], asyncio.Future[Any], Path | None]] = []
        # Its own thread: commits never queue behind other work in the default executor.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<GroupCommit batches={self.batches} writes={self.writes} retried={self.retried}>"

    async def run(self, write: Callable[[C], T], *, sync_first: Path | None = None) -> T:
        """Run ``write`` in a transaction and return its result once that is committed; the
        folder ``sync_first`` is fsynced before it (once for all the batch's writes)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future, sync_first))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # Shielded: a worker cancelled while its write is being committed must not leave the
        # writer half done; the write still lands, and the caller's cancel goes on.
        return await asyncio.shield(future)

    def close(self) -> None:
        """Let the writer thread go; call after :meth:`drain`."""
        self._thread.shutdown(wait=False)

    async def drain(self) -> None:
        """Wait until every write handed over so far is committed."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                loop = asyncio.get_running_loop()
                writes = [(w, folder) for w, _, folder in batch]
                results = await loop.run_in_executor(self._thread, self._commit, writes)
            except Exception as exc:  # the transaction itself failed: every write did
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # the writer itself is cancelled: nobody is answered
                for _, future, _ in batch:
                    future.cancel()
                raise
            for (_, future, _), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _commit(
        self, batch: list[tuple[Callable[[C], Any], Path | None]]
    ) -> list[tuple[bool, Any]]:
        """Fsync the batch's folders, then commit the writes whose folders were (in a worker
        thread); each write's (ok, result or error), in order."""
        refused = self._sync_folders({folder for _, folder in batch if folder is not None})
        writes = [write for write, folder in batch if folder not in refused]
        with timed("checkpoint commit"):
            results = iter(self._transact(writes))
        return [
            (False, refused[folder]) if folder in refused else next(results) for _, folder in batch
        ]

    def _sync_folders(self, folders: set[Path]) -> dict[Path | None, StoreWriteError]:
        """Fsync each of ``folders``; the error of each that refused."""
        refused: dict[Path | None, StoreWriteError] = {}
        for folder in folders:
            try:
                with timed("fsync folder"):
                    self._sync_folder(folder)
            except FileNotFoundError:  # no image left to keep: the next run makes it again
                continue
            except OSError as exc:
                message = f"cannot fsync {folder}, where images were saved: {exc.strerror or exc}"
                refused[folder] = StoreWriteError(message)
        return refused

    def _transact(self, writes: list[Callable[[C], Any]]) -> list[tuple[bool, Any]]:
        """One transaction for the writes."""
        if not writes:
            return []
        if self.optimistic:
            try:
                with self._transaction() as db:
                    values = [write(db) for write in writes]
            except Exception:  # rolled back whole: each write again, under its own savepoint
                self.retried += 1
            else:
                self.batches += 1
                self.writes += len(writes)
                return [(True, value) for value in values]
        results: list[tuple[bool, Any]] = []
        with self._transaction() as db:
            for write in writes:
                db.execute("SAVEPOINT write")
                try:
                    value = write(db)
                except Exception as exc:
                    if not db.in_transaction:  # SQLite rolled back the batch: all of it failed
                        raise
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                    results.append((False, exc))
                else:
                    db.execute("RELEASE write")
                    results.append((True, value))
        self.batches += 1
        self.writes += len(writes)
        return results


@contextmanager
def batch_transaction(db: C, begin: str, driver_error: type[Exception]) -> Iterator[C]:
    """A batch's transaction on the writer's connection: ``begin`` (SQLite's ``BEGIN
    IMMEDIATE``, the default; PostgreSQL's ``BEGIN``) ... ``COMMIT``, rolled back on any
    error, whose first one (not the rollback's, a ``driver_error``) is the one raised."""
    db.execute(begin)
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # also after a failed COMMIT, which leaves it open
            with suppress(driver_error):
                db.execute("ROLLBACK")
        raise
