"""igdpcp on several cores (igdpcp.workers): which worker owns a tunnel, moving stored
rows when the worker count changes, and a supervisor running real child processes."""

import glob
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import ip_address

from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from igdpcp import config as configuration
from igdpcp import service, tap, workers
from igdpcp.iwf.records import MappingRecord
from igdpcp.iwf.store import COLUMNS, KEY, SQLiteStore, StoreError
from igdpcp.subscriber import Subscriber
from igdpcp.workers import Shard, reshard, shard_of, worker_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [f"vxlan{1000 + i}" for i in range(150)] + ["subscriber-1", "subscriber-2", "tünnel-ü", ""]


# ---------------------------------------------------------------- which worker owns a tunnel

class ShardTests(SynchronousTestCase):
    def test_owns_partitions_names(self):
        """Every tunnel is served by exactly one worker, and no worker is left out."""
        for count in (1, 2, 3, 4, 7, 16):
            shards = [Shard(i, count) for i in range(count)]
            for name in NAMES:
                owners = [s.index for s in shards if s.owns(name)]
                self.assertEqual(owners, [shard_of(name, count)], (name, count))
            if count <= 4:  # 154 names: each of a few workers gets a share
                for s in shards:
                    self.assertTrue(any(s.owns(n) for n in NAMES), s)

    def test_single_process_owns_everything(self):
        self.assertEqual(Shard(), Shard(0, 1))
        self.assertTrue(all(Shard(0, 1).owns(n) for n in NAMES))

    def test_store_paths(self):
        """Worker 0 keeps the configured file (one worker is plain igdpcp); the others differ."""
        path = "/var/lib/igdpcp/mappings.sqlite"
        paths = [Shard(i, 8).store_path(path) for i in range(8)]
        self.assertEqual(paths[0], path)
        self.assertEqual(Shard(0, 1).store_path(path), path)
        self.assertEqual(len(set(paths)), 8)
        self.assertEqual(paths[3], path + ".worker3")

    def test_parse(self):
        self.assertEqual(Shard.parse("1/4"), Shard(1, 4))
        self.assertEqual(Shard.parse("0/1"), Shard(0, 1))
        self.assertEqual(Shard.parse("255/256"), Shard(255, 256))
        for bad in ("4/4", "0/0", "a/b", "1/300", "-1/4", "1", "1/2/3", ""):
            with self.assertRaises(ValueError, msg=bad) as e:
                Shard.parse(bad)
            self.assertTrue(str(e.exception).startswith("--worker:"), str(e.exception))

    def test_tap_rejects_bad_worker_option(self):
        """``--worker`` comes from the supervisor, but a bad one is still one line."""
        options = tap.Options()
        options.parseOptions(["--worker", "1/4"])
        self.assertEqual(options.shard, Shard(1, 4))
        with self.assertRaises(SystemExit) as e:
            tap.Options().parseOptions(["--worker", "4/4"])
        self.assertTrue(str(e.exception.code).startswith("igdpcp: --worker:"), e.exception.code)

    def test_shard_of_is_stable_across_interpreters(self):
        """A restart must put each tunnel on the same worker (its store file and its
        mappings are there): the same values in a fresh interpreter with another hash seed,
        and the same as the values pinned here, which an upgrade must not change."""
        counts = (2, 3, 7, 256)
        here = {c: [shard_of(n, c) for n in NAMES] for c in counts}
        script = ("import json, sys; from igdpcp.workers import shard_of; "
                  "names, counts = json.loads(sys.stdin.read()); "
                  "print(json.dumps({c: [shard_of(n, c) for n in names] for c in counts}))")
        for seed in ("1", "12345"):
            proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([NAMES, counts]),
                                  capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=REPO, PYTHONHASHSEED=seed))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            there = {int(c): v for c, v in json.loads(proc.stdout).items()}
            self.assertEqual(there, here)
        # CRC-32 of the UTF-8 name: zlib.crc32(b"subscriber-1") == 0x78ABBDB8.
        self.assertEqual([shard_of("subscriber-1", c) for c in (2, 3, 4, 7, 256)],
                         [0, 1, 0, 2, 0xB8])


# ---------------------------------------------------------------- moving stored rows

