"""Sockets bound to one tunnel interface (SO_BINDTODEVICE), for TCP and for SSDP.

Subscribers' addresses overlap and igdpcp may have the same address on every
tunnel, so a listener must be tied to its interface: then a request is known
to come from that tunnel and its answer leaves by it (notes/lab.md sections
4-5).  Multicast joins and the outgoing multicast interface are set by
ifindex (``struct ip_mreqn``), because by address they would be ambiguous.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import tcp, udp

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
MULTICAST_TTL = 2  # UDA 1.1: SHOULD default to 2


def _bind_to_device(sock: socket.socket, device: str) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())


class DeviceTCPPort(tcp.Port):
    """A listening TCP port that accepts only connections arriving on ``device``."""

    def __init__(self, port, factory, *, device: str, interface: str = "", backlog: int = 50,
                 reactor=None):
        super().__init__(port, factory, backlog, interface, reactor)
        self.device = device

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        _bind_to_device(sock, self.device)
        return sock


class DeviceUDPPort(udp.Port):
    """A UDP port on ``device`` only; with ``group`` it joins that multicast group there."""

    def __init__(self, port, protocol, *, device: str, interface: str = "",
                 group: str | None = None, reactor=None):
        super().__init__(port, protocol, interface, reactor=reactor)
        self.device = device
        self.group = group

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_to_device(sock, self.device)
        return sock

    def startListening(self):
        super().startListening()
        if self.group is not None:
            join_by_ifindex(self.socket, self.group, socket.if_nametoindex(self.device))


def join_by_ifindex(sock: socket.socket, group: str, ifindex: int) -> None:
    """IP_ADD_MEMBERSHIP and IP_MULTICAST_IF with struct ip_mreqn (group, any, ifindex)."""
    mreqn = struct.pack("4s4si", socket.inet_aton(group), socket.inet_aton("0.0.0.0"), ifindex)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)


def listen_tcp(reactor, port: int, factory, *, device: str, interface: str = "") -> DeviceTCPPort:
    listening = DeviceTCPPort(port, factory, device=device, interface=interface, reactor=reactor)
    listening.startListening()
    return listening


def listen_ssdp(reactor, protocol, *, device: str) -> DeviceUDPPort:
    listening = DeviceUDPPort(SSDP_PORT, protocol, device=device, group=SSDP_GROUP, reactor=reactor)
    listening.startListening()
    return listening
