"""A private FreeRADIUS for tests (notes/lab.md section 9).

Copies ``/etc/freeradius/3.0`` into a temporary directory, binds every listener
to 127.0.0.1 on ports free right now (auth, acct, inner-tunnel), sets a random
client secret, prepends ``users`` to the ``files`` module's authorize file and
runs ``freeradius -X -d DIR`` in the foreground, in the current network namespace or,
with ``start(netns=NAME)``, inside that one (``ip netns exec`` execs, so the PID is
still freeradius's).  :meth:`stop` kills only that PID and removes the directory
(also at exit, should a test runner skip it).  Skips unless root and freeradius is installed.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from unittest import SkipTest

from . import netlab

SOURCE = "/etc/freeradius/3.0"
READY = "Ready to process requests"


def skip_unless_freeradius() -> None:
    if os.geteuid() != 0:
        raise SkipTest("FreeRADIUS lab needs root")
    if shutil.which("freeradius") is None or not os.path.isdir(SOURCE):
        raise SkipTest("needs the freeradius package")


def _free_udp_ports(n: int) -> list[int]:
    """Ports nobody listens on now (bound together so they differ; ss double-checks)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    busy = subprocess.run(["ss", "-Hlun"], capture_output=True, text=True, check=False).stdout
    if any(re.search(rf":{p}\b", busy) for p in ports):
        return _free_udp_ports(n)
    return ports


def _strip_listen_blocks(text: str) -> str:
    """The config without its ``listen { ... }`` sections (comments ignored when counting braces)."""
    out, i = [], 0
    pattern = re.compile(r"^[ \t]*listen[ \t]*\{", re.M)
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j = 0, m.end() - 1
        while True:
            ch = text[j]
            if ch == "#":
                j = text.index("\n", j)
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1


class FreeRadius:
    """One FreeRADIUS instance on 127.0.0.1:``port`` answering the entries in ``users``."""

    def __init__(self, users: str):
        skip_unless_freeradius()
        self.users = users
        self.secret = secrets.token_hex(12)
        self.port, self.acct_port, self.inner_port = _free_udp_ports(3)
        self.dir = tempfile.mkdtemp(prefix="igdpcp-radius-")
        self.conf = os.path.join(self.dir, "raddb")
        self.log_path = os.path.join(self.dir, "freeradius.log")
        self.proc: subprocess.Popen | None = None

    def _configure(self) -> None:
        shutil.copytree(SOURCE, self.conf, symlinks=True)
        self._edit("radiusd.conf", lambda t: re.sub(
            r"^(\s*)(raddbdir|logdir|pidfile)\s*=.*$",
            lambda m: m.group(1) + m.group(2) + " = " + {
                "raddbdir": self.conf, "logdir": os.path.join(self.dir, "log"),
                "pidfile": os.path.join(self.dir, "radiusd.pid")}[m.group(2)],
            t, flags=re.M))
        os.makedirs(os.path.join(self.dir, "log"), exist_ok=True)
        listeners = (f"listen {{\n\ttype = auth\n\tipaddr = 127.0.0.1\n\tport = {self.port}\n}}\n"
                     f"listen {{\n\ttype = acct\n\tipaddr = 127.0.0.1\n\tport = {self.acct_port}\n}}\n")
        self._edit("sites-enabled/default", lambda t: re.sub(
            r"^server default \{\n", lambda m: m.group(0) + listeners, _strip_listen_blocks(t), count=1, flags=re.M))
        self._edit("sites-enabled/inner-tunnel", lambda t: re.sub(
            r"port = 18120", f"port = {self.inner_port}", t))
        self._edit("clients.conf", lambda t: re.sub(
            r"(client localhost \{.*?)secret = testing123", lambda m: m.group(1) + f"secret = {self.secret}",
            t, count=1, flags=re.S))
        self._edit("mods-config/files/authorize", lambda t: self.users + "\n" + t)
        subprocess.run(["chown", "-R", "freerad:freerad", self.dir], check=True)
        os.chmod(self.dir, 0o750)

    def _edit(self, rel: str, change) -> None:
        path = os.path.realpath(os.path.join(self.conf, rel))
        assert path.startswith(os.path.realpath(self.conf)), path
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = change(text)
        assert new != text, f"no change to {rel}"
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)

    def start(self, timeout: float = 10.0, netns: str | None = None) -> None:
        """Configure and start; returns once the server is ready.  ``netns``: run it inside
        that network namespace (its 127.0.0.1), e.g. the one igdpcp runs in."""
        atexit.register(self.stop)
        try:
            self._configure()
            prefix = ["ip", "netns", "exec", netns] if netns else []
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(prefix + ["freeradius", "-X", "-d", self.conf],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            end = time.monotonic() + timeout
            while READY not in self.log():
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"freeradius did not start:\n{self.log()[-3000:]}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return netlab.read_log(self.log_path)

    def requests_seen(self) -> int:
        """Access-Requests the server logged so far."""
        return self.log().count("Received Access-Request")

    def kill(self) -> None:
        """Stop the server (our PID only), keep the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self.kill()
        if not os.environ.get("IGDPCP_NETLAB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
