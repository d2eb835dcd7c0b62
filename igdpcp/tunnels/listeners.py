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

from twisted.internet import defer, tcp, udp
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

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


class _DeviceClient(tcp.Client):
    def __init__(self, host, port, bindAddress, connector, reactor, device):
        self.device = device
        super().__init__(host, port, bindAddress, connector, reactor)

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        _bind_to_device(sock, self.device)
        return sock


class _DeviceConnector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, reactor, device):
        super().__init__(host, port, factory, timeout, None, reactor)
        self.device = device

    def _makeTransport(self):
        return _DeviceClient(self.host, self.port, None, self, self.reactor, self.device)


@implementer(IStreamClientEndpoint)
class DeviceTCPClientEndpoint:
    """An outgoing TCP connection that leaves by ``device`` whatever the routing
    table says: GENA NOTIFYs must reach the subscriber on its own tunnel even
    when every tunnel has the same addresses (notes/lab.md section 3)."""

    def __init__(self, reactor, host: str, port: int, device: str, timeout: float = 30):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.device = device
        self.timeout = timeout

    def connect(self, protocolFactory):
        try:
            wrapping = _WrappingFactory(protocolFactory)
            _DeviceConnector(self.host, self.port, wrapping, self.timeout, self.reactor,
                             self.device).connect()
            return wrapping._onConnection
        except BaseException:
            return defer.fail()


@implementer(IAgentEndpointFactory)
class DeviceEndpointFactory:
    """For ``Agent.usingEndpointFactory``: every request leaves by ``device``."""

    def __init__(self, reactor, device: str, timeout: float = 10):
        self.reactor = reactor
        self.device = device
        self.timeout = timeout

    def endpointForURI(self, uri):
        if uri.scheme != b"http":
            raise ValueError("only http callbacks")
        return DeviceTCPClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port,
                                       self.device, self.timeout)
