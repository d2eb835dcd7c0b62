"""Where one AddPortMapping's CPU goes, layer by layer, without sockets
(used by ``bench_iwf_soap.py --breakdown``; not a benchmark itself).

Each row is measured on its own in this process on the running reactor:
SOAP parsing alone; the UPnP control layer with an IWF that answers at once;
InterworkingFunction.add_mapping with PCP going to a LabCGN in this process
through an in-memory datagram transport (answers delivered on the next
reactor turn), with a MemoryStore and with a SQLiteStore; and LabCGN.handle
alone, to subtract.  Costs are CPU microseconds per call.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from ipaddress import IPv4Address, ip_network

import _common as c
from _loadgen import add_port_mapping

from twisted.internet import defer
from twisted.internet.address import IPv4Address as TwistedAddress

from igdpcp.iwf.core import InterworkingFunction
from igdpcp.iwf.exchange import CallBound
from igdpcp.iwf.model import MappingRequest, MappingView
from igdpcp.iwf.store import MemoryStore, SQLiteStore
from igdpcp.pcp.client import PCPClient, ServerAddress
from igdpcp.pcplab.cgn import LabCGN
from igdpcp.pcplab.config import CGNConfig
from igdpcp.subscriber import Caller, Subscriber
from igdpcp.upnp import soap
from igdpcp.upnp.control import Control

from _stack import POLICY

SOAP_ACTION = b'"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
CLIENT_IP = "127.0.0.1"


def _body(port: int) -> bytes:
    return add_port_mapping("127.0.0.1", 5000, "10.0.0.2", port, "TCP").split(b"\r\n\r\n", 1)[1]


class _Transport:
    """A connected datagram socket whose peer is a LabCGN in this process."""

    def __init__(self, reactor, protocol, cgn: LabCGN):
        self.reactor, self.protocol, self.cgn = reactor, protocol, cgn
        self.batch: list[bytes] = []

    def connect(self, host, port):
        self.peer = (host, port)

    def getHost(self):
        return TwistedAddress("UDP", CLIENT_IP, 40000)

    def write(self, data, addr=None):
        answer = self.cgn.handle(data, CLIENT_IP, 40000, self.reactor.seconds())
        if answer is not None:
            if not self.batch:
                self.reactor.callLater(0, self._deliver)
            self.batch.append(answer)

    def _deliver(self):
        batch, self.batch = self.batch, []
        for answer in batch:
            self.protocol.datagramReceived(answer, self.peer)

    def stopListening(self):
        return None


class _InMemoryUDP:
    """Just enough of a reactor for PCPClient: the real clock, in-memory UDP."""

    def __init__(self, reactor, cgn):
        self.reactor, self.cgn = reactor, cgn

    def seconds(self):
        return self.reactor.seconds()

    def callLater(self, *args, **kw):
        return self.reactor.callLater(*args, **kw)

    def listenUDP(self, port, protocol, interface=""):
        transport = _Transport(self.reactor, protocol, self.cgn)
        protocol.transport = transport
        return transport


class _InstantIWF:
    """add_mapping answers at once: what Control costs without the IWF."""

    view = MappingView(None, 1, "TCP", 1, IPv4Address("10.0.0.2"), True, "", None, 0, None)

    def add_mapping(self, caller, request, any_port=False):
        return defer.succeed(self.view)


def _cpu_per_call(fn, n: int) -> float:
    t = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - t) / n * 1e6


async def _cpu_per_add(reactor, iwf, n: int, window: int = 64) -> float:
    callers = [Caller(Subscriber(f"b-{i}", i.to_bytes(4, "big"), "cgn"), IPv4Address("10.0.0.2"))
               for i in range(200)]
    state = {"next": 0, "open": 0, "failed": 0}
    done = defer.Deferred()

    def launch():
        j = state["next"]
        if j >= n:
            if not state["open"] and not done.called:
                done.callback(None)
            return
        state["next"] += 1
        state["open"] += 1
        port = 1024 + (j // 200) % 64000
        d = iwf.add_mapping(callers[j % 200], MappingRequest(port, "TCP", port, None))
        d.addErrback(lambda f: state.update(failed=state["failed"] + 1))
        d.addBoth(lambda _: (state.update(open=state["open"] - 1), launch()))

    t = time.process_time()
    for _ in range(window):
        launch()
    await done
    if state["failed"]:
        raise RuntimeError(f"{state['failed']} add_mapping calls failed")
    return (time.process_time() - t) / n * 1e6


def _cgn() -> LabCGN:
    return LabCGN(CGNConfig(pool=(ip_network("5.5.0.0/22"),)), now=0.0)


async def breakdown(reactor, n: int = 20_000) -> list[tuple[str, float]]:
    bodies = [_body(1024 + i % 60000) for i in range(n)]
    caller = Caller(Subscriber("b", b"\x00\x00\x00\x01", "cgn"), IPv4Address("10.0.0.2"))
    rows = [("soap.parse_request (lxml) of the AddPortMapping body",
             _cpu_per_call(lambda i: soap.parse_request(bodies[i], SOAP_ACTION), n))]
    control = Control(_InstantIWF(), 1, reactor)
    rows.append(("Control.handle: parse + SCPD args + build_response (IWF answers at once)",
                 _cpu_per_call(lambda i: control.handle(caller, "WANIPConnection", SOAP_ACTION, bodies[i]), n)))

    # LabCGN.handle alone, on the requests the IWF sends (captured from a first pass).
    captured = []
    for store_kind in ("memory", "sqlite"):
        cgn = _cgn()
        client = PCPClient(_InMemoryUDP(reactor, cgn), {"cgn": ServerAddress("127.0.0.2")})
        client.start()
        if store_kind == "memory":
            store, tmp = MemoryStore(), None
            original = client._servers["cgn"].protocol.transport.write

            def tap(data, addr=None, original=original):
                captured.append(data)
                original(data, addr)
            client._servers["cgn"].protocol.transport.write = tap
        else:
            tmp = tempfile.mkdtemp(prefix="bench-breakdown-")
            store = SQLiteStore(os.path.join(tmp, "m.sqlite"))
        iwf = InterworkingFunction(reactor, client, store, POLICY, bound=CallBound())
        c.settle()
        cost = await _cpu_per_add(reactor, iwf, n)
        label = "MemoryStore" if store_kind == "memory" else "SQLiteStore (WAL, synchronous=normal)"
        rows.append((f"IWF.add_mapping + PCPClient + in-process LabCGN, {label}", cost))
        iwf.stop()
        await client.stop()
        store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    fresh = _cgn()
    rows.append(("  of which LabCGN.handle (the lab CGN's share, in another process in the real run)",
                 _cpu_per_call(lambda i: fresh.handle(captured[i], CLIENT_IP, 40000, 1.0), min(n, len(captured)))))
    return rows
