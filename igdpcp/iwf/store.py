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

Every write commits before it returns (about 15 us here) and raises
:class:`StoreError` if it fails; :meth:`durable` is there for backends that
write in the background.  A writer thread with group commit was tried and
measured slower: its handoffs of the GIL cost the reactor thread more than
the SQLite work it took away, and so did a commit per reactor turn.
"""

from __future__ import annotations

import os
import sqlite3

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
    def __init__(self, path: str, synchronous: str = "normal"):
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        try:
            if path != ":memory:":
                directory = os.path.dirname(os.path.abspath(path))
                os.makedirs(directory, exist_ok=True)
                # The file holds THIRD_PARTY_IDs: operator eyes only (RFC 7843 section 7).
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=1.0)
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

    def put(self, row: dict) -> None:
        self.put_many([row])

    def replace(self, old_row: dict, row: dict) -> None:
        """Swap one record for another atomically (a mapping whose key changed)."""
        self._write([self._deleting(old_row), self._putting(row)])

    def delete(self, row: dict) -> None:
        self.delete_many([row])

    def put_many(self, rows: list[dict]) -> None:
        """One transaction (also moving rows between workers' files)."""
        self._write([self._putting(row) for row in rows])

    def delete_many(self, rows: list[dict]) -> None:
        self._write([self._deleting(row) for row in rows])

    def _putting(self, row: dict) -> tuple:
        return self._put, [row[c] for c in COLUMNS]

    def _deleting(self, row: dict) -> tuple:
        return self._delete, [row[k] for k in KEY]

    def durable(self) -> defer.Deferred:
        """Every write is committed when it returns."""
        return defer.succeed(None)

    def load_all(self) -> list[dict]:
        cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM mappings")
        return [dict(zip(COLUMNS, values)) for values in cursor]

    def close(self) -> None:
        self.db.close()

    def _write(self, statements: list) -> None:
        try:
            if len(statements) == 1:  # one statement is its own transaction; BEGIN/COMMIT cost 12% more
                self.db.execute(*statements[0])
                return
            self.db.execute("BEGIN")
            for sql, params in statements:
                self.db.execute(sql, params)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            log.error("mapping store: write failed: {error}", error=e)
            raise StoreError(f"write failed: {e}") from None


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
