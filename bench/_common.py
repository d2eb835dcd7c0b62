"""Helpers shared by the bench_*.py scripts (not a benchmark itself).

Process figures come from /proc (no psutil), the lab CGN is the real
``twistd -n pcplab`` in a child process, and tables are plain text.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ /proc

def rss_bytes(pid="self") -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid="self") -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def udp_drops(host: str | None = None, port: int | None = None) -> int:
    """Datagrams the kernel dropped at UDP sockets (receive buffer full), from
    /proc/net/udp; only the socket bound to host:port when given."""
    total = 0
    want = None
    if host is not None:
        want = "%08X:%04X" % (int.from_bytes(socket.inet_aton(host), "little"), port)
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if want is None or cols[1] == want:
                total += int(cols[-1])
    return total


def udp_rcvbuf_errors() -> int:
    """System-wide UDP RcvbufErrors (loopback only here, so all are ours)."""
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    head, values = lines[0], lines[1]
    return int(values[head.index("RcvbufErrors")])


def settle() -> None:
    gc.collect()
    gc.collect()


# ------------------------------------------------------------------ figures

def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def latency_summary(latencies) -> dict:
    values = sorted(latencies)
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "p999": percentile(values, 99.9), "max": values[-1] if values else float("nan")}


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.2f}"


def table(title: str, headers, rows, note: str | None = None) -> None:
    """Print a left-aligned text table."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n== {title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if note:
        print(note)
    sys.stdout.flush()


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "MISSES"


def free_port(host: str = "127.0.0.1", kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the lab CGN

class LabCGNProcess:
    """``twistd -n pcplab`` in a child process with a [cgn] table written for it."""

    def __init__(self, listen: str = "127.0.0.2", port: int | None = None, *,
                 pool: str = "5.5.0.0/22", min_lifetime: int = 120, max_lifetime: int = 3600,
                 quota: int = 0, admin: bool = True, profile: str | None = None):
        self.profile = profile  # a file for twistd's cProfile stats (--profile)
        self.listen = listen
        self.port = port or free_port(listen)
        self.admin_port = free_port(listen, socket.SOCK_STREAM) if admin else None
        self.dir = tempfile.mkdtemp(prefix="bench-pcplab-")
        admin_line = f'admin = "{listen}:{self.admin_port}"' if admin else 'admin = "off"'
        self.config = os.path.join(self.dir, "pcplab.toml")
        with open(self.config, "w") as f:
            f.write(f'[cgn]\nlisten = "{listen}"\nport = {self.port}\n{admin_line}\n'
                    f'pool = ["{pool}"]\nmin_lifetime = {min_lifetime}\n'
                    f'max_lifetime = {max_lifetime}\nquota = {quota}\n')
        self.log = os.path.join(self.dir, "pcplab.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LabCGNProcess":
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        profiling = ["--profile", self.profile, "--profiler=cprofile", "--savestats"] if self.profile else []
        self.proc = subprocess.Popen(
            ["twistd", "-n", "--pidfile=", f"--logfile={self.log}", *profiling,
             "pcplab", "--config", self.config],
            cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Ready once it answers an ANNOUNCE (any answer will do)."""
        from igdpcp.pcp.codec import Request, encode_request
        from igdpcp.pcp.constants import Opcode
        from ipaddress import ip_address
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((self.listen, self.port))
            s.settimeout(0.2)
            probe = encode_request(Request(Opcode.ANNOUNCE, 0, ip_address(s.getsockname()[0])))
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pcplab exited early; see {self.log}")
                try:
                    s.send(probe)
                    s.recv(2048)
                    return
                except (socket.timeout, ConnectionRefusedError):
                    continue
        raise RuntimeError(f"pcplab did not answer within {timeout} s; see {self.log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        import json
        import urllib.request
        if self.admin_port is None:
            return {}
        with urllib.request.urlopen(f"http://{self.listen}:{self.admin_port}/stats", timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def spawn_helper(*args: str) -> subprocess.Popen:
    """``python3 bench/_servers.py ARGS`` as a child; its first stdout line is 'ready ...'."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "_servers.py"), *args],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"helper {args} did not start: {line!r}")
    return proc


def stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def profiled(awaitable):
    """(result, cProfile.Profile) of awaiting ``awaitable`` with the profiler on."""
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = await awaitable
    finally:
        profiler.disable()
    return result, profiler


def profile_report(profiler, limit: int = 25, title: str = "profile") -> None:
    """Top functions by own time, then by cumulative time."""
    import io
    import pstats
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(key).print_stats(limit)
        text = out.getvalue()
        start = text.find("   ncalls")
        print(f"\n== {title}: top {limit} by {key}")
        print(text[start:].rstrip())
    sys.stdout.flush()


def react(main) -> None:
    """``task.react(main)``, returning on success instead of exiting, so the caller can report."""
    from twisted.internet import task
    try:
        task.react(main)
    except SystemExit as e:
        if e.code:
            raise


def quiet_twisted_logging() -> None:
    """Begin Twisted logging as twistd would, keeping warnings and errors only
    (to stderr).  Without it the global log beginner buffers up to 65,536
    events, and with them every Site and protocol they name."""
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
                                     redirectStandardIO=False)


class MachineLoad:
    """Busy CPU time of the whole machine (all processes, from /proc/stat), to
    tell how much of it was someone else's during a measurement."""

    def __init__(self):
        self.start = self._busy()

    @staticmethod
    def _busy() -> tuple[float, float]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return (sum(values) - idle) / _CLK_TCK, time.monotonic()

    def cores(self) -> float:
        """Average number of busy cores since construction."""
        busy1, t1 = self._busy()
        busy0, t0 = self.start
        return (busy1 - busy0) / max(1e-9, t1 - t0)


def cpu_wait_seconds(pid="self") -> float:
    """Time runnable but waiting for a CPU (/proc/PID/schedstat): what a busy
    machine adds to every request's latency, however fast the code."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class CPUSampler:
    """Samples CPU time (and time spent waiting for a CPU) of this process, of
    other pids and of the whole machine every ``interval`` s on the reactor, so
    shares can be taken over a window known only afterwards (e.g. a load
    generator's measuring window, in time.time() seconds)."""

    def __init__(self, reactor, pids=(), interval: float = 0.2):
        from twisted.internet.task import LoopingCall
        self.pids = list(pids)
        self.samples: list[tuple] = []
        self.loop = LoopingCall(self.sample)
        self.loop.clock = reactor
        self.loop.start(interval)

    def sample(self):
        others, waits = [], []
        for pid in self.pids:
            try:
                others.append(cpu_seconds(pid))
                waits.append(cpu_wait_seconds(pid))
            except OSError:
                others.append(float("nan"))
                waits.append(float("nan"))
        self.samples.append((time.time(), cpu_seconds(), MachineLoad._busy()[0], *others,
                             cpu_wait_seconds(), *waits))

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        self.sample()

    def _over(self, t0: float, t1: float) -> list[float]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples[-2:]
        a, b = inside[0], inside[-1]
        wall = max(1e-9, b[0] - a[0])
        return [(b[i] - a[i]) / wall for i in range(1, len(a))]

    def shares(self, t0: float, t1: float) -> list[float]:
        """[this process, machine (cores), each pid] CPU share over [t0, t1] (nearest samples inside)."""
        return self._over(t0, t1)[:2 + len(self.pids)]

    def waits(self, t0: float, t1: float) -> list[float]:
        """[this process, each pid]: seconds a second spent waiting for a CPU over [t0, t1]."""
        return self._over(t0, t1)[2 + len(self.pids):]
