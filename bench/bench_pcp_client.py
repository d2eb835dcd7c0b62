#!/usr/bin/env python3
"""PCPClient against the lab CGN on loopback, compared with a bare Twisted UDP echo.

    python3 bench/bench_pcp_client.py [--quick] [--profile]

Processes: this one runs PCPClient (or the echo client) on the global
reactor; the lab CGN is ``twistd -n pcplab`` in a child process on
127.0.0.2 (restarted for each concurrency level, so each starts empty); the
echo server is a child process on 127.0.0.3 (bench/_servers.py).

Closed loop with 1, 100 and 1,000 requests in flight: every answer starts the
next request.  Every MAP creates a new mapping (fresh nonce, a new internal
tuple, THIRD_PARTY + THIRD_PARTY_ID, 4,096 subscribers), with the RFC 6887
retransmission policy (IRT 3 s, no deadline).  Echo: a datagram of the same
size (88 octets), same concurrency.

Memory (each in a fresh child process): per outstanding request with 10,000
outstanding to a silent server, and per lab CGN mapping at 100,000 mappings
in an in-process LabCGN, by RSS delta and by tracemalloc.

Targets: PCP/echo >= 0.5 at 1 in flight; at 1,000 in flight no drops and no
retransmission storm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address

import _common as c

from twisted.internet import defer

from igdpcp.pcp.client import MapSpec, PCPClient, ServerAddress, new_nonce
from igdpcp.pcp.schedule import RFC6887_DEFAULT

SUBSCRIBERS = 4096
LEVELS = (1, 100, 1000)
PACKET_SIZE = 88  # MAP + THIRD_PARTY + 3-octet THIRD_PARTY_ID, request and response alike


def spec_for(i: int, **kw) -> MapSpec:
    """Request i: a new internal tuple of one of SUBSCRIBERS subscribers."""
    sub, n = i % SUBSCRIBERS, i // SUBSCRIBERS
    return MapSpec(new_nonce(), 6, IPv4Address(0x0A000000 + n % 0xFFFFFF), 8080, 3600,
                   third_party_id=sub.to_bytes(3, "big"), **kw)


# ------------------------------------------------------------------ closed loops

class ClosedLoop:
    """Keeps ``inflight`` requests outstanding for warmup + duration seconds."""

    def __init__(self, reactor, inflight: int, duration: float, warmup: float):
        self.reactor = reactor
        self.inflight = inflight
        self.duration = duration
        self.warmup = warmup
        self.latencies: list[float] = []
        self.errors = 0
        self.outstanding = 0
        self.cpu0 = self.cpu1 = None
        self.done = defer.Deferred()

    def run(self, burst: bool = False):
        """Start the slots all in one go (``burst``), or evenly over the first
        half of the warm-up so the steady state is measured, not the start."""
        now = time.perf_counter()
        self.measure_from = now + self.warmup
        self.measure_to = self.measure_from + self.duration
        self.reactor.callLater(self.warmup, self._mark)
        # Requests lost on the way are retransmitted after ~3 s (or never, for
        # the echo): stop waiting for stragglers one second after the window.
        self.reactor.callLater(self.warmup + self.duration + 1.0, self._give_up)
        ramp = 0.0 if burst or self.inflight == 1 else self.warmup / 2
        self.outstanding = self.inflight
        if not ramp:
            for slot in range(self.inflight):
                self.launch(slot)
        else:
            step = max(1, self.inflight // 100)
            for first in range(0, self.inflight, step):
                self.reactor.callLater(ramp * first / self.inflight, self._launch_many,
                                       range(first, min(self.inflight, first + step)))
        return self.done

    def _launch_many(self, slots):
        for slot in slots:
            self.launch(slot)

    def _mark(self):
        self.cpu0 = (c.cpu_seconds(), time.perf_counter())

    def _give_up(self):
        if not self.done.called:
            if self.cpu1 is None:
                self.cpu1 = (c.cpu_seconds(), time.perf_counter())
            self.done.callback(self)

    def finished(self, slot: int, started: float, ok: bool) -> None:
        now = time.perf_counter()
        if self.measure_from <= now < self.measure_to:
            self.latencies.append(now - started)
            if not ok:
                self.errors += 1
        if now < self.measure_to:
            self.launch(slot)
            return
        if self.cpu1 is None:
            self.cpu1 = (c.cpu_seconds(), now)
        self.outstanding -= 1
        if self.outstanding <= 0 and not self.done.called:
            self.done.callback(self)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration

    @property
    def cpu_share(self) -> float:
        (c0, t0), (c1, t1) = self.cpu0, self.cpu1
        return (c1 - c0) / (t1 - t0)


_requests = itertools.count(1)  # across runs, so a shared lab CGN never sees a key twice


class PCPLoop(ClosedLoop):
    def __init__(self, reactor, client, inflight, duration, warmup):
        super().__init__(reactor, inflight, duration, warmup)
        self.client = client

    def launch(self, slot: int) -> None:
        t0 = time.perf_counter()
        d = self.client.map("cgn", spec_for(next(_requests)))
        d.addCallbacks(lambda r: self.finished(slot, t0, r.ok),
                       lambda f: self.finished(slot, t0, False))


def echo_loop_class():
    from twisted.internet.protocol import DatagramProtocol

    class EchoLoop(ClosedLoop, DatagramProtocol):
        """Each datagram carries its slot number; the echo starts the slot's next send."""

        def __init__(self, reactor, address, inflight, duration, warmup):
            ClosedLoop.__init__(self, reactor, inflight, duration, warmup)
            self.address = address
            self.sent_at = [0.0] * inflight
            self.padding = bytes(PACKET_SIZE - 4)
            self.sent = self.received = 0

        def startProtocol(self):
            self.transport.connect(*self.address)

        def launch(self, slot: int) -> None:
            self.sent += 1
            self.sent_at[slot] = time.perf_counter()
            self.transport.write(slot.to_bytes(4, "big") + self.padding)

        def datagramReceived(self, data, addr):
            self.received += 1
            slot = int.from_bytes(data[:4], "big")
            self.finished(slot, self.sent_at[slot], True)

    return EchoLoop


