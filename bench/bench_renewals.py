#!/usr/bin/env python3
"""Keeping many mappings alive: 100,000 mappings held under a short CGN lifetime.

    python3 bench/bench_renewals.py [--quick] [--lifetime S] [--lifetimes K] [--mappings N] [--profile]

igdpcp (PCPClient + InterworkingFunction with a SQLite store, as CoreService
wires it; no HTTP) runs in this process on the global reactor; the lab CGN is
``twistd -n pcplab`` on 127.0.0.2 with min_lifetime = max_lifetime = the
lifetime under test, so every grant is that short and the keeper must renew
each mapping about every half lifetime (RFC 6887 section 11.2.1).

The mappings are made through InterworkingFunction.add_mapping (2,000
subscribers sharing one private address, told apart by THIRD_PARTY_ID; 128
in flight), then held for K lifetimes.  Reported over that window: igdpcp's
CPU share (process CPU time / wall), renewals sent / ok / failed and the
renewals that came late (sent after the mapping's PCP lifetime had run out,
stats["renewals_late"]; target 0), reactor lag (how late a 100 ms timer
fires: GC pauses and renewal bursts), GC passes, and at the end what the lab
CGN holds.  Memory per mapping = RSS growth over the pre-load / mappings.

Full: 100,000 mappings, lifetime 120 s, 3 lifetimes (~7 min).
--quick: 10,000 mappings, lifetime 5 s, 3 lifetimes (~20 s).
"""

from __future__ import annotations

import argparse
import gc
import time

import _common as c
from _stack import GCWatch, Stack, freeze_after_full_collections, preload

from twisted.internet import defer, task


class LagProbe:
    """How late a repeating timer fires: what any other event (a SOAP request,
    a PCP answer) waits behind."""

    def __init__(self, reactor, interval: float = 0.1):
        self.reactor, self.interval = reactor, interval
        self.lags: list[float] = []
        self._next = time.perf_counter() + interval
        self._call = reactor.callLater(interval, self._tick)

    def _tick(self):
        now = time.perf_counter()
        self.lags.append(max(0.0, now - self._next))
        self._next = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def stop(self):
        if self._call.active():
            self._call.cancel()


async def run(reactor, args, out: dict) -> None:
    stack = Stack(reactor, http=False, min_lifetime=args.lifetime, max_lifetime=args.lifetime)
    watch = GCWatch()
    try:
        c.settle()
        rss0, objects0 = c.rss_bytes(), len(gc.get_objects())
        out["preload"] = await preload(stack.iwf, args.mappings)
        c.settle()
        rss1 = c.rss_bytes()
        out["objects_per_mapping"] = (len(gc.get_objects()) - objects0) / args.mappings
        t = time.perf_counter()
        gc.collect()
        out["full_collection"] = time.perf_counter() - t
        out["rss_per_mapping"] = (rss1 - rss0) / args.mappings
        out["rss_after_preload"] = rss1

        stats0, client0 = dict(stack.iwf.stats), dict(stack.client.stats)
        client_port = stack.client._servers["cgn"].port.getHost().port
        sockets = [("127.0.0.2", stack.cgn.port), ("127.0.0.1", client_port)]
        drops0 = c.udp_rcvbuf_errors()
        sock_drops0 = [c.udp_drops(*s) for s in sockets]
        watch.reset()
        lag = LagProbe(reactor)
        sampler = c.CPUSampler(reactor, [stack.cgn.pid], interval=1.0)
        t0 = time.time()
        out["rss_per_lifetime"] = []
        for _ in range(args.lifetimes):
            await task.deferLater(reactor, args.lifetime, lambda: None)
            out["rss_per_lifetime"].append(c.rss_bytes())
        t1 = time.time()
        sampler.stop()
        lag.stop()
        shares = sampler.shares(t0, t1)
        out["cpu"], machine, out["cgn_cpu"] = shares[0], shares[1], shares[2]
        out["others"] = max(0.0, machine - out["cpu"] - out["cgn_cpu"])
        out["hold"] = t1 - t0
        out["stats"] = {k: stack.iwf.stats.get(k, 0) - stats0.get(k, 0)
                        for k in ("renewals_sent", "renewals_ok", "renewals_failed", "renewals_late",
                                  "renewals_refused", "mappings_lost")}
        out["client"] = {k: stack.client.stats.get(k, 0) - client0.get(k, 0)
                         for k in ("sent", "retransmitted", "deadline_expired", "epoch_invalid")}
        out["drops"] = c.udp_rcvbuf_errors() - drops0
        out["sock_drops"] = [c.udp_drops(*s) - d for s, d in zip(sockets, sock_drops0)]
        out["lag"] = c.latency_summary(lag.lags)
        out["gc"] = watch.summary()
        out["held"] = sum(len(t) for t in stack.iwf.tables.values())
        cgn = stack.cgn.stats()
        out["cgn_mappings"] = cgn.get("mappings")
        out["cgn_expired"] = cgn.get("counters", {}).get("expired", 0)
        if args.profile:
            _, out["profiler"] = await c.profiled(task.deferLater(reactor, args.lifetime, lambda: None))
    finally:
        await stack.close()


