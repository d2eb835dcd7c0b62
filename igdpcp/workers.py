"""igdpcp on more than one core: a supervisor and ``[process] workers`` worker processes.

One Python process answers 2,500-3,000 AddPortMapping calls a second here and
then a core is full.  Tunnels are independent (each has its own listeners, its
own subscriber table and its own THIRD_PARTY_ID), so they shard cleanly: each
worker is a whole igdpcp (PCP client socket, IWF tables, store file, front
ends) for the tunnels whose name hashes to its index.  Nothing is shared at
run time, so nothing needs locks or messages between workers.

The supervisor (the ``twistd igdpcp`` process) holds no mappings.  Before it
starts the workers it creates the privacy key (UDNs must be the same in every
worker) and moves store rows to the file of the worker that owns their tunnel
now, so a changed worker count loses nothing.  It restarts a worker that dies,
with a growing delay, and re-publishes the workers' log events (JSON on their
stdout) in its own log.  A worker's reactor sends a heartbeat event every 5 s;
one silent for 30 s is hung (a blocked reactor renews nothing, so its
mappings would run out on the CGN) and is killed and restarted.  A worker
stops when its stdin closes: the supervisor is gone, even by SIGKILL, and an
unsupervised worker would hold its store lock against the next supervisor.
"""

from __future__ import annotations

import glob
import os
import sys
import time
import zlib
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import defer, error, protocol, stdio, task
from twisted.logger import LogLevel, eventFromJSON

from .config import MAX_WORKERS
from .iwf.store import SQLiteStore
from .logs import logger

log = logger(__name__)

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before the 1st, 2nd... restart in a row
STABLE_SECONDS = 60.0  # a worker that ran this long starts the delays again from the first
STOP_TIMEOUT = 15.0  # SIGTERM, then SIGKILL after this long
HEARTBEAT_SECONDS = 5.0  # a worker's reactor says it is turning this often...
SILENCE_LIMIT = 30.0  # ...and one silent this long is hung: killed and restarted
HEARTBEAT = "igdpcp_heartbeat"  # the log event key that marks a heartbeat


def shard_of(tunnel: str, count: int) -> int:
    """The worker that owns ``tunnel``: CRC-32, not hash(), which changes from run to run."""
    return zlib.crc32(tunnel.encode()) % count


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count``; the single-process igdpcp is Shard(0, 1)."""

    index: int = 0
    count: int = 1

    def owns(self, tunnel: str) -> bool:
        return self.count == 1 or shard_of(tunnel, self.count) == self.index

    def store_path(self, path: str) -> str:
        """Worker 0 keeps the configured file, so one worker is plain igdpcp."""
        return path if self.index == 0 else f"{path}.worker{self.index}"

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``I/N`` (the supervisor's ``--worker`` argument)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--worker: expected I/N, got {text!r}") from None
        if not 0 <= index < count <= MAX_WORKERS:
            raise ValueError(f"--worker: {text!r} is not a worker of 1 to {MAX_WORKERS}")
        return cls(index, count)


def _store_files(path: str) -> dict[int, str]:
    """Every worker's store file that exists, by worker index."""
    files = {0: path} if os.path.exists(path) else {}
    for name in glob.glob(glob.escape(path) + ".worker*"):
        suffix = name[len(path) + len(".worker"):]
        if suffix.isdigit() and suffix == str(int(suffix)):  # not ".worker01": not a name we give
            files[int(suffix)] = name
    return files


