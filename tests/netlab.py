"""A small network lab for end-to-end tests: namespaces, veth pairs, daemons.

Needs root and a working ``ip netns`` (iproute2); tests call
:func:`skip_unless_netns` first.  Everything a :class:`Lab` creates carries a
unique name (prefix, role, our PID and a per-process counter), so parallel runs
and other users of the machine are never touched; :meth:`Lab.teardown` kills
only the processes this lab started (by their recorded PID) and deletes only
the namespaces and links it created.

Typical use (in ``setUpClass``, with ``tearDownClass`` calling ``teardown``)::

    lab = Lab("ipt")
    try:
        cgn = lab.netns("cgn")                       # "ipt-cgn-<pid>"
        lab.veth((None, lab.root_ifname("a"), "10.203.0.2/24"),
                 (cgn, "int0", "10.203.0.1/24"))
        proc = lab.spawn(cgn, ["miniupnpd", "-d", "-f", conf], name="miniupnpd")
        lab.wait_listening(cgn, 5351, "udp", proc=proc)
    except BaseException:
        lab.teardown()
        raise

Interface names inside a lab namespace (``int0``) need not be unique; names in
the root namespace must come from :meth:`Lab.root_ifname`.  Set
``IGDPCP_NETLAB_KEEP=1`` to keep the work directory (daemon logs) afterwards.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from unittest import SkipTest

IFNAMSIZ = 15  # usable characters of a Linux interface name
_counter = itertools.count()
_live: set[str] = set()  # namespaces created by live Labs of this process


def _cmd(argv: list[str], *, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``, ``ip netns`` fails), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"netlab-probe-{os.getpid()}"
    try:
        made = _cmd(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        up = _cmd(["ip", "-n", probe, "link", "set", "lo", "up"], check=False)
        if up.returncode != 0:
            return f"ip -n NS link failed: {up.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"ip netns unusable: {e}"
    finally:
        _cmd(["ip", "netns", "del", probe], check=False)
    return None


def skip_unless_netns(*programs: str) -> None:
    """Raise :class:`unittest.SkipTest` unless root, ``ip netns`` works and every
    named program is on PATH."""
    reason = unavailable_reason()
    if reason is None:
        missing = [p for p in programs if shutil.which(p) is None]
        if missing:
            reason = f"needs {', '.join(missing)}"
    if reason is not None:
        raise SkipTest(reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(prefix: str) -> list[str]:
    """Delete namespaces ``<prefix>-<role>-<pid>[x<n>]`` left by dead earlier runs
    (their root-side veth ends go with them).  Processes still inside such a
    namespace are not killed: they were not started by this process.  Returns
    the names deleted."""
    listing = _cmd(["ip", "netns", "list"], check=False).stdout
    pattern = re.compile(rf"^{re.escape(prefix)}-[A-Za-z0-9_]+-(\d+)(?:x\d+)?$")
    gone = []
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pattern.match(name)
        if not m or name in _live:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            _cmd(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


def read_log(path: str) -> str:
    """A process's log file so far ("" before it exists)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


@dataclass
class Process:
    """A background process started by :meth:`Lab.spawn`; stdout and stderr go to ``log_path``."""

    name: str
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        return read_log(self.log_path)


