#!/usr/bin/env python3
"""A worker as igdpcp's [process] workers wires it: own PCP socket, store, IWF
(a bench child, not a benchmark itself).

    python3 bench/_worker.py --cgn HOST:PORT [--port P] [--bare] [--no-gc-freeze]

One bench ``Stack`` (PCPClient on a UDP socket of its own, SQLiteStore in a
file of its own, InterworkingFunction, UPnP HTTP face on 127.0.0.1:P; P = 0
for any) against a lab CGN that the other workers share, with igdpcp's GC
policy installed after the wiring, as the service does.  ``--bare`` serves
``BareSOAP`` on a stock twisted.web Site instead (no CGN): the N-process
reference.  Prints ``ready PORT``; reads commands on stdin: ``reset``
(collect, restart the GC watch; answers ``ok``), ``gc`` (answers ``gc
[figures]``, GCWatch.figures) and ``preload N`` (N mappings through the
IWF, _stack.preload; answers ``preloaded {figures}``); stops cleanly (Stack.close) when stdin closes,
or on SIGTERM/SIGINT.

:class:`Workers` is the bench's side: N such children.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import _common as c
from _stack import GCWatch, Stack, freeze_after_full_collections, preload

from twisted.internet import defer, error
from twisted.protocols.basic import LineReceiver
from twisted.web import resource, server

from igdpcp.upnp import soap
from igdpcp.upnp.http import SERVER, XML_TYPE


class BareSOAP(resource.Resource):
    """A fixed AddPortMapping answer with the headers igdpcp sends, nothing else."""

    isLeaf = True
    body = soap.build_response("urn:schemas-upnp-org:service:WANIPConnection:1", "AddPortMapping", [])

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"server", SERVER)
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
        request.setHeader(b"content-type", XML_TYPE)
        request.setHeader(b"ext", b"")
        return self.body


class Workers:
    """N worker children on ports of their own (``ports``); ``reset``/``summary``
    drive their GC watches, so a phase can treat them as one GCWatch."""

    def __init__(self, n: int, cgn: tuple[str, int] | None = None, *, bare: bool = False,
                 gc_freeze: bool = True):
        argv = [sys.executable, __file__, *(["--cgn", f"{cgn[0]}:{cgn[1]}"] if cgn else []),
                *(["--bare"] if bare else []), *([] if gc_freeze else ["--no-gc-freeze"])]
        env = dict(os.environ, PYTHONPATH=str(c.ROOT))
        self.procs = [subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True) for _ in range(n)]
        try:
            self.ports = [int(port) for port in self._ask(None, "ready")]
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _ask(self, command: str | None, answer: str) -> list[str]:
        """Send ``command`` to every worker, then read each one's answer line (the
        bench blocks meanwhile: only between measurements)."""
        if command:
            for p in self.procs:
                p.stdin.write(command + "\n")
                p.stdin.flush()
        lines = [p.stdout.readline() for p in self.procs]
        for line in lines:
            if not line.startswith(answer):
                raise RuntimeError(f"worker answered {line!r}, not {answer!r}")
        return [line[len(answer):].strip() for line in lines]

    def reset(self) -> None:
        self._ask("reset", "ok")

    def summary(self) -> str:
        return GCWatch.describe([json.loads(figures) for figures in self._ask("gc", "gc")])

    def preload(self, count: int) -> dict:
        """``count`` mappings in each worker (the first one's figures)."""
        return json.loads(self._ask(f"preload {count}", "preloaded")[0])

    def close(self) -> None:
        """Close their stdin (each closes its Stack and exits), then reap them."""
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                c.stop_child(p)
            p.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Control(LineReceiver):
    """The bench's channel on stdin/stdout: ready line, GC watch commands; EOF stops."""

    delimiter = b"\n"

    def __init__(self, reactor, port: int, stack: Stack | None):
        self.reactor, self.port, self.stack, self.watch = reactor, port, stack, GCWatch()

    def connectionMade(self):
        self.sendLine(f"ready {self.port}".encode())

    def lineReceived(self, line):
        if line == b"reset":
            gc.collect()
            self.watch.reset()
            self.sendLine(b"ok")
        elif line == b"gc":
            self.sendLine(b"gc " + json.dumps(self.watch.figures()).encode())
        elif line.startswith(b"preload ") and self.stack is not None:
            d = defer.ensureDeferred(preload(self.stack.iwf, int(line.split()[1])))
            d.addCallback(lambda figures: self.sendLine(b"preloaded " + json.dumps(figures).encode()))

    def connectionLost(self, reason):
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass  # already stopping (SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cgn", help="HOST:PORT of the shared lab CGN")
    ap.add_argument("--port", type=int, default=0, help="TCP port of the HTTP face (0: any)")
    ap.add_argument("--bare", action="store_true", help="serve BareSOAP on a stock Site instead")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false")
    args = ap.parse_args()
    from twisted.internet import reactor, stdio
    c.quiet_twisted_logging()
    stack = None
    if args.bare:
        port = reactor.listenTCP(args.port, server.Site(BareSOAP(), timeout=60),
                                 interface="127.0.0.1", backlog=511)
    else:
        host, _, cgn_port = args.cgn.rpartition(":")
        stack = Stack(reactor, cgn=(host, int(cgn_port)), http_port=args.port)
        port = stack.port
        reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stack.close()))
    if args.gc_freeze:
        freeze_after_full_collections()
    stdio.StandardIO(Control(reactor, port.getHost().port, stack))
    reactor.run()


if __name__ == "__main__":
    main()