def reshard(path: str, count: int, synchronous: str = "normal") -> int:
    """Move each stored mapping to the file of the worker that owns its tunnel for
    ``count`` workers; returns how many moved.  Each move is put-then-delete, so a
    crash leaves a row in two files at worst, and the next reshard moves it again;
    files of workers beyond ``count`` are removed once empty."""
    files = _store_files(path)
    if set(files) <= {0} and count == 1:
        return 0
    stores: dict[int, SQLiteStore] = {}

    def store(index: int) -> SQLiteStore:
        if index not in stores:
            stores[index] = SQLiteStore(Shard(index, count).store_path(path), synchronous)
        return stores[index]

    moved = 0
    try:
        for index in sorted(files):
            leaving: dict[int, list] = {}
            for row in store(index).load_all():
                owner = shard_of(row["tunnel"], count)
                if owner != index:
                    leaving.setdefault(owner, []).append(row)
            for owner, rows in leaving.items():
                store(owner).put_many(rows)
                store(index).delete_many(rows)
                moved += len(rows)
    finally:
        for s in stores.values():
            s.close()
    for index, name in files.items():
        if index >= count:
            for extra in ("", "-wal", "-shm"):
                if os.path.exists(name + extra):
                    os.remove(name + extra)
    return moved


def _plugin_path() -> str:
    """The directory holding ``igdpcp/`` and ``twisted/plugins/``, for the workers' sys.path."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_argv(config_path: str, shard: Shard) -> list[str]:
    """``twist`` (Twisted's foreground runner) with JSON log events on stdout.  Its
    level filter lets everything through, as twistd does in one process: igdpcp's
    own events are filtered by ``log.level`` in the worker, and heartbeats must pass."""
    return [sys.executable, "-m", "twisted", "--log-format=json", "--log-file=-",
            "--log-level=debug", "igdpcp", "--config", config_path,
            "--worker", f"{shard.index}/{shard.count}"]


class _WorkerProtocol(protocol.ProcessProtocol):
    """Re-publishes one worker's log events and tells the pool when it ends."""

    def __init__(self, pool: "WorkerPool", index: int, publish):
        self.pool = pool
        self.index = index
        self.publish = publish
        self.partial = {1: b"", 2: b""}  # fd -> the start of a line not ended yet
        self.ended = defer.Deferred()
        self.last_heard = 0.0  # set by the pool at spawn: the first beat is due within the limit
        self.killed = False

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self.partial[fd] = (self.partial[fd] + data).split(b"\n")
        for line in lines:
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        text = line.strip(b"\x1e \r").decode("utf-8", "replace")
        if not text:
            return
        event = None
        if fd == 1:
            try:
                event = eventFromJSON(text)
            except ValueError:
                pass
        if not isinstance(event, dict):
            # stderr: what a worker says before its logging starts (a traceback, a config line)
            (log.error if fd == 2 else log.warn)("worker {index}: {line}", index=self.index, line=text)
            return
        if event.get(HEARTBEAT):
            self.last_heard = self.pool.reactor.seconds()
            return
        level = event.get("log_level")
        event["log_system"] = (f"worker {self.index} {event.get('log_namespace', '-')}"
                               f"#{getattr(level, 'name', '-')}")
        self.publish(event)

    def processEnded(self, reason) -> None:
        for fd, rest in self.partial.items():  # a last line without its newline
            self._line(fd, rest)
        self.pool.ended(self, reason.value)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts ``count`` workers, restarts any that ends, and stops them in parallel.

    Not twisted.runner.procmon.ProcessMonitor: its stopService does not wait for
    the processes to end (a worker still closing its store would lock out the next
    start), and it logs children's output as text lines without their levels."""

    name = "workers"

    def __init__(self, reactor, count: int, argv_for, publish, env: dict | None = None):
        self.reactor = reactor
        self.count = count
        self.argv_for = argv_for  # Shard -> argv
        self.publish = publish  # log event -> None (the global log publisher)
        self.env = dict(os.environ if env is None else env)
        path = _plugin_path()
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, self.env.get("PYTHONPATH")]))
        self.running_workers: dict[int, _WorkerProtocol] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.restarts: dict[int, object] = {}  # index -> IDelayedCall
        self.counters = {"started": 0, "ended": 0, "hung": 0}
        self.watchdog = task.LoopingCall(self._check_heartbeats)
        self.watchdog.clock = reactor

    def startService(self):
        super().startService()
        for index in range(self.count):
            self._spawn(index)
        self.watchdog.start(HEARTBEAT_SECONDS, now=False)

    def _check_heartbeats(self) -> None:
        now = self.reactor.seconds()
        for worker in self.running_workers.values():
            silent = now - worker.last_heard
            if silent > SILENCE_LIMIT and not worker.killed:
                worker.killed = True
                self.counters["hung"] += 1
                log.error("worker {index} silent for {silent:.0f} s (hung reactor: it renews "
                          "nothing); killing it", index=worker.index, silent=silent)
                _signal(worker, "KILL")  # ended() restarts it

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        worker = _WorkerProtocol(self, index, self.publish)
        argv = self.argv_for(Shard(index, self.count))
        self.reactor.spawnProcess(worker, argv[0], argv, env=self.env,
                                  childFDs={0: "w", 1: "r", 2: "r"})
        self.running_workers[index] = worker
        self.started_at[index] = worker.last_heard = self.reactor.seconds()
        self.counters["started"] += 1

    def ended(self, worker: _WorkerProtocol, reason) -> None:
        index = worker.index
        if self.running_workers.get(index) is not worker:
            return
        del self.running_workers[index]
        self.counters["ended"] += 1
        if not self.running:
            return
        lived = self.reactor.seconds() - self.started_at[index]
        failures = 0 if lived >= STABLE_SECONDS else self.failures.get(index, 0)
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        self.failures[index] = failures + 1
        code = getattr(reason, "exitCode", None)
        signal = getattr(reason, "signal", None)
        how = f"signal {signal}" if signal else f"exit code {code}"
        log.error("worker {index} ended ({how}) after {lived:.0f} s; restarting in {delay:.0f} s",
                  index=index, how=how, lived=lived, delay=delay)
        self.restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def stopService(self):
        super().stopService()
        if self.watchdog.running:
            self.watchdog.stop()
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        waits = []
        for worker in list(self.running_workers.values()):
            _signal(worker, "TERM")
            kill = self.reactor.callLater(STOP_TIMEOUT, _signal, worker, "KILL")
            waits.append(worker.ended.addBoth(lambda _, kill=kill: kill.active() and kill.cancel()))
        return defer.DeferredList(waits)