def rows_for(tunnel: str, n: int = 3) -> list[dict]:
    """Rows as the IWF stores them (MappingRecord.to_row), with every column used."""
    out = []
    for i in range(n):
        record = MappingRecord(
            subscriber=Subscriber(tunnel, os.urandom(3), "cgn"),
            remote_host=None if i % 2 == 0 else ip_address("203.0.113.7"),
            external_port=10000 + i, protocol="UDP" if i % 2 == 0 else "TCP",
            internal_client=ip_address("192.168.1.10" if i != 2 else "fd00::10"),
            internal_port=8000 + i, description=f"app {i} of {tunnel}", enabled=i != 1,
            lease=None if i == 0 else 3600, lease_end=None if i == 0 else 1.7e9 + i / 3,
            any_port=i == 2, nonce=os.urandom(12), server="cgn",
            external_address=None if i == 0 else ip_address("198.51.100.1"),
            granted_lifetime=1200 * i, granted_at=1.7e9 + i / 7)
        row = record.to_row()
        assert set(row) == set(COLUMNS)
        out.append(row)
    return out


def key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


class ReshardTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "mappings.sqlite")
        self.rows = [r for name in NAMES[:60] for r in rows_for(name)]

    def write(self, path: str, rows: list[dict]) -> None:
        store = SQLiteStore(path)
        try:
            store.put_many(rows)
        finally:
            store.close()

    def read(self, path: str) -> list[dict]:
        self.assertTrue(os.path.exists(path), path)
        store = SQLiteStore(path)
        try:
            return sorted(store.load_all(), key=key)
        finally:
            store.close()

    def worker_files(self) -> list[str]:
        return sorted(os.path.basename(p) for p in glob.glob(self.path + ".worker*"))

    def assertSharded(self, count: int) -> None:
        """Each worker's file holds exactly the rows of its tunnels, unchanged."""
        total = 0
        for index in range(count):
            expected = sorted((r for r in self.rows if shard_of(r["tunnel"], count) == index), key=key)
            path = Shard(index, count).store_path(self.path)
            if not expected and not os.path.exists(path):
                continue
            self.assertEqual(self.read(path), expected, (index, count))
            total += len(expected)
        self.assertEqual(total, len(self.rows))
        for name in self.worker_files():  # nothing for workers beyond count
            suffix = name.rsplit(".worker", 1)[1]
            self.assertTrue(suffix.isdigit() and int(suffix) < count, (name, count))

    def test_one_to_three_and_back(self):
        self.write(self.path, self.rows)
        moved = reshard(self.path, 3)
        leaving = [r for r in self.rows if shard_of(r["tunnel"], 3) != 0]
        self.assertTrue(0 < len(leaving) < len(self.rows))
        self.assertEqual(moved, len(leaving))
        self.assertSharded(3)
        self.assertEqual(self.worker_files(), ["mappings.sqlite.worker1", "mappings.sqlite.worker2"])

        self.assertEqual(reshard(self.path, 1), len(leaving))
        self.assertEqual(self.read(self.path), sorted(self.rows, key=key))
        self.assertEqual(self.worker_files(), [])  # the files and their -wal/-shm

    def test_any_change_of_count(self):
        """Rows also move between surviving workers (crc % 3 is not crc % 2)."""
        self.write(self.path, self.rows)
        for count in (3, 2, 5, 4, 1):
            reshard(self.path, count)
            self.assertSharded(count)
        self.assertEqual(self.worker_files(), [])
        self.assertEqual(reshard(self.path, 1), 0)

    def test_same_count_moves_nothing(self):
        self.write(self.path, self.rows)
        reshard(self.path, 3)
        self.assertEqual(reshard(self.path, 3), 0)
        self.assertSharded(3)

    def test_row_in_two_files_ends_up_once(self):
        """A crash between the put and the delete leaves a row in both files."""
        self.write(self.path, self.rows)
        reshard(self.path, 3)
        row = next(r for r in self.rows if shard_of(r["tunnel"], 3) == 1)
        self.write(self.path, [row])  # still in the old file too
        self.assertEqual(reshard(self.path, 3), 1)
        self.assertSharded(3)
        self.write(Shard(2, 3).store_path(self.path), [row])  # and, say, in a third one
        reshard(self.path, 1)
        self.assertEqual(self.read(self.path), sorted(self.rows, key=key))

    def test_worker_killed_with_rows_in_its_wal(self):
        """A worker killed outright leaves its last writes in the -wal file: they move
        too, and the -wal and -shm go with the file."""
        self.write(self.path, self.rows)
        reshard(self.path, 3)
        extra = [r for name in NAMES[60:] if shard_of(name, 3) == 2 for r in rows_for(name, 1)]
        worker2 = Shard(2, 3).store_path(self.path)
        script = ("import os, pickle, sys; from igdpcp.iwf.store import SQLiteStore; "
                  "s = SQLiteStore(sys.argv[1]); s.put_many(pickle.loads(sys.stdin.buffer.read())); "
                  "os._exit(0)")
        proc = subprocess.run([sys.executable, "-c", script, worker2], input=pickle.dumps(extra),
                              capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(os.path.exists(worker2 + "-wal"))
        open(worker2 + "-shm", "wb").close()  # as a crashed non-exclusive reader (sqlite3) leaves
        self.rows += extra
        reshard(self.path, 1)
        self.assertEqual(self.read(self.path), sorted(self.rows, key=key))
        self.assertEqual(self.worker_files(), [])

    def test_single_file_one_worker_is_a_no_op(self):
        """Plain igdpcp: the file is not even opened (it may be held; that is for the
        store to report when igdpcp opens it)."""
        self.assertEqual(reshard(self.path, 1), 0)
        self.assertFalse(os.path.exists(self.path))
        self.write(self.path, self.rows)
        held = SQLiteStore(self.path)
        self.addCleanup(held.close)
        self.assertEqual(reshard(self.path, 1), 0)
        self.assertEqual(len(held.load_all()), len(self.rows))

    def test_no_files_creates_none(self):
        self.assertEqual(reshard(self.path, 4), 0)
        self.assertEqual(os.listdir(self.dir), [])

    def test_store_in_use_is_an_error(self):
        self.write(self.path, self.rows)
        held = SQLiteStore(self.path)  # as if an igdpcp still ran on it
        self.addCleanup(held.close)
        with self.assertRaises(StoreError) as e:
            reshard(self.path, 3)
        self.assertIn("in use by another process", str(e.exception))
        self.assertEqual(self.worker_files(), [])
        self.assertEqual(len(held.load_all()), len(self.rows))

    def test_target_in_use_loses_nothing(self):
        """A worker file held by a leftover worker: nothing moves, and a later reshard does it all."""
        self.write(self.path, self.rows)
        worker1 = Shard(1, 3).store_path(self.path)
        held = SQLiteStore(worker1)
        with self.assertRaises(StoreError):
            reshard(self.path, 3)
        held.close()
        self.assertEqual(self.read(self.path), sorted(self.rows, key=key))
        reshard(self.path, 3)
        self.assertSharded(3)

    def test_supervisor_reports_store_in_use_as_config_line(self):
        held = SQLiteStore(self.path)
        self.addCleanup(held.close)
        config = configuration.parse({"store": {"path": self.path}, "process": {"workers": 2}})
        with self.assertRaises(configuration.ConfigError) as e:
            service.make_supervisor(reactor, config, "/nonexistent.toml", lambda event: None)
        self.assertEqual(str(e.exception), f"store.path: {self.path} is in use by another process")

    def test_supervisor_reshards_and_builds_pool(self):
        self.write(self.path, self.rows)
        config = configuration.parse({"store": {"path": self.path}, "process": {"workers": 3}})
        pool = service.make_supervisor(reactor, config, "/etc/igdpcp.toml", lambda event: None)
        self.assertSharded(3)
        self.assertTrue(os.path.exists(self.path + ".key"))  # made once, before any worker
        self.assertEqual(pool.count, 3)
        self.assertEqual(pool.argv_for(Shard(2, 3)), worker_argv("/etc/igdpcp.toml", Shard(2, 3)))
        self.assertFalse(pool.running)

    def test_back_to_one_process_keeps_workers_rows(self):
        """workers = 3, then workers = 1 (plain igdpcp, no supervisor): the mappings of
        workers 1 and 2 must be restored, not left behind in their files."""
        self.write(self.path, self.rows)
        reshard(self.path, 3)
        config = configuration.parse({"store": {"path": self.path}})
        top = service.make_service(reactor, config)
        store = top.getServiceNamed("core").store
        self.addCleanup(store.close)
        self.assertEqual(sorted(store.load_all(), key=key), sorted(self.rows, key=key))
        self.assertEqual(self.worker_files(), [])


class WorkerArgvTests(SynchronousTestCase):
    def test_argv(self):
        """twist, JSON events on stdout, the log level, and the worker's shard."""
        argv = worker_argv("/etc/igdpcp.toml", Shard(2, 5))
        self.assertEqual(argv[:3], [sys.executable, "-m", "twisted"])
        self.assertIn("--log-format=json", argv)
        self.assertIn("--log-file=-", argv)
        self.assertIn("--log-level=debug", argv)
        plugin = argv.index("igdpcp")
        self.assertEqual(argv[plugin + 1:], ["--config", "/etc/igdpcp.toml", "--worker", "2/5"])


# ---------------------------------------------------------------- the supervisor's pool

CHILD = r"""
import signal, sys, time
from twisted.logger import Logger, jsonFileLogObserver

index, mode = int(sys.argv[1]), sys.argv[2]
log = Logger(namespace="child", observer=jsonFileLogObserver(sys.stdout))

def bye(signum, frame):
    time.sleep(0.3)
    log.info("bye {index}", index=index)
    sys.exit(0)

if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "slow-term":
    signal.signal(signal.SIGTERM, bye)
elif mode == "stderr":
    sys.stderr.write(f"problem from {index}\nsecond line\n")
    sys.stderr.flush()
elif mode == "noise":
    sys.stdout.write("not json at all\n")
    sys.stdout.flush()
elif mode == "big":
    log.info("big {index}", index=index, blob="x" * 50000)
elif mode.startswith("beat"):  # heartbeats every 0.1 s for that many seconds, then silence
    end = time.monotonic() + float(mode[4:])
    while time.monotonic() < end:
        log.info("heartbeat", igdpcp_heartbeat=True)
        time.sleep(0.1)
log.warn("up {index}", index=index)
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
if mode.startswith("live"):
    time.sleep(float(mode[4:]))
    sys.exit(0)
time.sleep(30)
"""


def record(event: dict) -> bytes:
    """One event as ``twist --log-format=json`` writes it (jsonFileLogObserver)."""
    return ("\x1e" + eventAsJSON(event) + "\n").encode()


class WorkerProtocolTests(SynchronousTestCase):
    """A worker's output as the pipe delivers it: in reads that may end anywhere."""

    def setUp(self):
        self.published = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.worker = workers._WorkerProtocol(None, 4, self.published.append)

    def own(self, level):
        return [formatEvent(e) for e in self.logged
                if e.get("log_namespace") == "igdpcp.workers" and e.get("log_level") is level]

    def test_event_cut_into_single_bytes(self):
        data = record({"log_format": "hello {who}", "who": "é", "log_level": LogLevel.error,
                       "log_namespace": "igdpcp.iwf"}) * 2
        for i in range(len(data)):
            self.worker.childDataReceived(1, data[i:i + 1])
        self.assertEqual([formatEvent(e) for e in self.published], ["hello é", "hello é"])
        self.assertIs(self.published[0]["log_level"], LogLevel.error)
        self.assertEqual(self.published[0]["log_system"], "worker 4 igdpcp.iwf#error")

    def test_json_that_is_not_an_event(self):
        """``42`` is valid JSON but no event: a warning like any other stray line.  (Raising
        here makes the reactor close the worker's stdout: the worker's log is lost.)"""
        self.worker.childDataReceived(1, b"42\n\x1e[1, 2]\n" + record({"log_format": "after"}))
        self.assertEqual(self.own(LogLevel.warn), ["worker 4: 42", "worker 4: [1, 2]"])
        self.assertEqual([formatEvent(e) for e in self.published], ["after"])

    def test_stderr_line_cut_by_reads(self):
        """A traceback line longer than a read of the pipe (8192 bytes) is still one line."""
        self.worker.childDataReceived(2, b"Traceback (most recent ")
        self.worker.childDataReceived(2, b"call last): \xc3")
        self.worker.childDataReceived(2, b"\xa9\nnext\n")
        self.assertEqual(self.own(LogLevel.error),
                         ["worker 4: Traceback (most recent call last): é", "worker 4: next"])


class RecordingPool(workers.WorkerPool):
    """Remembers why each worker ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reasons = []

    def ended(self, worker, reason):
        self.reasons.append((worker.index, reason))
        super().ended(worker, reason)


class RecordingReactor:
    """The real reactor, noting the delay of every callLater."""

    def __init__(self):
        self.delays = []

    def __getattr__(self, name):
        return getattr(reactor, name)

    def callLater(self, delay, f, *args, **kwargs):
        self.delays.append((getattr(f, "__name__", f), delay))
        return reactor.callLater(delay, f, *args, **kwargs)


class WorkerPoolTests(TestCase):
    timeout = 30

    def setUp(self):
        self.patch(workers, "RESTART_DELAYS", (0.05, 0.2, 0.4))
        self.patch(workers, "STOP_TIMEOUT", 3.0)
        self.published = []  # what the pool re-publishes from its workers
        self.logged = []  # the pool's own log (igdpcp.workers)
        self.spawned = []  # (shard, time.monotonic())
        observer = self.logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def pool(self, count, mode, clock=reactor):
        def argv_for(shard):
            self.spawned.append((shard, time.monotonic()))
            m = mode(shard.index) if callable(mode) else mode
            return [sys.executable, "-c", CHILD, str(shard.index), m]
        pool = RecordingPool(clock, count, argv_for, self.published.append)
        self.addCleanup(lambda: pool.stopService() if pool.running else None)
        return pool

    @defer.inlineCallbacks
    def waitFor(self, condition, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    def sleep(self, seconds):
        return task.deferLater(reactor, seconds, lambda: None)

    def texts(self, prefix):
        return [formatEvent(e) for e in self.published if formatEvent(e).startswith(prefix)]

    def own(self, level):
        return [formatEvent(e) for e in self.logged
                if e.get("log_namespace") == "igdpcp.workers" and e.get("log_level") is level]

    @defer.inlineCallbacks
    def test_events_republished_with_level_and_worker(self):
        pool = self.pool(2, "sleep")
        pool.startService()
        yield self.waitFor(lambda: len(self.texts("up")) == 2, "both workers' events")
        self.assertEqual(sorted((s for s, _ in self.spawned), key=lambda s: s.index),
                         [Shard(0, 2), Shard(1, 2)])
        for event in self.published:
            index = event["index"]  # from the child's own argv
            self.assertEqual(formatEvent(event), f"up {index}")
            self.assertIs(event["log_level"], LogLevel.warn)
            self.assertEqual(event["log_namespace"], "child")
            self.assertEqual(event["log_system"], f"worker {index} child#warn")
        self.assertEqual(pool.counters, {"started": 2, "ended": 0, "hung": 0})

    @defer.inlineCallbacks
    def test_event_larger_than_a_pipe_read(self):
        """Events are split only at newlines, not where a read of the pipe ended."""
        self.pool(1, "big").startService()
        yield self.waitFor(lambda: self.texts("up"), "the event after the big one")
        big = [e for e in self.published if e.get("log_format") == "big {index}"]
        self.assertEqual(len(big), 1)
        self.assertEqual(big[0]["blob"], "x" * 50000)
        self.assertIs(big[0]["log_level"], LogLevel.info)

    @defer.inlineCallbacks
    def test_text_on_stdout_is_a_warning(self):
        self.pool(1, "noise").startService()
        yield self.waitFor(lambda: self.texts("up"), "the event after the text")
        self.assertIn("worker 0: not json at all", self.own(LogLevel.warn))

    @defer.inlineCallbacks
    def test_stderr_lines_are_errors_naming_the_worker(self):
        self.pool(2, "stderr").startService()
        expected = {f"worker {i}: {line}" for i in (0, 1) for line in (f"problem from {i}", "second line")}
        yield self.waitFor(lambda: expected <= set(self.own(LogLevel.error)), "both workers' stderr")

    @defer.inlineCallbacks
    def test_ended_worker_restarted_with_growing_delays(self):
        clock = RecordingReactor()
        pool = self.pool(1, "exit3", clock)
        pool.startService()
        yield self.waitFor(lambda: pool.counters["started"] >= 5, "four restarts")
        yield pool.stopService()
        delays = [d for name, d in clock.delays if name == "_spawn"]
        self.assertEqual(delays[:4], [0.05, 0.2, 0.4, 0.4])  # then stays at the last
        starts = [t for _, t in self.spawned]
        for before, after, delay in zip(starts, starts[1:], delays):
            self.assertGreaterEqual(after - before, delay)
        self.assertGreaterEqual(len(self.texts("up")), 4)
        self.assertEqual(pool.counters["ended"], pool.counters["started"])
        *failed, stopped = pool.reasons  # the last one ended by stopService's SIGTERM
        self.assertTrue(all(isinstance(r, ProcessTerminated) and r.exitCode == 3 for _, r in failed))
        self.assertEqual(stopped[1].signal, signal.SIGTERM)
        ended = [t for t in self.own(LogLevel.error) if t.startswith("worker 0 ended (exit code 3)")]
        self.assertGreaterEqual(len(ended), 4)

    @defer.inlineCallbacks
    def test_stable_worker_starts_delays_again(self):
        """A worker that ran STABLE_SECONDS is restarted after the first delay, not the next."""
        self.patch(workers, "STABLE_SECONDS", 0.3)
        self.patch(workers, "RESTART_DELAYS", (0.05, 20.0))
        clock = RecordingReactor()
        pool = self.pool(1, "live0.5", clock)
        pool.startService()
        yield self.waitFor(lambda: pool.counters["started"] >= 3, "two quick restarts")
        self.assertEqual([d for name, d in clock.delays if name == "_spawn"][:2], [0.05, 0.05])

    @defer.inlineCallbacks
    def test_each_worker_restarted_alone(self):
        pool = self.pool(3, lambda i: "exit1" if i == 1 else "sleep")
        pool.startService()
        yield self.waitFor(lambda: pool.counters["started"] >= 5, "worker 1 restarted")
        self.assertEqual({s.index for s, _ in self.spawned[3:]}, {1})
        self.assertEqual({i for i, _ in pool.reasons}, {1})
        self.assertEqual(set(pool.running_workers) | {1}, {0, 1, 2})

    @defer.inlineCallbacks
    def test_stop_waits_for_every_worker(self):
        """Workers take 0.3 s to end after SIGTERM (closing their stores): stopService's
        Deferred fires after the last one, and nothing restarts them."""
        pool = self.pool(3, "slow-term")
        pool.startService()
        yield self.waitFor(lambda: len(self.texts("up")) == 3, "three workers")
        started = time.monotonic()
        d = pool.stopService()
        self.assertFalse(d.called)
        yield d
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual(sorted(self.texts("bye")), ["bye 0", "bye 1", "bye 2"])
        self.assertEqual(pool.running_workers, {})
        self.assertEqual(sorted((i, type(r)) for i, r in pool.reasons),
                         [(0, ProcessDone), (1, ProcessDone), (2, ProcessDone)])
        yield self.sleep(0.3)
        self.assertEqual(pool.counters, {"started": 3, "ended": 3, "hung": 0})

    @defer.inlineCallbacks
    def test_worker_ignoring_sigterm_is_killed(self):
        self.patch(workers, "STOP_TIMEOUT", 0.5)
        pool = self.pool(2, lambda i: "ignore-term" if i else "slow-term")
        pool.startService()
        yield self.waitFor(lambda: len(self.texts("up")) == 2, "two workers")
        started = time.monotonic()
        yield pool.stopService()
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertLess(time.monotonic() - started, 5)
        reasons = dict(pool.reasons)
        self.assertIsInstance(reasons[0], ProcessDone)
        self.assertEqual(reasons[1].signal, signal.SIGKILL)
        self.assertEqual(self.texts("bye"), ["bye 0"])
        self.assertEqual(pool.counters, {"started": 2, "ended": 2, "hung": 0})

    @defer.inlineCallbacks
    def test_pending_restart_cancelled_by_stop(self):
        self.patch(workers, "RESTART_DELAYS", (0.5,))
        pool = self.pool(1, "exit3")
        pool.startService()
        yield self.waitFor(lambda: pool.counters["ended"] == 1, "the worker's end")
        self.assertIn(0, pool.restarts)
        d = pool.stopService()
        self.assertTrue(d.called)  # no worker runs: nothing to wait for
        yield d
        yield self.sleep(0.8)
        self.assertEqual(pool.counters, {"started": 1, "ended": 1, "hung": 0})
        # (trial's reactor check fails the test if a delayed call is left behind)


    @defer.inlineCallbacks
    def test_hung_worker_is_killed_and_restarted(self):
        """Heartbeats, then silence: a blocked reactor renews nothing, so it must go."""
        self.patch(workers, "HEARTBEAT_SECONDS", 0.1)
        self.patch(workers, "SILENCE_LIMIT", 0.6)
        pool = self.pool(1, lambda i: "beat0.5" if len(self.spawned) == 0 else "sleep")
        pool.startService()
        yield self.waitFor(lambda: pool.counters["started"] == 2, "the hung worker's restart")
        self.assertEqual(pool.counters["hung"], 1)
        self.assertEqual(pool.reasons[0][1].signal, signal.SIGKILL)
        self.assertTrue(any("silent for" in line for line in self.own(LogLevel.error)), self.own(LogLevel.error))
        self.assertFalse([e for e in self.published if e.get(workers.HEARTBEAT)], "heartbeats re-published")
        self.assertEqual(self.texts("up"), ["up 0"])  # the first worker logs it after its beats

    @defer.inlineCallbacks
    def test_beating_worker_is_left_alone(self):
        self.patch(workers, "HEARTBEAT_SECONDS", 0.1)
        self.patch(workers, "SILENCE_LIMIT", 0.6)
        pool = self.pool(1, "beat30")
        pool.startService()
        yield self.sleep(2.0)
        self.assertEqual(pool.counters, {"started": 1, "ended": 0, "hung": 0})


class SupervisorLinkTests(SynchronousTestCase):
    def test_heartbeat_while_the_reactor_turns(self):
        """At every log level (not through igdpcp's filter), until the service stops."""
        self.patch(workers.stdio, "StandardIO", lambda *args, **kwargs: None)
        clock, published = task.Clock(), []
        link = workers.SupervisorLink(clock, published.append)
        link.startService()
        clock.pump([workers.HEARTBEAT_SECONDS] * 3)
        self.assertEqual(len(published), 4)
        self.assertTrue(all(e[workers.HEARTBEAT] for e in published))
        link.stopService()
        clock.pump([workers.HEARTBEAT_SECONDS] * 3)
        self.assertEqual(len(published), 4)


class RealWorkerTests(TestCase):
    """make_supervisor's pool running real ``python -m twisted igdpcp --worker`` children."""

    timeout = 60

    def start_pool(self, level="info"):
        """make_supervisor's pool of 2 real workers; (pool, store path, published events)."""
        self.patch(workers, "RESTART_DELAYS", (0.05,))
        self.patch(workers, "STOP_TIMEOUT", 10.0)
        directory = tempfile.mkdtemp()
        store = os.path.join(directory, "mappings.sqlite")
        config_path = os.path.join(directory, "igdpcp.toml")
        with open(config_path, "w") as f:
            f.write(f'[store]\npath = "{store}"\n[process]\nworkers = 2\n[log]\nlevel = "{level}"\n'
                    '[pcp.servers.cgn]\naddress = "127.0.0.1"\nport = 9\n')
        published = []
        pool = service.make_supervisor(reactor, configuration.load(config_path), config_path,
                                       published.append)
        self.addCleanup(lambda: pool.stopService() if pool.running else None)
        pool.startService()
        return pool, store, published

    @defer.inlineCallbacks
    def heartbeats(self, pool, deadline):
        """Until every worker's reactor has been heard (the first beat comes as it starts)."""
        while not all(w.last_heard > pool.started_at[i] for i, w in pool.running_workers.items()):
            self.assertLess(time.monotonic(), deadline, "no heartbeat from a real worker")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_heartbeats_pass_at_every_log_level(self):
        pool, store, published = self.start_pool("critical")
        yield self.heartbeats(pool, time.monotonic() + 30)
        self.assertEqual(len(pool.running_workers), 2)
        self.assertFalse([e for e in published if e.get(workers.HEARTBEAT)], "heartbeats re-published")
        yield pool.stopService()

    @defer.inlineCallbacks
    def test_workers_start_restart_and_stop(self):
        pool, store, published = self.start_pool()

        def systems():
            return {e.get("log_system", "").split(" ")[1] for e in published
                    if e.get("log_system", "").startswith("worker ")}

        deadline = time.monotonic() + 30
        while systems() != {"0", "1"} or not all(os.path.exists(p) for p in (store, store + ".worker1")):
            self.assertLess(time.monotonic(), deadline, [formatEvent(e) for e in published])
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self.heartbeats(pool, deadline)

        # The supervisor's pipe closing ends a worker by itself; the pool starts another.
        pool.running_workers[1].transport.closeStdin()
        while pool.counters["started"] < 3:
            self.assertLess(time.monotonic(), deadline, [formatEvent(e) for e in published])
            yield task.deferLater(reactor, 0.05, lambda: None)
        gone = [e for e in published if formatEvent(e) == "the supervisor is gone; stopping"]
        self.assertEqual([e["log_system"] for e in gone], ["worker 1 igdpcp.workers#warn"])
        self.assertIs(gone[0]["log_level"], LogLevel.warn)

        yield pool.stopService()
        self.assertEqual(pool.running_workers, {})
        for path in (store, store + ".worker1"):  # closed: the next supervisor can open them
            SQLiteStore(path).close()


# ---------------------------------------------------------------- a worker whose supervisor is gone

WATCHED = r"""
import sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.logger import globalLogPublisher
from igdpcp.workers import SupervisorLink

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
SupervisorLink(reactor, globalLogPublisher).startService()
reactor.callWhenRunning(lambda: print("running", flush=True))
reactor.run()
print("reactor stopped", flush=True)
"""

SUPERVISOR = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE)
print("child", child.pid, flush=True)
time.sleep(60)
"""


def read_until(stream, text: bytes, timeout: float) -> tuple[bytes, bool]:
    """What ``stream`` gave until ``text`` showed (or timeout), and whether it reached EOF."""
    data = b""
    deadline = time.monotonic() + timeout
    while text not in data or not text:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            return data, False
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return data, True
        data += chunk
    return data, False


class ParentWatchTests(SynchronousTestCase):
    env = dict(os.environ, PYTHONPATH=REPO)

    def spawn(self, argv):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self.env)

        def cleanup():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            if proc.stdin:
                proc.stdin.close()
        self.addCleanup(cleanup)
        return proc

    def test_stdin_closing_stops_the_worker(self):
        proc = self.spawn([sys.executable, "-c", WATCHED])
        out, _ = read_until(proc.stdout, b"running", 20)
        self.assertIn(b"running", out)
        time.sleep(1.0)
        self.assertIsNone(proc.poll(), "ended while its stdin was open")
        proc.stdin.close()
        self.assertEqual(proc.wait(timeout=10), 0)
        out += proc.stdout.read()
        self.assertIn(b"the supervisor is gone; stopping", out)
        self.assertIn(b"reactor stopped", out)

    def test_supervisor_killed_stops_the_worker(self):
        """SIGKILL leaves the supervisor no say: the kernel closing its pipe is the signal."""
        supervisor = self.spawn([sys.executable, "-c", SUPERVISOR, WATCHED])
        out, _ = read_until(supervisor.stdout, b"running", 20)
        self.assertIn(b"running", out)
        child = int(out.split(b"child ")[1].split()[0])
        self.addCleanup(lambda: os.path.exists(f"/proc/{child}") and os.kill(child, signal.SIGKILL))
        time.sleep(0.5)
        self.assertTrue(os.path.exists(f"/proc/{child}"))
        supervisor.kill()
        supervisor.wait(timeout=10)
        # The worker holds the other end of our stdout pipe: EOF means it has ended.
        rest, eof = read_until(supervisor.stdout, b"", 10)
        self.assertTrue(eof, "the worker outlived its supervisor")
        self.assertIn(b"the supervisor is gone; stopping", out + rest)