# ------------------------------------------------------------------ throughput run

async def pcp_run(reactor, cgn, level: int, burst: bool, duration: float, warmup: float,
                  profiler=None, rcvbuf: int | None = None) -> dict:
    client = PCPClient(reactor, {"cgn": ServerAddress("127.0.0.2", cgn.port)},
                       bind="127.0.0.1", policy=RFC6887_DEFAULT)
    client.start()
    kind = "PCP burst" if burst else "PCP"
    if rcvbuf:  # what-if: the client socket with a bigger receive buffer (igdpcp sets none)
        client._servers["cgn"].port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        kind = f"PCP rcvbuf {rcvbuf >> 20} MiB"
    drops0, srv_drops0 = c.udp_rcvbuf_errors(), c.udp_drops("127.0.0.2", cgn.port)
    srv_cpu0 = c.cpu_seconds(cgn.pid)
    if profiler is not None:
        profiler.enable()
    loop = PCPLoop(reactor, client, level, duration, warmup)
    t0 = time.perf_counter()
    await loop.run(burst)
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - t0
    stats = dict(client.stats)
    result = dict(kind=kind, level=level, rate=loop.rate,
                  lat=c.latency_summary(loop.latencies), errors=loop.errors,
                  drops=c.udp_rcvbuf_errors() - drops0,
                  srv_drops=c.udp_drops("127.0.0.2", cgn.port) - srv_drops0,
                  retrans=stats.get("retransmitted", 0), sent=stats.get("sent", 0),
                  cpu=loop.cpu_share, srv_cpu=(c.cpu_seconds(cgn.pid) - srv_cpu0) / wall)
    await client.stop()
    return result


async def echo_run(reactor, echo_pid: int, echo_port: int, level: int, duration: float,
                   warmup: float) -> dict:
    loop = echo_loop_class()(reactor, ("127.0.0.3", echo_port), level, duration, warmup)
    port = reactor.listenUDP(0, loop, interface="127.0.0.1")
    drops0, srv_drops0 = c.udp_rcvbuf_errors(), c.udp_drops("127.0.0.3", echo_port)
    srv_cpu0 = c.cpu_seconds(echo_pid)
    t0 = time.perf_counter()
    await loop.run()
    wall = time.perf_counter() - t0
    await defer.maybeDeferred(port.stopListening)
    return dict(kind="echo", level=level, rate=loop.rate, lat=c.latency_summary(loop.latencies),
                errors=0, drops=c.udp_rcvbuf_errors() - drops0,
                srv_drops=c.udp_drops("127.0.0.3", echo_port) - srv_drops0,
                lost=loop.sent - loop.received, retrans=0, sent=loop.sent, cpu=loop.cpu_share,
                srv_cpu=(c.cpu_seconds(echo_pid) - srv_cpu0) / wall)


