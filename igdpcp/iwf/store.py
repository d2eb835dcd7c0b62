"""Where promised mappings live across restarts (RFC 6970 section 5.3: "permanent storage").

SQLite by default, in WAL mode: a write is committed before :meth:`put`
returns, so it survives igdpcp being killed.  ``synchronous="full"`` also
survives a power cut, at the cost of an fsync per write.  Records are plain
rows here (:meth:`MappingRecord.to_row`); the store knows no IWF types.

The database is opened with an exclusive lock, held until :meth:`close`: a
second igdpcp on the same file would renew, and delete at lease end, the
first one's mappings.  The lock also spares each write SQLite's shared-memory
locking (about a third of a write's cost).  Read the file while igdpcp is
stopped, or copy it.

Given a reactor, writes go to a writer thread: :meth:`put`, :meth:`replace`
and :meth:`delete` only queue them, the thread commits everything queued in
one transaction (WAL checkpoints happen there too), and :meth:`durable`
fires once what was queued before it is committed.  The IWF waits for that
before it answers, so a SOAP success still means the mapping is on disk,
and the reactor thread does not spend a third of an AddPortMapping in
SQLite.  Without a reactor every write commits before it returns.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from twisted.internet import defer
from zope.interface import implementer

from ..interfaces import IMappingStore
from ..logs import logger

log = logger(__name__)

COLUMNS = (
    "tunnel", "third_party_id", "server", "remote_host", "external_port", "protocol",
    "internal_client", "internal_port", "description", "enabled", "lease", "lease_end",
    "any_port", "nonce", "external_address", "granted_lifetime", "granted_at",
)
KEY = ("tunnel", "remote_host", "external_port", "protocol")


class StoreError(Exception):
    """The store cannot be opened, or a write failed (one line, for the operator)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS mappings (
    tunnel TEXT NOT NULL, third_party_id BLOB NOT NULL, server TEXT NOT NULL,
    remote_host TEXT NOT NULL, external_port INTEGER NOT NULL, protocol TEXT NOT NULL,
    internal_client TEXT NOT NULL, internal_port INTEGER NOT NULL, description TEXT NOT NULL,
    enabled INTEGER NOT NULL, lease INTEGER, lease_end REAL, any_port INTEGER NOT NULL,
    nonce BLOB NOT NULL, external_address TEXT NOT NULL, granted_lifetime INTEGER NOT NULL,
    granted_at REAL NOT NULL,
    PRIMARY KEY ({", ".join(KEY)})
) WITHOUT ROWID
"""


@implementer(IMappingStore)
class SQLiteStore:
    def __init__(self, path: str, synchronous: str = "normal", *, reactor=None):
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        try:
            if path != ":memory:":
                directory = os.path.dirname(os.path.abspath(path))
                os.makedirs(directory, exist_ok=True)
                # The file holds THIRD_PARTY_IDs: operator eyes only (RFC 7843 section 7).
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self.db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first write
            self.db.execute(_SCHEMA)
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise StoreError(f"{path} is in use by another process") from None
            raise StoreError(f"{path}: {e}") from None
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
        self._put = (f"INSERT OR REPLACE INTO mappings ({', '.join(COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(COLUMNS))})")
        self._delete = "DELETE FROM mappings WHERE " + " AND ".join(f"{k} = ?" for k in KEY)
        self.reactor = reactor
        self._db_lock = threading.Lock()  # the writer's batch, or a read from the reactor thread
        self._cond = threading.Condition()
        self._queued: list = []  # statement lists, one per write, oldest first
        self._waiters: list = []  # Deferreds of durable(), each after the writes it covers
        self._closing = False
        self._thread = None
        if reactor is not None:
            self._thread = threading.Thread(target=self._write_loop, name="igdpcp-store", daemon=True)
            self._thread.start()

    def put(self, row: dict) -> None:
        self._write([(self._put, [row[c] for c in COLUMNS])])

    def replace(self, old_row: dict, row: dict) -> None:
        """Swap one record for another atomically (a mapping whose key changed)."""
        self._write([(self._delete, [old_row[k] for k in KEY]), (self._put, [row[c] for c in COLUMNS])])

    def delete(self, row: dict) -> None:
        self._write([(self._delete, [row[k] for k in KEY])])

    def durable(self) -> defer.Deferred:
        """Fires once every write made before this call is committed; fails with StoreError."""
        if self._thread is None:
            return defer.succeed(None)
        d = defer.Deferred()
        with self._cond:
            self._waiters.append(d)
            self._cond.notify()
        return d

    def load_all(self) -> list[dict]:
        with self._db_lock:
            cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM mappings")
            return [dict(zip(COLUMNS, values)) for values in cursor]

    def close(self) -> None:
        """Commit what is queued, then close (blocks for the last batch)."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
        self.db.close()

    # -- writing
    def _write(self, statements: list) -> None:
        if self._thread is None:
            self._commit([statements])
            return
        with self._cond:
            self._queued.append(statements)
            self._cond.notify()

    def _commit(self, batch: list) -> None:
        with self._db_lock:
            try:
                self.db.execute("BEGIN")
                for statements in batch:
                    for sql, params in statements:
                        self.db.execute(sql, params)
                self.db.execute("COMMIT")
            except sqlite3.Error as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise StoreError(f"write failed: {e}") from None

    def _write_loop(self) -> None:
        """The writer thread: one transaction for everything queued, then wake the waiters."""
        while True:
            with self._cond:
                while not (self._queued or self._waiters or self._closing):
                    self._cond.wait()
                batch, self._queued = self._queued, []
                waiters, self._waiters = self._waiters, []
                closing = self._closing
            error = None
            if batch:
                try:
                    self._commit(batch)
                except StoreError as e:
                    error = e
            if waiters or error is not None:
                self.reactor.callFromThread(self._wake, waiters, error)
            if closing and not batch:
                return

    @staticmethod
    def _wake(waiters: list, error: StoreError | None) -> None:
        if error is not None:
            log.error("mapping store: {error}", error=error)  # the waiting calls get 501
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)


@implementer(IMappingStore)
class MemoryStore:
    """For tests and for operators who accept losing mappings on restart."""

    def __init__(self):
        self.rows: dict[tuple, dict] = {}

    def put(self, row: dict) -> None:
        self.rows[tuple(row[k] for k in KEY)] = dict(row)

    def replace(self, old_row: dict, row: dict) -> None:
        self.delete(old_row)
        self.put(row)

    def delete(self, row: dict) -> None:
        self.rows.pop(tuple(row[k] for k in KEY), None)

    def durable(self) -> defer.Deferred:
        return defer.succeed(None)

    def load_all(self) -> list[dict]:
        return [dict(r) for r in self.rows.values()]

    def close(self) -> None:
        pass