class Lab:
    """Namespaces, veth pairs and processes with unique names, torn down together.

    ``workdir`` (default: a fresh temporary directory, removed by teardown
    unless ``IGDPCP_NETLAB_KEEP`` is set) holds the process logs.
    """

    def __init__(self, prefix: str, workdir: str | None = None):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError("prefix: 1-6 lowercase letters/digits, starting with a letter")
        self.prefix = prefix
        n = next(_counter)
        self.tag = str(os.getpid()) + (f"x{n}" if n else "")
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"netlab-{prefix}-")
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self.processes: list[Process] = []
        self._torn_down = False
        reap_stale(prefix)
        atexit.register(self.teardown)

    # -- names
    def root_ifname(self, suffix: str) -> str:
        """A unique interface name for the root namespace: ``<prefix><pid>[x<n>]<suffix>``."""
        name = f"{self.prefix}{self.tag}{suffix}"
        if len(name) > IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
        return name

    # -- building
    def netns(self, role: str) -> str:
        """Create namespace ``<prefix>-<role>-<pid>[x<n>]`` with ``lo`` up; returns its name."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", role):
            raise ValueError(f"bad role {role!r}")
        name = f"{self.prefix}-{role}-{self.tag}"
        _cmd(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _live.add(name)
        self.ip("link", "set", "lo", "up", ns=name)
        return name

    def veth(self, a: tuple[str | None, str, str | None], b: tuple[str | None, str, str | None]) -> None:
        """A veth pair between two ends ``(namespace or None for root, ifname, "addr/len" or None)``;
        both ends are addressed and brought up."""
        (ns_a, if_a, _), (ns_b, if_b, _) = a, b
        for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
            if ns is None and not ifname.startswith(f"{self.prefix}{self.tag}"):
                raise ValueError(f"root-namespace link {ifname!r} must come from root_ifname()")
        argv = ["link", "add", if_a] + (["netns", ns_a] if ns_a else [])
        argv += ["type", "veth", "peer", "name", if_b] + (["netns", ns_b] if ns_b else [])
        self.ip(*argv)
        self.root_links += [ifname for ns, ifname in ((ns_a, if_a), (ns_b, if_b)) if ns is None]
        for ns, ifname, cidr in (a, b):
            if cidr:
                self.ip("addr", "add", cidr, "dev", ifname, ns=ns)
            self.ip("link", "set", ifname, "up", ns=ns)

    def ip(self, *args: str, ns: str | None = None) -> str:
        """Run ``ip [-n ns] ARGS``; returns stdout, raises RuntimeError with stderr on failure."""
        return _cmd(["ip"] + (["-n", ns] if ns else []) + list(args)).stdout

    def run(self, ns: str | None, argv: list[str], *, check: bool = True,
            timeout: float = 10.0) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside ``ns`` (None: root namespace); text output captured."""
        prefix = ["ip", "netns", "exec", ns] if ns else []
        return _cmd(prefix + list(argv), check=check, timeout=timeout)

    def sysctl(self, ns: str | None, key: str, value: str | int) -> None:
        self.run(ns, ["sysctl", "-qw", f"{key}={value}"])

    # -- processes
    def spawn(self, ns: str | None, argv: list[str], *, name: str, cwd: str | None = None) -> Process:
        """Start ``argv`` in the background inside ``ns`` and record its PID (``ip netns exec``
        execs, so the PID is the program's).  Output goes to ``<workdir>/<name>.log``."""
        log_path = os.path.join(self.workdir, f"{name}.log")
        prefix = ["ip", "netns", "exec", ns] if ns else []
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(prefix + list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=cwd or self.workdir)
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def listening(self, ns: str | None, port: int, proto: str = "udp") -> bool:
        """Whether something in ``ns`` listens on ``port`` (``proto`` "udp" or "tcp")."""
        flag = {"udp": "-u", "tcp": "-t"}[proto]
        out = self.run(ns, ["ss", "-Hln", flag, f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    def wait_listening(self, ns: str | None, port: int, proto: str = "udp", *,
                       timeout: float = 5.0, proc: Process | None = None) -> None:
        """Poll until ``port`` listens in ``ns``.  Raises RuntimeError (with ``proc``'s log)
        if ``proc`` exits first or ``timeout`` seconds pass."""
        end = time.monotonic() + timeout
        while True:
            if self.listening(ns, port, proto):
                return
            if proc is not None and not proc.running():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before "
                                   f"{proto}/{port} listened:\n{proc.log()}")
            if time.monotonic() > end:
                log = f":\n{proc.log()}" if proc is not None else ""
                raise RuntimeError(f"{proto}/{port} not listening in {ns} after {timeout} s{log}")
            time.sleep(0.05)

    # -- teardown
    def teardown(self) -> None:
        """Stop recorded processes (SIGTERM, then SIGKILL after 3 s), delete this lab's
        namespaces and root-namespace links, remove the work directory.  Idempotent;
        never raises for things already gone."""
        if self._torn_down:
            return
        self._torn_down = True
        for proc in self.processes:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.popen.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=3)
        for name in reversed(self.namespaces):
            _cmd(["ip", "netns", "del", name], check=False)
            _live.discard(name)
        for link in self.root_links:
            if _cmd(["ip", "link", "show", "dev", link], check=False).returncode == 0:
                _cmd(["ip", "link", "del", "dev", link], check=False)
        if self._own_workdir and not os.environ.get("IGDPCP_NETLAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.teardown)
