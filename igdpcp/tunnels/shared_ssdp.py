"""One SSDP socket for every tunnel (``igd.ssdp_socket = "shared"``).

A socket per tunnel (:func:`listeners.listen_ssdp`) is the default, but it
costs one file descriptor per tunnel on top of the HTTP listener: 10,000
tunnels then need more than 20,000 descriptors, more than many hosts allow a
process.  Here one socket bound to port 1900 joins the SSDP group on each
tunnel by ifindex (``struct ip_mreqn``), learns the interface each datagram
came in on from ``IP_PKTINFO``, and hands it to that tunnel's protocol only.
Answers and NOTIFYs leave by the tunnel they belong to: ``sendmsg`` with an
``IP_PKTINFO`` naming the interface sets the outgoing interface, for unicast
and multicast alike.  ``IP_MULTICAST_ALL`` is off, so the socket hears the
group only on the interfaces it joined.

The kernel keeps a socket's memberships in a list charged to its option
memory: ``net.ipv4.igmp_max_memberships`` (default 20) and
``net.core.optmem_max`` bound how many tunnels one socket can join.  Both are
per network namespace; :func:`raise_membership_limits` raises them at
start-up (igdpcp runs as root) and says so in the log.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter

from twisted.application.service import Service
from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol

from ..logs import logger
from ..pcp.client import grow_receive_buffer
from .hostsetup import read_sysctl, write_sysctl
from .listeners import MULTICAST_TTL, SSDP_GROUP, SSDP_PORT

log = logger(__name__)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
_ANY = b"\x00\x00\x00\x00"

# What 100,000 memberships need (the kernel charges about 48 octets each).
MEMBERSHIPS = 100_000
LIMITS = {"net.ipv4.igmp_max_memberships": MEMBERSHIPS, "net.core.optmem_max": 64 * MEMBERSHIPS}


def raise_membership_limits(limits=LIMITS) -> list[str]:
    """Raise the per-namespace limits on one socket's memberships; returns what it could not."""
    problems = []
    for key, want in limits.items():
        have = read_sysctl(key)
        if have is not None and have >= want:
            continue
        try:
            write_sysctl(key, want)
            log.info("set {key}={value} for the shared SSDP socket", key=key, value=want)
        except OSError as e:
            problems.append(f"{key} is {have} and cannot be raised to {want} ({e.strerror}): "
                            f"the shared SSDP socket can join only that many tunnels")
    return problems


def ingress_ifindex(ancdata) -> int | None:
    """The interface a datagram came in on, from its IP_PKTINFO control message."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            return _PKTINFO.unpack_from(data)[0]
    return None


def _mreqn(ifindex: int) -> bytes:
    return struct.pack("4s4si", socket.inet_aton(SSDP_GROUP), _ANY, ifindex)


class SharedSSDPPort(udp.Port):
    """The one socket; :meth:`attach` gives each tunnel's protocol its own transport.

    ``counters``: ``no_tunnel`` (a datagram from an interface no tunnel has:
    dropped), ``joins``, ``join_failed``, ``send_failed``.
    """

    def __init__(self, reactor, port: int = SSDP_PORT, interface: str = ""):
        super().__init__(port, DatagramProtocol(), interface, reactor=reactor)
        self.tunnels: dict[int, DatagramProtocol] = {}
        self.counters: Counter = Counter()

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        # Every tunnel's searches queue here: at 10,000 tunnels the default buffer
        # overflowed while the reactor was busy starting them.
        grow_receive_buffer(sock)
        return sock

    # -- tunnels
    def attach(self, protocol: DatagramProtocol, ifindex: int) -> "TunnelSSDPPort":
        """Join the group on ``ifindex`` and start ``protocol`` on it; OSError if the join fails."""
        if ifindex in self.tunnels:
            raise OSError(errno.EADDRINUSE, f"interface {ifindex} already has an SSDP protocol")
        try:
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(ifindex))
        except OSError as e:
            self.counters["join_failed"] += 1
            if e.errno == errno.ENOBUFS:
                raise OSError(e.errno, "too many SSDP group memberships on the shared socket "
                                       "(net.ipv4.igmp_max_memberships, net.core.optmem_max)") from None
            raise
        self.counters["joins"] += 1
        self.tunnels[ifindex] = protocol
        port = TunnelSSDPPort(self, ifindex, protocol)
        protocol.makeConnection(port)
        return port

    def detach(self, ifindex: int) -> None:
        if self.tunnels.pop(ifindex, None) is None:
            return
        try:
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, _mreqn(ifindex))
        except OSError:
            pass  # the interface is gone; the kernel still drops the entry by ifindex

    def send(self, data: bytes, addr, ifindex: int) -> None:
        """One datagram out of ``ifindex`` (raises OSError like ``transport.write``)."""
        pktinfo = _PKTINFO.pack(ifindex, _ANY, _ANY)
        self.socket.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, addr)

    # -- reading (udp.Port.doRead, with the ingress interface)
    def doRead(self):
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancdata, _flags, addr = self.socket.recvmsg(self.maxPacketSize, _CMSG_SPACE)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error for an earlier answer: nothing to do
                raise
            read += len(data)
            protocol = self.tunnels.get(ingress_ifindex(ancdata))
            if protocol is None:
                self.counters["no_tunnel"] += 1
                continue
            try:
                protocol.datagramReceived(data, addr)
            except Exception:
                log.failure("SSDP datagram handling failed")

    def connectionLost(self, reason=None):
        for protocol in list(self.tunnels.values()):
            protocol.transport.stopListening()  # byebye first, as when one tunnel goes
        super().connectionLost(reason)


class TunnelSSDPPort:
    """One tunnel's view of the shared socket: what an SSDPProtocol needs of a transport."""

    def __init__(self, shared: SharedSSDPPort, ifindex: int, protocol: DatagramProtocol):
        self.shared = shared
        self.ifindex = ifindex
        self.protocol = protocol

    def write(self, data: bytes, addr) -> None:
        self.shared.send(data, addr, self.ifindex)

    def getHost(self):
        return self.shared.getHost()

    def stopListening(self) -> None:
        """Stop the protocol (its byebye still leaves by this tunnel), then leave the group."""
        if self.shared.tunnels.get(self.ifindex) is not self.protocol:
            return
        self.protocol.doStop()
        self.shared.detach(self.ifindex)


class SharedSSDPService(Service):
    """Opens the shared socket before the tunnels start and closes it after they stop."""

    name = "ssdp"

    def __init__(self, reactor, port: int = SSDP_PORT):
        self.port = SharedSSDPPort(reactor, port)

    def startService(self):
        for problem in raise_membership_limits():
            log.warn("{problem}", problem=problem)
        self.port.startListening()
        super().startService()

    def stopService(self):
        super().stopService()
        return self.port.stopListening()