async def throughput(reactor, args, results: list) -> None:
    """PCP and echo at each level; in the full run a fresh lab CGN for each PCP run."""
    duration, warmup = (1.0, 0.3) if args.quick else (8.0, 1.0)
    echo_port = c.free_port("127.0.0.3")
    echo = c.spawn_helper("echo-udp", "127.0.0.3", str(echo_port))
    shared = c.LabCGNProcess("127.0.0.2", pool="5.5.0.0/22").start() if args.quick else None
    profiler = None
    if args.profile is not None:
        import cProfile
        profiler = cProfile.Profile()
    try:
        runs = [(n, False, None) for n in LEVELS] + [(LEVELS[-1], True, None), (LEVELS[-1], False, 4 << 20)]
        for level, burst, rcvbuf in runs:
            cgn = shared or c.LabCGNProcess("127.0.0.2", pool="5.5.0.0/22").start()
            try:
                plain = not burst and not rcvbuf
                results.append(await pcp_run(reactor, cgn, level, burst, duration, warmup,
                                             profiler if level == args.profile and plain else None,
                                             rcvbuf))
            finally:
                if cgn is not shared:
                    cgn.stop()
            if plain:
                results.append(await echo_run(reactor, echo.pid, echo_port, level, duration, warmup))
    finally:
        c.stop_child(echo)
        if shared is not None:
            shared.stop()
    if profiler is not None:
        c.profile_report(profiler, 30, f"client process, PCP at {args.profile} in flight")


# ------------------------------------------------------------------ memory children

def child_outstanding(count: int) -> dict:
    """Bytes per outstanding MAP request to a server that never answers."""
    import socket
    import tracemalloc
    from twisted.internet import reactor
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.4", 0))  # bound and never read: no ICMP, no answer
    client = PCPClient(reactor, {"cgn": ServerAddress("127.0.0.4", silent.getsockname()[1])},
                       bind="127.0.0.1", policy=RFC6887_DEFAULT)
    client.start()
    kept = []

    def issue(first: int) -> None:
        for i in range(first, first + count):
            spec = spec_for(i, external_port=20000 + i % 40000, prefer_failure=True,
                            description="bench mapping")
            kept.append(client.map("cgn", spec))  # the caller holds the Deferred, as the IWF does

    issue(10**6)  # warm-up: code paths, interned objects, reactor heap growth
    c.settle()
    rss0 = c.rss_bytes()
    issue(2 * 10**6)
    c.settle()
    rss1 = c.rss_bytes()
    tracemalloc.start()
    c.settle()
    t0 = tracemalloc.get_traced_memory()[0]
    issue(3 * 10**6)
    c.settle()
    t1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    for d in kept:
        d.addErrback(lambda f: None)
    return {"rss": (rss1 - rss0) / count, "traced": (t1 - t0) / count}


def child_cgn(count: int, traced: int) -> dict:
    """Bytes per mapping held by an in-process LabCGN."""
    import tracemalloc
    from ipaddress import ip_network
    from igdpcp.pcp.codec import MapBody, Request, ThirdParty, ThirdPartyId, encode_request
    from igdpcp.pcp.constants import Opcode
    from igdpcp.pcplab.cgn import LabCGN
    from igdpcp.pcplab.config import CGNConfig

    source = IPv4Address("127.0.0.1")
    zero = IPv4Address("0.0.0.0")

    def fill(cgn, count: int) -> int:
        ok = 0
        for i in range(count):
            sub, n = i % 2000, i // 2000  # 2,000 subscribers, as the IWF benches use
            internal = IPv4Address(0x0A000000 + n % 0xFFFFFF)
            port = 1024 + n % 60000
            data = encode_request(Request(Opcode.MAP, 3600, source,
                                          MapBody(new_nonce(), 6, port, port, zero),
                                          (ThirdParty(internal), ThirdPartyId(sub.to_bytes(4, "big")))))
            answer = cgn.handle(data, "127.0.0.1", 5350, 1.0)
            ok += answer[3] == 0
        return ok

    config = CGNConfig(pool=(ip_network("5.5.0.0/22"),))
    a = LabCGN(config, now=0.0)
    c.settle()
    rss0 = c.rss_bytes()
    t = time.perf_counter()
    ok = fill(a, count)
    fill_rate = count / (time.perf_counter() - t)
    c.settle()
    rss1 = c.rss_bytes()
    b = LabCGN(config, now=0.0)
    tracemalloc.start()
    c.settle()
    t0 = tracemalloc.get_traced_memory()[0]
    fill(b, traced)
    c.settle()
    t1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"rss": (rss1 - rss0) / count, "traced": (t1 - t0) / traced, "traced_n": traced, "ok": ok,
            "mappings": len(a), "handle_rate": fill_rate}


