"""Which tunnels have a front end: static ones from the config, dynamic ones from netlink.

A dynamic tunnel is any interface whose name matches the configured pattern.
Its front end starts when the link is up and carries igdpcp's address, and is
re-bound when the interface is re-created (a new ifindex).  When the tunnel
goes away its listeners stop (ssdp:byebye where the link still takes it) and
its mappings are kept for a grace time; a tunnel back within the grace time
keeps them, otherwise they are deleted on the CGN (RFC 6970 section 5.10,
carrier analogue; iwf.md E.27).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from twisted.application.service import MultiService
from twisted.internet import defer

from ..logs import logger
from ..subscriber import Subscriber, pseudonym
from .frontend import FrontEndSettings, TunnelFrontEnd
from .idsource import TunnelInfo
from .netlink import LinkState

log = logger(__name__)

# Tunnels per second whose first NOTIFY sets may go out (10,000 tunnels: over 10 s).
# Each set is 9 datagrams sent 2 times (IGD:1); at 2,000 tunnels/s those sends took
# more than one core at 10,000 tunnels and M-SEARCH answers waited up to 1.7 s.
ANNOUNCE_TUNNELS_PER_SECOND = 1000
# Front ends started per reactor turn: at start-up thousands of links arrive at once, and
# started tunnels must keep answering meanwhile (binding takes up to 1 ms each at 10,000).
START_BATCH = 100


@dataclass(frozen=True, slots=True)
class DynamicTunnels:
    """``pattern``: interface names that are subscriber tunnels.  ``address``: igdpcp's
    address on them (one for all, as tunnels overlap), or None for the link's first."""

    pattern: re.Pattern
    address: str | None = None
    server: str = "cgn"
    grace: float = 300.0