def _signal(worker: _WorkerProtocol, name: str) -> None:
    try:
        worker.transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


class _ParentWatch(protocol.Protocol):
    def __init__(self, reactor):
        self.reactor = reactor
        self.watching = True

    def connectionLost(self, reason=None):
        if self.watching:
            self.watching = False
            log.warn("the supervisor is gone; stopping")
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:
                pass


class SupervisorLink(Service):
    """In a worker: a heartbeat to the supervisor while the reactor turns, and the
    end of the worker when stdin (a pipe from the supervisor) closes."""

    name = "supervisor-link"

    def __init__(self, reactor, publish):
        self.reactor = reactor
        self.publish = publish  # the global log publisher: events reach stdout as JSON
        self.watch = self.io = None
        self.heartbeat = task.LoopingCall(self.beat)
        self.heartbeat.clock = reactor

    def beat(self) -> None:
        # Not through igdpcp's level filter: the supervisor needs it at every log.level.
        self.publish({HEARTBEAT: True, "log_namespace": __name__, "log_level": LogLevel.info,
                      "log_format": "heartbeat", "log_time": time.time()})

    def startService(self):
        super().startService()
        self.heartbeat.start(HEARTBEAT_SECONDS)
        # StandardIO also wants somewhere to write: not stdout, which carries the log.
        sink = os.open(os.devnull, os.O_WRONLY)
        self.watch = _ParentWatch(self.reactor)
        self.io = stdio.StandardIO(self.watch, stdin=0, stdout=sink, reactor=self.reactor)

    def stopService(self):
        super().stopService()
        if self.heartbeat.running:
            self.heartbeat.stop()
        self.watch.watching = False  # stopping anyway: the pipe closing now is no news
