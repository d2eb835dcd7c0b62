#!/usr/bin/env python3
"""SOAP load generator for bench_iwf_soap.py (not a benchmark itself).

    python3 bench/_loadgen.py JSON

JSON: {"host", "port", "sources": [one source address per connection slot],
"mode": "closed" | "open", "duration", "warmup", "rate" (open loop), "seed",
"port_offset", "ports": [one listener per igdpcp worker; slot i uses
ports[i % len(ports)]], "timeline": true for per-second [second, count, p50,
max]}.  Each request is an IGD:1 AddPortMapping as miniupnpc sends
it (Connection: close, one TCP connection per request) for a new internal and
external port of the slot's source address.  Prints one JSON line of figures.

Closed loop: every slot sends its next request when the answer is complete.
Open loop: Poisson arrivals at ``rate``; a free slot takes the oldest waiting
arrival; latency counts from the arrival, so queueing for a slot is included.

It runs on uvloop (``pip install '.[bench]'``).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import uvloop

SOAP_NS = "urn:schemas-upnp-org:service:WANIPConnection:1"
PORTS = 65535 - 1024 + 1


def add_port_mapping(host: str, port: int, client: str, external: int, protocol: str) -> bytes:
    body = ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:AddPortMapping xmlns:u="{SOAP_NS}"><NewRemoteHost></NewRemoteHost>'
            f"<NewExternalPort>{external}</NewExternalPort><NewProtocol>{protocol}</NewProtocol>"
            f"<NewInternalPort>{external}</NewInternalPort><NewInternalClient>{client}</NewInternalClient>"
            "<NewEnabled>1</NewEnabled><NewPortMappingDescription>libminiupnpc</NewPortMappingDescription>"
            "<NewLeaseDuration>0</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>\r\n").encode()
    head = (f"POST /ctl/IPConn HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: Debian/12 UPnP/1.1 MiniUPnPc/2.2.4\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: text/xml\r\n"
            f'SOAPAction: "{SOAP_NS}#AddPortMapping"\r\nConnection: close\r\n'
            "Cache-Control: no-cache\r\nPragma: no-cache\r\n\r\n").encode()
    return head + body


class _Exchange(asyncio.Protocol):
    """Write the request, collect the answer until the server closes."""

    def __init__(self, payload: bytes, done: asyncio.Future):
        self.payload = payload
        self.done = done
        self.chunks: list[bytes] = []

    def connection_made(self, transport):
        transport.write(self.payload)

    def data_received(self, data):
        self.chunks.append(data)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(b"".join(self.chunks))


class Slot:
    """One connection slot: a source address (a control point) and its next port."""

    def __init__(self, index: int, source: str, offset: int):
        self.source = source
        self.k = 0
        self.offset = offset + index * 1291  # slots walk disjoint port ranges
        self.port = 0

    def next_request(self, host: str, port: int) -> bytes:
        k, self.k = self.k, self.k + 1
        external = 1024 + (self.offset + k) % PORTS
        protocol = "TCP" if (k // PORTS) % 2 == 0 else "UDP"
        return add_port_mapping(host, port, self.source, external, protocol)


async def exchange(loop, host: str, port: int, slot: Slot) -> int:
    """One request on a new connection; the HTTP status, or 0 for a transport error."""
    port = slot.port or port
    done = loop.create_future()
    try:
        transport, _ = await loop.create_connection(
            lambda: _Exchange(slot.next_request(host, port), done), host, port,
            local_addr=(slot.source, 0))
    except OSError:
        return 0
    try:
        answer = await done
    finally:
        transport.close()
    try:
        return int(answer[9:12])
    except ValueError:
        return 0


async def run(cfg: dict) -> dict:
    loop = asyncio.get_running_loop()
    host, port = cfg["host"], cfg["port"]
    slots = [Slot(i, s, cfg.get("port_offset", 0)) for i, s in enumerate(cfg["sources"])]
    for i, slot in enumerate(slots):  # "ports": one listener per igdpcp worker
        slot.port = cfg.get("ports", [port])[i % len(cfg.get("ports", [port]))]
    warmup, duration = cfg.get("warmup", 0.0), cfg["duration"]
    start = loop.time()
    measure_from, measure_to = start + warmup, start + warmup + duration
    latencies: list[float] = []
    status: dict[str, int] = {}
    cpu = {}
    timeline = [] if cfg.get("timeline") else None

    def record(t0: float, code: int) -> None:
        now = loop.time()
        if measure_from <= t0 and now < measure_to + (cfg.get("drain", 30.0) if cfg["mode"] == "open" else 0):
            latencies.append(now - t0)
            if timeline is not None:
                timeline.append((t0 - measure_from, now - t0))
            status[str(code)] = status.get(str(code), 0) + 1

    def mark_cpu(key):
        cpu[key] = (time.process_time(), loop.time(), time.time())

    loop.call_at(measure_from, mark_cpu, "from")
    loop.call_at(measure_to, mark_cpu, "to")

    if cfg["mode"] == "closed":
        async def worker(slot):
            while loop.time() < measure_to:
                t0 = loop.time()
                record(t0, await exchange(loop, host, port, slot))

        await asyncio.gather(*(worker(s) for s in slots))
        achieved = len(latencies) / duration
    else:
        rng = random.Random(cfg.get("seed", 1))
        queue: asyncio.Queue = asyncio.Queue()
        arrivals, t = [], start
        while True:
            t += rng.expovariate(cfg["rate"])
            if t >= measure_to:
                break
            arrivals.append(t)

        async def dispatcher():
            for at in arrivals:
                delay = at - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                queue.put_nowait(at)
            for _ in slots:
                queue.put_nowait(None)

        async def worker(slot):
            while True:
                at = await queue.get()
                if at is None:
                    return
                record(at, await exchange(loop, host, port, slot))

        await asyncio.gather(dispatcher(), *(worker(s) for s in slots))
        offered = sum(1 for a in arrivals if a >= measure_from)
        finished = loop.time()
        achieved = len(latencies) / max(duration, finished - measure_from)
        status["offered"] = offered
    if "to" not in cpu:
        mark_cpu("to")
    latencies.sort()

    def pct(q):
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, max(0, int(round(q / 100 * len(latencies) + 0.5)) - 1))]

    extra = {}
    if timeline is not None:
        per = {}
        for t, lat in timeline:
            per.setdefault(int(t), []).append(lat)
        extra["timeline"] = [[k, len(v), sorted(v)[len(v) // 2], max(v)] for k, v in sorted(per.items())]
    return {**extra, "rate": achieved, "n": len(latencies), "status": status,
            "p50": pct(50), "p99": pct(99), "p999": pct(99.9),
            "max": latencies[-1] if latencies else float("nan"),
            "cpu": (cpu["to"][0] - cpu["from"][0]) / max(1e-9, cpu["to"][1] - cpu["from"][1]),
            "window": [cpu["from"][2], cpu["to"][2]]}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # libuv's loop: the generator shares the machine's cores with the server it
    # measures, and asyncio's own loop spent a third more CPU per request (0.36
    # of a core at 2,000/s against 0.24), which the server then waited behind.
    uvloop.install()
    print(json.dumps(asyncio.run(run(cfg))), flush=True)


if __name__ == "__main__":
    main()