class TunnelManager(MultiService):
    """Keeps one :class:`TunnelFrontEnd` per live tunnel; a netlink handler."""

    def __init__(self, reactor, iwf, settings: FrontEndSettings, id_source, *,
                 dynamic: DynamicTunnels | None = None, static: dict | None = None,
                 front_end=TunnelFrontEnd, owns=lambda name: True):
        super().__init__()
        self.reactor = reactor
        self.iwf = iwf
        self.settings = settings
        self.ids = id_source
        self.dynamic = dynamic
        self.static = static or {}  # interface -> config.TunnelConfig
        self.front_end = front_end
        self.owns = owns  # tunnel name -> whether this worker serves it (igdpcp.workers)
        self.fronts: dict[str, TunnelFrontEnd] = {}  # interface -> running front end
        self.ifindex: dict[str, int] = {}
        self.infos: dict[str, TunnelInfo] = {}
        self.grace: dict = {}  # tunnel name -> IDelayedCall
        self.queue: OrderedDict = OrderedDict()  # interface -> start arguments, oldest first
        self.pump = None
        self.announce_at = 0.0  # the last first-NOTIFY slot handed out
        self.counters = {"started": 0, "failed": 0, "stopped": 0, "rebound": 0, "returned": 0,
                         "released": 0}

    # -- which interfaces are tunnels
    def _tunnel(self, state: LinkState):
        """(name, address, server, grace) for a tunnel interface of this worker, or None."""
        static = self.static.get(state.name)
        if static is not None:
            if not self.owns(static.name):
                return None
            return static.name, static.address, static.server, self._grace()
        if (self.dynamic is not None and self.dynamic.pattern.fullmatch(state.name)
                and self.owns(state.name)):
            address = self.dynamic.address
            if address is None and state.addresses:
                address = state.addresses[0]
            if address is not None and address not in state.addresses:
                address = None  # not configured on the link (yet)
            return state.name, address, self.dynamic.server, self.dynamic.grace
        return None

    def _grace(self) -> float:
        return self.dynamic.grace if self.dynamic is not None else 300.0

    # -- netlink handler
    def link_changed(self, state: LinkState) -> None:
        tunnel = self._tunnel(state)
        if tunnel is None:
            return
        name, address, server, grace = tunnel
        if not state.up or address is None:
            self._down(state.name, name, grace)
            return
        current = self.fronts.get(state.name)
        if current is not None:
            if self.ifindex.get(state.name) == state.ifindex and current.address == address:
                return
            self.counters["rebound"] += 1  # re-created interface: the old sockets are dead
            self._stop(state.name)
        call = self.grace.pop(name, None)
        if call is not None and call.active():
            call.cancel()
            self.counters["returned"] += 1
        self.infos[state.name] = state.info
        self.queue[state.name] = (state, name, address, server)
        if self.pump is None:
            self.pump = self.reactor.callLater(0, self._start_queued)

    def _start_queued(self) -> None:
        self.pump = None
        for _ in range(min(START_BATCH, len(self.queue))):
            _interface, args = self.queue.popitem(last=False)
            self._start(*args)
        if self.queue:
            self.pump = self.reactor.callLater(0, self._start_queued)

    def link_removed(self, interface: str, ifindex: int) -> None:
        queued = self.queue.get(interface)
        if queued is not None and queued[0].ifindex == ifindex:
            self._down(interface, queued[1], self._grace_for(interface))
            return
        front = self.fronts.get(interface)
        if front is None or self.ifindex.get(interface) != ifindex:
            return
        self._down(interface, front.subscriber.tunnel, self._grace_for(interface))

    def _grace_for(self, interface: str) -> float:
        if interface in self.static or self.dynamic is None:
            return self._grace()
        return self.dynamic.grace

    # -- start / stop
    def _start(self, state: LinkState, name: str, address: str, server: str) -> None:
        info = state.info

        def third_party_id():
            static = self.static.get(state.name)
            if static is not None:
                return defer.succeed(static.third_party_id)
            return defer.maybeDeferred(self.ids.third_party_id, info)

        # Pace the first NOTIFY sets: at start-up thousands of tunnels come at once, and each
        # gets the next free slot; a tunnel coming alone later announces at once.
        now = self.reactor.seconds()
        self.announce_at = max(self.announce_at, now) + 1.0 / ANNOUNCE_TUNNELS_PER_SECOND
        front = self.front_end(self.reactor, self.iwf, name, state.name, address, self.settings,
                               server=server, third_party_id=third_party_id,
                               announce_after=self.announce_at - now)
        try:
            front.setServiceParent(self)
        except Exception as e:
            front.disownServiceParent()
            self.counters["failed"] += 1
            log.error("tunnel {tunnel}: cannot listen ({error}); will retry when the link changes",
                      tunnel=pseudonym(name), error=e)
            return
        self.fronts[state.name] = front
        self.ifindex[state.name] = state.ifindex
        self.counters["started"] += 1
        log.info("tunnel {tunnel} up", tunnel=pseudonym(name))

    def _stop(self, interface: str) -> defer.Deferred:
        front = self.fronts.pop(interface)
        self.ifindex.pop(interface, None)
        self.counters["stopped"] += 1
        return defer.maybeDeferred(front.disownServiceParent)

    def _down(self, interface: str, name: str, grace: float) -> None:
        self.queue.pop(interface, None)
        if interface in self.fronts:
            self._stop(interface)
            log.info("tunnel {tunnel} down; mappings kept for {grace} s",
                     tunnel=pseudonym(name), grace=grace)
        if name not in self.grace:
            self.grace[name] = self.reactor.callLater(grace, self._release, interface, name)

    def _release(self, interface: str, name: str) -> None:
        self.grace.pop(name, None)
        server = self.static[interface].server if interface in self.static else self.dynamic.server
        count = self.iwf.release_subscriber(Subscriber(name, b"", server))
        info = self.infos.pop(interface, None)
        if info is not None and self.ids is not None:
            self.ids.forget(info)
        self.counters["released"] += 1
        log.info("tunnel {tunnel} gone: {count} mappings deleted", tunnel=pseudonym(name), count=count)

    def stopService(self):
        self.queue.clear()
        if self.pump is not None and self.pump.active():
            self.pump.cancel()
        self.pump = None
        for call in self.grace.values():
            if call.active():
                call.cancel()
        self.grace.clear()
        return super().stopService()
