"""Link and address events from the kernel (rtnetlink via pyroute2), on the reactor.

Subscriber sessions come and go at run time; their tunnel interfaces appear
and disappear with them.  :class:`LinkWatcher` turns rtnetlink messages into
plain :class:`LinkState` values and hands them to a handler; it owns no
policy.  Events come on a plain non-blocking netlink socket read by the
reactor until it is empty, and are decoded with pyroute2's marshal: pyroute2's
own ``IPRoute.get()`` buffers several kernel messages and returns one, which
left a new tunnel's address event waiting for some unrelated event.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from ..logs import logger
from .idsource import tunnel_info_from_msg

log = logger(__name__)

IFF_UP = 0x1
RECEIVE_BUFFER = 8 << 20  # room for the burst of events when thousands of tunnels appear


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
        self.ipr_factory = ipr_factory  # for the initial dump
        self.sock: socket.socket | None = None
        self.marshal = MarshalRtnl()
        self.links: dict[int, LinkState] = {}
        self.addresses: dict[int, set[str]] = {}

    # -- lifecycle
    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock  # subscribed before the dump, so nothing falls in between
        self.resync()
        self.reactor.addReader(self)

    def resync(self) -> None:
        """Replay the kernel's current links and addresses (at start, and after an overrun)."""
        dump = self.ipr_factory()
        try:
            for msg in dump.get_addr(family=socket.AF_INET):
                self._address(msg)
            for msg in dump.get_links():
                self._link(msg)
        finally:
            dump.close()

    def stop(self) -> None:
        if self.sock is not None:
            self.reactor.removeReader(self)
            self.sock.close()
            self.sock = None

    # -- IReadDescriptor
    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "LinkWatcher"

    def connectionLost(self, reason) -> None:
        log.warn("netlink socket lost: {reason}", reason=reason)

    def doRead(self):
        while self.sock is not None:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                log.warn("netlink events overran the socket buffer; re-reading all links")
                self.resync()
                continue
            for msg in self.marshal.parse(data):
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
