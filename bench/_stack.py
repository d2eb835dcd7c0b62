"""igdpcp wired in-process for the IWF benches (not a benchmark itself).

:class:`Stack` is what CoreService plus one tunnel front end build: a
PCPClient, a SQLiteStore, the InterworkingFunction and (optionally) the
UPnP HTTP face on a plain listenTCP on 127.0.0.1, plus its own lab CGN
(``twistd -n pcplab``) in a child process, or a lab CGN already running
(what N igdpcp workers share: bench/_worker.py).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from ipaddress import IPv4Address, ip_address

import _common as c

from twisted.internet import defer, task

from igdpcp.iwf.core import InterworkingFunction
from igdpcp.iwf.exchange import CallBound
from igdpcp.iwf.model import MappingRequest
from igdpcp.iwf.policy import Policy
from igdpcp.iwf.store import SQLiteStore
from igdpcp.pcp.client import PCPClient, ServerAddress
from igdpcp.subscriber import Caller, Subscriber
from igdpcp.upnp.description import igd_models
from igdpcp.upnp.http import UPnPResource, make_site

POLICY = Policy(quota=10**9)  # bench subscribers hold thousands of mappings each


class GCWatch:
    """Counts collector passes in this process: their wall-clock pauses (what
    every waiting request sees), and the CPU time of full passes (what they cost).

    It runs inside the measured server at every young pass, so it reads only
    the cheap clock there: the thread CPU clock is a real system call, and
    reading it twice per pass cost the igdpcp process 3-5% of its samples."""

    def __init__(self):
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self):
        self.passes = {0: 0, 1: 0, 2: 0}
        self.longest = self.total = self.longest2_cpu = 0.0
        self._t = self._cpu = None

    def _callback(self, phase, info):
        generation = info["generation"]
        if phase == "start":
            self._t = time.perf_counter()
            if generation == 2:
                self._cpu = time.thread_time()
        elif self._t is not None:
            pause = time.perf_counter() - self._t
            self.passes[generation] += 1
            self.total += pause
            if pause > self.longest:
                self.longest = pause
            if generation == 2 and self._cpu is not None:
                self.longest2_cpu = max(self.longest2_cpu, time.thread_time() - self._cpu)

    def figures(self) -> list:
        """What summary() shows, as JSON-able numbers (a worker child sends them)."""
        return [self.passes[2], self.longest, self.longest2_cpu, self.total]

    def summary(self) -> str:
        return self.describe([self.figures()])

    @staticmethod
    def describe(figures: list[list]) -> str:
        """figures() of one process, or of several: passes and totals summed, longest the max."""
        gen2, longest, cpu2, total = (f(col) for f, col in zip((sum, max, max, sum), zip(*figures)))
        return (f"gen2 x{gen2}, longest {longest * 1000:.0f} ms (gen2 CPU {cpu2 * 1000:.0f} ms), "
                f"total {total * 1000:.0f} ms" + (f", {len(figures)} processes" if len(figures) > 1 else ""))


class Stack:
    """igdpcp as CoreService + one front end wire it, plus its own lab CGN unless
    ``cgn`` = (host, port) of one already running, which close() then leaves alone."""

    def __init__(self, reactor, *, http: bool = True, policy: Policy = POLICY,
                 cgn: tuple[str, int] | None = None, http_port: int = 0, **cgn_settings):
        self.reactor = reactor
        self.cgn = None
        if cgn is None:
            cgn_settings.setdefault("pool", "5.5.0.0/22")
            self.cgn = c.LabCGNProcess("127.0.0.2", **cgn_settings).start()
            cgn = (self.cgn.listen, self.cgn.port)
        elif cgn_settings:
            raise TypeError(f"CGN settings {sorted(cgn_settings)} need a Stack's own CGN")
        self.dir = tempfile.mkdtemp(prefix="bench-iwf-")
        self.store = SQLiteStore(os.path.join(self.dir, "mappings.sqlite"))
        self.client = PCPClient(reactor, {"cgn": ServerAddress(*cgn)}, bind="127.0.0.1")
        self.iwf = InterworkingFunction(reactor, self.client, self.store, policy, bound=CallBound())
        self.client.start()
        self.iwf.restore()
        self.subscribers: dict[str, Caller] = {}
        self.port = None
        if http:
            root = UPnPResource(igd_models(1, b"bench-secret-16b", "bench"), self.iwf,
                                self.caller_for, reactor)
            self.port = reactor.listenTCP(http_port, make_site(root), interface="127.0.0.1", backlog=511)

    def caller_for(self, request) -> Caller | None:
        """Peer address -> its own fixed Subscriber (one per load-generator slot)."""
        host = request.getClientAddress().host
        caller = self.subscribers.get(host)
        if caller is None:
            address = ip_address(host)
            caller = self.subscribers[host] = Caller(
                Subscriber(f"lg-{host}", address.packed, "cgn"), address)
        return caller

    async def close(self):
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
        self.iwf.stop()
        await self.client.stop()
        self.store.close()
        if self.cgn is not None:
            self.cgn.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        # Cancelled timers stay in the reactor's heap (holding the keeper, hence
        # the whole stack) until its next turn compacts it; then collect, so the
        # next phase does not pay for this one's garbage in a gen2 pass.
        await task.deferLater(self.reactor, 0, lambda: None)
        gc.collect()


async def preload(iwf, count: int, subscribers: int = 2000, window: int = 128) -> dict:
    """``count`` mappings through InterworkingFunction.add_mapping, ``window`` in
    flight: ``subscribers`` subscribers with the same private address (told apart
    by THIRD_PARTY_ID, as RFC 7843 intends), each a run of TCP ports."""
    subs = [Caller(Subscriber(f"pre-{i}", i.to_bytes(4, "big"), "cgn"), IPv4Address("10.0.0.2"))
            for i in range(subscribers)]
    done = defer.Deferred()
    state = {"next": 0, "ok": 0, "failed": 0, "open": 0}
    t0 = time.perf_counter()

    def launch():
        j = state["next"]
        if j >= count:
            if state["open"] == 0 and not done.called:
                done.callback(None)
            return
        state["next"] += 1
        state["open"] += 1
        i, k = j % subscribers, j // subscribers
        port = 1024 + (i * 7 + k) % 64512
        d = iwf.add_mapping(subs[i], MappingRequest(port, "TCP", port, None, description="preload"))
        d.addCallbacks(lambda _: finish("ok"), lambda f: finish("failed"))

    def finish(key):
        state[key] += 1
        state["open"] -= 1
        launch()

    for _ in range(min(window, count)):
        launch()
    await done
    state["seconds"] = time.perf_counter() - t0
    state["rate"] = count / state["seconds"]
    return state


def freeze_after_full_collections() -> None:
    """igdpcp's own garbage-collector policy (igdpcp.gcpolicy), as the service installs it."""
    from twisted.internet import reactor

    from igdpcp import gcpolicy
    gcpolicy.install(reactor)