def report(out: dict, args) -> None:
    if not args.gc_freeze:
        print("\nWHAT-IF RUN: Python's default garbage collection (--no-gc-freeze), not igdpcp's policy.")
    pre, st, cl = out["preload"], out["stats"], out["client"]
    hold = out["hold"]
    per_renewal = out["cpu"] * hold / max(1, st["renewals_sent"]) * 1e6
    c.table(f"{args.mappings:,} mappings, CGN lifetime {args.lifetime} s, held {hold:.0f} s "
            f"({args.lifetimes} lifetimes)", ["figure", "value", "target / note"], [
        ["pre-load (IWF.add_mapping, 128 in flight)",
         f"{pre['ok']:,} ok, {pre['failed']} failed in {pre['seconds']:.1f} s ({pre['rate']:,.0f}/s)", ""],
        ["igdpcp CPU share while holding", f"{out['cpu'] * 100:.1f}%", "process CPU time / wall"],
        ["lab CGN CPU share", f"{out['cgn_cpu'] * 100:.1f}%", "separate process"],
        ["others' CPU on the machine", f"{out['others'] * 100:.0f}%", "not ours (noise)"],
        ["renewals sent / ok", f"{st['renewals_sent']:,} / {st['renewals_ok']:,}",
         f"{st['renewals_sent'] / hold:,.0f}/s; {per_renewal:.0f} us igdpcp CPU per renewal"],
        ["renewals failed / refused / mappings lost",
         f"{st['renewals_failed']} / {st['renewals_refused']} / {st['mappings_lost']}", "0 / 0 / 0"],
        ["renewals late (past the mapping's expiry)", st["renewals_late"],
         "target 0: " + ("meets" if st["renewals_late"] == 0 else "MISSES")],
        ["PCP datagrams sent / retransmitted / deadline expired",
         f"{cl['sent']:,} / {cl['retransmitted']} / {cl['deadline_expired']}", ""],
        ["kernel UDP drops: whole machine / at lab CGN / at igdpcp",
         f"{out['drops']} / {out['sock_drops'][0]} / {out['sock_drops'][1]}",
         "receive buffers full (default SO_RCVBUF)"],
        ["reactor lag p50 / p99 / max (100 ms timer)",
         f"{c.ms(out['lag']['p50'])} / {c.ms(out['lag']['p99'])} / {c.ms(out['lag']['max'])} ms",
         "what a SOAP request would wait"],
        ["GC while holding", out["gc"],
         f"{out['objects_per_mapping']:.1f} GC-tracked objects per mapping; one full "
         f"gc.collect() after the pre-load took {out['full_collection'] * 1000:.0f} ms"],
        ["memory per mapping (RSS growth / mappings)", f"{out['rss_per_mapping']:,.0f} B",
         f"RSS {out['rss_after_preload'] / 2**20:.0f} MiB after pre-load; after each lifetime "
         + ", ".join(f"{r / 2**20:.0f}" for r in out["rss_per_lifetime"]) + " MiB"],
        ["mappings held: igdpcp / lab CGN", f"{out['held']:,} / {out['cgn_mappings']:,}",
         f"CGN expired {out['cgn_expired']} (should be 0)"],
    ])
    if "profiler" in out:
        c.profile_report(out["profiler"], 30, f"igdpcp process, one more lifetime ({args.lifetime} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 mappings, lifetime 5 s")
    ap.add_argument("--mappings", type=int)
    ap.add_argument("--lifetime", type=int, help="the lab CGN's (min = max) lifetime, seconds")
    ap.add_argument("--lifetimes", type=int, default=3, help="how many lifetimes to hold [3]")
    ap.add_argument("--profile", action="store_true", help="cProfile one more lifetime afterwards")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                    help="what-if: Python's default collector instead of igdpcp.gcpolicy")
    args = ap.parse_args()
    args.mappings = args.mappings or (10_000 if args.quick else 100_000)
    args.lifetime = args.lifetime or (5 if args.quick else 120)
    out: dict = {}
    c.quiet_twisted_logging()
    if args.gc_freeze:
        freeze_after_full_collections()

    def start(reactor):
        return defer.ensureDeferred(run(reactor, args, out))

    c.react(start)
    report(out, args)


if __name__ == "__main__":
    main()
