"""Link and address events from the kernel (rtnetlink via pyroute2), on the reactor.

Subscriber sessions come and go at run time; their tunnel interfaces appear
and disappear with them.  :class:`LinkWatcher` turns rtnetlink messages into
plain :class:`LinkState` values and hands them to a handler; it owns no
policy.  The pyroute2 socket is read by the reactor (it is a plain netlink
socket), so there is no thread.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from ..logs import logger
from .idsource import tunnel_info_from_msg

log = logger(__name__)

IFF_UP = 0x1


@dataclass(frozen=True, slots=True)
class LinkState:
    """What the kernel says about one interface now; ``addresses`` are its IPv4 addresses."""

    name: str
    ifindex: int
    up: bool
    info: object = field(repr=False, default=None)  # idsource.TunnelInfo
    addresses: tuple[str, ...] = ()


@implementer(IReadDescriptor)
class LinkWatcher:
    """Calls ``handler.link_changed(LinkState)`` and ``handler.link_removed(name, ifindex)``.

    It first replays the current links, so start-up and run time take the same path.
    """

    def __init__(self, reactor, handler, *, ipr_factory=IPRoute):
        self.reactor = reactor
        self.handler = handler
        self.ipr_factory = ipr_factory
        self.ipr = None
        self.links: dict[int, LinkState] = {}
        self.addresses: dict[int, set[str]] = {}

    # -- lifecycle
    def start(self) -> None:
        self.ipr = self.ipr_factory()
        self.ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
        dump = self.ipr_factory()
        try:
            for msg in dump.get_addr(family=socket.AF_INET):
                self._address(msg)
            for msg in dump.get_links():
                self._link(msg)
        finally:
            dump.close()
        self.reactor.addReader(self)

    def stop(self) -> None:
        if self.ipr is not None:
            self.reactor.removeReader(self)
            self.ipr.close()
            self.ipr = None

    # -- IReadDescriptor
    def fileno(self) -> int:
        return self.ipr.fileno() if self.ipr is not None else -1

    def logPrefix(self) -> str:
        return "LinkWatcher"

    def connectionLost(self, reason) -> None:
        log.warn("netlink socket lost: {reason}", reason=reason)

    def doRead(self):
        for msg in self.ipr.get():
            try:
                self.dispatch(msg)
            except Exception:
                log.failure("netlink event failed")

    # -- events
    def dispatch(self, msg) -> None:
        event = msg.get("event")
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            index = self._address(msg)
            state = self.links.get(index)
            if state is not None:
                self._emit(self._with_addresses(state))
        elif event == "RTM_NEWLINK":
            self._link(msg)
        elif event == "RTM_DELLINK":
            index = msg["index"]
            state = self.links.pop(index, None)
            self.addresses.pop(index, None)
            if state is not None:
                self.handler.link_removed(state.name, index)

    def _address(self, msg) -> int:
        index = msg["index"]
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        known = self.addresses.setdefault(index, set())
        if address:
            if msg.get("event") == "RTM_DELADDR":
                known.discard(address)
            else:
                known.add(address)
        return index

    def _link(self, msg) -> None:
        info = tunnel_info_from_msg(msg)
        state = LinkState(info.name, info.ifindex, bool(msg["flags"] & IFF_UP), info)
        old = self.links.get(info.ifindex)
        if old is not None and old.name != state.name:
            self.handler.link_removed(old.name, old.ifindex)  # renamed: a different tunnel
        self.links[info.ifindex] = state
        self._emit(self._with_addresses(state))

    def _with_addresses(self, state: LinkState) -> LinkState:
        addresses = tuple(sorted(self.addresses.get(state.ifindex, ())))
        new = LinkState(state.name, state.ifindex, state.up, state.info, addresses)
        self.links[state.ifindex] = new
        return new

    def _emit(self, state: LinkState) -> None:
        self.handler.link_changed(state)