def run_children(jobs) -> list:
    procs = [subprocess.Popen([sys.executable, __file__, "--child", kind, "--count", str(count),
                               "--traced", str(traced)], stdout=subprocess.PIPE, text=True)
             for kind, count, traced in jobs]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child failed ({proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------ main

def report(results, mem_out, mem_cgn, args) -> None:
    rows = []
    echo = {r["level"]: r for r in results if r["kind"] == "echo"}
    for r in results:
        lat = r["lat"]
        ratio = ""
        if r["kind"] == "PCP" and r["level"] in echo and echo[r["level"]]["rate"]:
            ratio = f"{r['rate'] / echo[r['level']]['rate']:.2f}"
        lost = r.get("lost")
        drops = f"{r['drops']} ({r['srv_drops']} at server)"
        rows.append([r["kind"], r["level"], f"{r['rate']:,.0f}", c.ms(lat["p50"]), c.ms(lat["p99"]),
                     c.ms(lat["max"]), drops if lost is None else f"{drops}, lost {lost}",
                     r["retrans"], r["errors"], f"{r['cpu'] * 100:.0f}%", f"{r['srv_cpu'] * 100:.0f}%",
                     ratio])
    c.table("Closed loop on loopback: PCPClient <-> lab CGN (twistd pcplab) vs Twisted UDP echo",
            ["kind", "in flight", "req/s", "p50 ms", "p99 ms", "max ms", "kernel drops",
             "retransmits", "errors", "client CPU", "server CPU", "PCP/echo"], rows)
    pcp = {r["level"]: r for r in results if r["kind"] == "PCP"}
    checks = []
    if 1 in pcp and 1 in echo:
        ratio = pcp[1]["rate"] / echo[1]["rate"]
        checks.append(["PCP/echo at 1 in flight", f"{ratio:.2f}", ">= 0.5", c.verdict(ratio, 0.5)])
    for r in results:
        if r["kind"] in ("PCP", "PCP burst") and r["level"] == 1000:
            name = f"{r['kind']} at 1,000 in flight" + (" (all sent at once)" if "burst" in r["kind"]
                                                        else " (ramped start)")
            storm = r["retrans"] > 0.01 * max(1, r["sent"])
            checks.append([f"drops, {name}", r["drops"], "0", "meets" if r["drops"] == 0 else "MISSES"])
            if args.quick:  # the window ends before IRT (3 s): retransmissions cannot show
                checks.append([f"retransmits, {name}", "n/a in --quick", "no storm (< 1%)", "-"])
            else:
                checks.append([f"retransmits, {name}", f"{r['retrans']} of {r['sent']:,} sent",
                               "no storm (< 1%)", "MISSES" if storm else "meets"])
            if 1 in pcp:
                collapse = r["rate"] / pcp[1]["rate"]
                checks.append([f"rate / rate at 1 in flight, {name}", f"{collapse:.2f}",
                               "no collapse (>= 1)", c.verdict(collapse, 1.0)])
    c.table("Targets", ["check", "value", "target", "verdict"], checks)
    c.table("Memory", ["what", "RSS delta", "tracemalloc", "notes"], [
        ["per outstanding MAP request", f"{mem_out['rss']:.0f} B", f"{mem_out['traced']:.0f} B",
         f"{args.outstanding:,} more outstanding to a silent server (after {args.outstanding:,} "
         "warm-up); Deferred, transaction, timer, datagram, match key, PREFER_FAILURE check"],
        ["per lab CGN mapping", f"{mem_cgn['rss']:.0f} B", f"{mem_cgn['traced']:.0f} B",
         f"{mem_cgn['mappings']:,} mappings in LabCGN (tracemalloc over {mem_cgn['traced_n']:,}); "
         f"handle() {mem_cgn['handle_rate']:,.0f}/s incl. encode"],
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s per level instead of 8 s")
    ap.add_argument("--profile", type=int, nargs="?", const=1, metavar="LEVEL",
                    help="cProfile this process during the PCP run at LEVEL in flight (default 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--traced", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "outstanding":
            print(json.dumps(child_outstanding(args.count)))
        else:
            print(json.dumps(child_cgn(args.count, args.traced)))
        return
    args.outstanding = 10_000
    # The two memory children run side by side (one core each), before any load.
    mem_out, mem_cgn = run_children([("outstanding", args.outstanding, 0),
                                     ("cgn", 100_000, 10_000 if args.quick else 100_000)])
    results: list = []

    c.quiet_twisted_logging()

    def run(reactor):
        return defer.ensureDeferred(throughput(reactor, args, results))

    c.react(run)
    report(results, mem_out, mem_cgn, args)


if __name__ == "__main__":
    main()
