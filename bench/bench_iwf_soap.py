#!/usr/bin/env python3
"""AddPortMapping end to end: SOAP in over real TCP, PCP out to the lab CGN and
back, SOAP out; compared with a bare twisted.web resource.

    python3 bench/bench_iwf_soap.py [--quick] [--profile]

Processes (2 cores):
  * this process is "igdpcp": PCPClient + InterworkingFunction (SQLite store,
    as CoreService wires it) + UPnPResource/make_site on a plain listenTCP on
    127.0.0.1 (IGD:1), on the global reactor;
  * the lab CGN: ``twistd -n pcplab`` on 127.0.0.2 (pool 5.5.0.0/22, quota
    off, lifetimes 120..3600 s);
  * the load generator: bench/_loadgen.py (asyncio, raw sockets), one TCP
    connection per request with ``Connection: close`` as upnpc does.

``caller_for`` maps the peer address to a Subscriber of its own (THIRD_PARTY_ID
= the 4 address octets): every load-generator connection slot binds its own
127.x.y.z source address, so each slot is one control point of one subscriber,
as on a tunnel.  Every request is a new mapping (a new internal = external
port per request); the policy quota is raised so it never refuses.

Phases, each on a fresh igdpcp stack and a fresh lab CGN:
  1. closed loop, 50 connections: igdpcp req/s, p50, p99;
  2. closed loop, 50 connections: a bare twisted.web resource answering the
     same bytes with the same headers on a stock twisted.web Site: req/s; the
     ratio igdpcp / bare (target >= 0.5).  One more row serves it on
     igdpcp's own Site class (UPnPSite: no form sniffing of POST bodies, a
     body cap, no access log), which is faster than stock; its ratio is
     printed too;
  3. open loop, Poisson 500/s then 2,000/s, 60 s windows (--quick: 10 s), up to
     50 connections: achieved rate, p50, p99, p99.9 (target p99 < 10 ms at 2,000/s);
  4. phase 1 again on a fresh stack, then 100,000 mappings pre-loaded
     (--quick: 10,000) on that stack, then phase 1 once more (target: rate
     >= 0.9 x the run just before the pre-load, so both see the same
     neighbours on a shared machine).  Pre-loading goes through the IWF API
     in-process (InterworkingFunction.add_mapping, 2,000 subscribers x 50
     mappings, 128 in flight), so the mappings are real everywhere: SQLite
     rows, subscriber tables, keeper timers, PCP on the lab CGN.  That is
     slower than filling the store and calling restore(), but restore() renews
     through the keeper's paced queue (200/s by default), which would still be
     running during the measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import _common as c
from _stack import GCWatch, Stack, freeze_after_full_collections, preload

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import resource, server

from igdpcp.upnp import soap
from igdpcp.upnp.http import SERVER, XML_TYPE, make_site

CONNECTIONS = 50
SOAP_NS = "urn:schemas-upnp-org:service:WANIPConnection:1"


class BareSOAP(resource.Resource):
    """A fixed AddPortMapping answer with the headers igdpcp sends, nothing else."""

    isLeaf = True
    body = soap.build_response(SOAP_NS, "AddPortMapping", [])

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"server", SERVER)
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
        request.setHeader(b"content-type", XML_TYPE)
        request.setHeader(b"ext", b"")
        return self.body


_phase = iter(range(20, 250))


def sources() -> list[str]:
    """Fresh source addresses (control points, hence subscribers) for one phase."""
    net = next(_phase)
    return [f"127.{net}.0.{i + 1}" for i in range(CONNECTIONS)]


async def load(port: int, mode: str, duration: float, warmup: float, rate: float = 0.0) -> dict:
    cfg = {"host": "127.0.0.1", "port": port, "sources": sources(), "mode": mode,
           "duration": duration, "warmup": warmup, "rate": rate, "seed": 7}
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [str(c.BENCH_DIR / "_loadgen.py"), json.dumps(cfg)], env=dict(os.environ))
    if code:
        raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def measured(reactor, what, cgn_pid, watch: GCWatch, coro) -> dict:
    """Run one load phase; add this process's, the CGN's and the rest of the
    machine's CPU share over the load generator's measuring window, and GC figures."""
    gc.collect()
    watch.reset()
    sampler = c.CPUSampler(reactor, [cgn_pid] if cgn_pid else [])
    try:
        result = await coro
    finally:
        sampler.stop()
    shares = sampler.shares(*result["window"])
    result["igd_cpu"], machine = shares[0], shares[1]
    result["cgn_cpu"] = shares[2] if cgn_pid else 0.0
    result["gc"] = watch.summary()
    result["others"] = max(0.0, machine - result["igd_cpu"] - result["cgn_cpu"] - result["cpu"])
    result["what"] = what
    return result


async def run(reactor, args, out: dict) -> None:
    duration, warmup = (3.0, 1.0) if args.quick else (15.0, 2.0)
    window = 10.0 if args.quick else 60.0
    preloaded = 10_000 if args.quick else 100_000
    watch = GCWatch()
    phases = out["phases"] = []

    stack = Stack(reactor)
    try:
        phases.append(await measured(reactor, "igdpcp closed loop, 50 conns", stack.cgn.pid, watch,
                                     load(stack.port.getHost().port, "closed", duration, warmup)))
        out["cgn_after_closed"] = stack.cgn.stats().get("mappings")
    finally:
        await stack.close()

    for what, site in (("bare twisted.web, 50 conns", server.Site(BareSOAP(), timeout=60)),
                       ("bare, igdpcp's UPnPSite, 50 conns", make_site(BareSOAP()))):
        bare = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=511)
        try:
            phases.append(await measured(reactor, what, None, watch,
                                         load(bare.getHost().port, "closed", duration, warmup)))
        finally:
            await defer.maybeDeferred(bare.stopListening)

    for rate in (500, 2000):
        stack = Stack(reactor)
        try:
            phases.append(await measured(reactor, f"igdpcp open loop {rate}/s", stack.cgn.pid, watch,
                                         load(stack.port.getHost().port, "open", window, 0.0, rate)))
        finally:
            await stack.close()

    stack = Stack(reactor)
    try:
        # The reference for the pre-loaded run: the same stack, just before it.
        phases.append(await measured(reactor, "igdpcp closed loop, same stack before pre-load",
                                     stack.cgn.pid, watch,
                                     load(stack.port.getHost().port, "closed", duration, warmup)))
        out["preload"] = await preload(stack.iwf, preloaded)
        out["preload"]["count"] = preloaded
        phases.append(await measured(reactor, f"igdpcp closed loop, {preloaded:,} pre-loaded", stack.cgn.pid,
                                     watch, load(stack.port.getHost().port, "closed", duration, warmup)))
        if args.profile:
            out["profiled"], out["profiler"] = await c.profiled(
                load(stack.port.getHost().port, "closed", duration, warmup))
    finally:
        await stack.close()


def report(out: dict, args) -> None:
    if not args.gc_freeze:
        print("\nWHAT-IF RUN: Python's default garbage collection (--no-gc-freeze), not igdpcp's policy.")
    rows = []
    for p in out["phases"]:
        st = p["status"]
        bad = {k: v for k, v in st.items() if k not in ("200", "offered")}
        rows.append([p["what"], f"{p['rate']:,.0f}", f"{p['n']:,}" + (f" of {st['offered']:,}" if "offered" in st else ""),
                     c.ms(p["p50"]), c.ms(p["p99"]), c.ms(p["p999"]), c.ms(p["max"]),
                     ", ".join(f"{k}:{v}" for k, v in bad.items()) or "0",
                     f"{p['igd_cpu'] * 100:.0f}%", f"{p['cgn_cpu'] * 100:.0f}%" if p["cgn_cpu"] else "-",
                     f"{p['cpu'] * 100:.0f}%", f"{p['others'] * 100:.0f}%", p["gc"]])
    c.table("AddPortMapping over TCP (Connection: close), loopback",
            ["phase", "req/s", "answers", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "non-200",
             "igdpcp CPU", "CGN CPU", "loadgen CPU", "others' CPU", "GC in igdpcp process"], rows,
            "CPU = process CPU time / wall time of the phase (1 core = 100%, 2 cores here); "
            "others' = the rest of the machine's busy time (processes not ours, kernel).")
    first, bare, own_site = out["phases"][0], out["phases"][1], out["phases"][2]
    before, pre = out["phases"][-2], out["phases"][-1]
    open2k = next(p for p in out["phases"] if p["what"].endswith("2000/s"))
    ratio = first["rate"] / bare["rate"]
    ratio_pre = pre["rate"] / before["rate"]
    c.table("Targets", ["check", "value", "target", "verdict"], [
        ["igdpcp / bare twisted.web, closed loop", f"{ratio:.2f}", ">= 0.5", c.verdict(ratio, 0.5)],
        ["  (igdpcp / bare on igdpcp's UPnPSite)", f"{first['rate'] / own_site['rate']:.2f}", "-", "-"],
        ["p99 at 2,000/s offered", f"{c.ms(open2k['p99'])} ms", "< 10 ms",
         c.verdict(open2k["p99"], 0.010, higher_is_better=False)],
        ["achieved / offered at 2,000/s", f"{open2k['rate']:,.0f}/s", "2,000/s",
         c.verdict(open2k["rate"], 0.98 * 2000)],
        [f"rate with {out['preload']['count']:,} pre-loaded / empty", f"{ratio_pre:.2f}", ">= 0.9",
         c.verdict(ratio_pre, 0.9)],
    ])
    pl = out["preload"]
    print(f"\nPre-load through InterworkingFunction.add_mapping (no HTTP): {pl['count']:,} mappings, "
          f"{pl['ok']:,} ok, {pl['failed']} failed, {pl['rate']:,.0f}/s (memory per mapping: "
          "bench_renewals.py).")
    if "profiler" in out:
        p = out["profiled"]
        print(f"\nProfiled closed loop (cProfile on, figures not comparable): {p['rate']:,.0f} req/s")
        c.profile_report(out["profiler"], 35, "igdpcp process, closed loop with pre-loaded mappings")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 s closed loops, 10 s open-loop windows, 10,000 pre-loaded")
    ap.add_argument("--profile", action="store_true",
                    help="one more closed loop with cProfile on igdpcp's process, after the figures")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the in-process CPU cost per AddPortMapping, layer by layer (~15 s)")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                    help="what-if: Python's default collector instead of igdpcp.gcpolicy")
    args = ap.parse_args()
    out: dict = {}
    c.quiet_twisted_logging()
    if args.gc_freeze:
        freeze_after_full_collections()

    def start(reactor):
        if args.breakdown:
            from _breakdown import breakdown

            async def only_breakdown():
                out["breakdown"] = await breakdown(reactor, 5_000 if args.quick else 20_000)
            return defer.ensureDeferred(only_breakdown())
        return defer.ensureDeferred(run(reactor, args, out))

    c.react(start)
    if args.breakdown:
        c.table("CPU per AddPortMapping by layer, in-process, no sockets",
                ["layer", "CPU us/call"], [[name, f"{us:.0f}"] for name, us in out["breakdown"]],
                "The rest of a real request is twisted.web + TCP accept/read/write/close and the "
                "UDP syscalls: compare the bare twisted.web phase.")
        return
    report(out, args)


if __name__ == "__main__":
    main()
