"""The SQLite store: rows survive a reopen, one igdpcp per file, one-line open errors,
and a failed write that raises and leaves nothing half-done."""

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from igdpcp.iwf.store import COLUMNS, MemoryStore, SQLiteStore, StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(port: int, tunnel: str = "t1", **changes) -> dict:
    values = {c: "" for c in COLUMNS}
    values.update(tunnel=tunnel, third_party_id=b"\x00\x03\xe9", server="cgn", external_port=port,
                  protocol="TCP", internal_client="192.168.1.10", internal_port=port, description="d",
                  enabled=1, lease=None, lease_end=None, any_port=0, nonce=os.urandom(12),
                  granted_lifetime=120, granted_at=1.5)
    values.update(changes)
    return values


class StoreContract:
    """What the IWF relies on, for every IMappingStore."""

    def make(self):
        raise NotImplementedError

    def test_put_replace_delete(self):
        store = self.make()
        a, b = row(1000), row(1001)
        store.put(a)
        store.put(b)
        store.put(dict(a, description="again"))  # same key: replaced, not added
        self.assertEqual(sorted((r["external_port"], r["description"]) for r in store.load_all()),
                         [(1000, "again"), (1001, "d")])
        store.replace(b, row(2001, nonce=b["nonce"]))
        store.delete(a)
        rows = store.load_all()
        self.assertEqual([(r["external_port"], r["nonce"]) for r in rows], [(2001, b["nonce"])])

    def test_same_port_other_tunnel_is_another_row(self):
        store = self.make()
        store.put(row(1000, "t1"))
        store.put(row(1000, "t2"))
        self.assertEqual(len(store.load_all()), 2)


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    def make(self):
        return MemoryStore()


class SQLiteStoreTests(StoreContract, SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "sub", "mappings.sqlite")

    def make(self):
        store = SQLiteStore(self.path)
        self.addCleanup(store.close)
        return store

    def test_rows_survive_reopen_and_file_is_private(self):
        store = SQLiteStore(self.path)
        written = row(1000, lease=3600, lease_end=99.5)
        store.put(written)
        store.close()
        again = self.make()
        self.assertEqual(again.load_all(), [written])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_second_opener_is_refused(self):
        self.make()
        with self.assertRaises(StoreError) as e:
            SQLiteStore(self.path)
        self.assertIn("in use by another process", str(e.exception))

    def test_another_process_is_refused_until_close(self):
        store = SQLiteStore(self.path)
        probe = [sys.executable, "-c",
                 "import sys; from igdpcp.iwf.store import SQLiteStore, StoreError\n"
                 "try: SQLiteStore(sys.argv[1]).close()\n"
                 "except StoreError as e: sys.exit(str(e))", self.path]
        env = dict(os.environ, PYTHONPATH=REPO)
        busy = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
        self.assertNotEqual(busy.returncode, 0)
        self.assertIn("in use by another process", busy.stderr)
        store.close()
        free = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(free.returncode, 0, free.stderr)

    def test_unusable_path(self):
        with open(os.path.join(self.dir, "file"), "w"):
            pass
        with self.assertRaises(StoreError) as e:
            SQLiteStore(os.path.join(self.dir, "file", "mappings.sqlite"))
        self.assertNotIn("\n", str(e.exception))


class WriteTests(SynchronousTestCase):
    """Every write is committed when it returns; a failed one raises and changes nothing."""

    def setUp(self):
        self.path = os.path.join(tempfile.mkdtemp(), "mappings.sqlite")
        self.store = SQLiteStore(self.path)

    def reopened(self) -> list[int]:
        """What is on disk: the ports another opener sees once this store is closed."""
        self.store.close()
        stored = SQLiteStore(self.path)
        self.addCleanup(stored.close)
        return sorted(r["external_port"] for r in stored.load_all())

    def test_writes_are_on_disk_when_they_return(self):
        rows = [row(1000 + i) for i in range(50)]
        for r in rows:
            self.store.put(r)
        self.store.delete(rows[0])
        self.store.replace(rows[1], row(3001, nonce=rows[1]["nonce"]))
        self.assertIsNone(self.successResultOf(self.store.durable()))
        self.assertEqual(self.reopened(), sorted([r["external_port"] for r in rows[2:]] + [3001]))

    def test_failed_write_raises_and_later_writes_work(self):
        with self.assertRaises(StoreError) as e:
            self.store.put(row(1001, tunnel=None))  # NOT NULL
        self.assertNotIn("\n", str(e.exception))
        self.store.put(row(1002))
        self.assertEqual(self.reopened(), [1002])

    def test_failed_replace_keeps_the_old_row(self):
        self.store.put(row(1000))
        with self.assertRaises(StoreError):
            self.store.replace(row(1000), row(1001, tunnel=None))
        self.assertEqual(self.reopened(), [1000])
