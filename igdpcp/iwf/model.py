"""Plain values exchanged between the front ends and the IWF core."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Optional

TCP = "TCP"
UDP = "UDP"
PROTOCOLS = (TCP, UDP)

#: Lease value meaning "until deleted" (IGD:1 NewLeaseDuration 0).  RFC 6970 section 5.9.
INFINITE = None


@dataclass(frozen=True, slots=True)
class MappingRequest:
    """What a control point asks for (AddPortMapping / AddAnyPortMapping arguments).

    ``lease`` is seconds, or ``None`` for an infinite lease (IGD:1 lease 0).  The
    front end resolves version rules (IGD:2 0 -> 604800) before calling.
    ``internal_client`` is ``None`` when the caller left it empty (means itself).
    """

    external_port: int
    protocol: str
    internal_port: int
    internal_client: Optional[IPv4Address | IPv6Address]
    remote_host: Optional[IPv4Address | IPv6Address] = None
    description: str = ""
    enabled: bool = True
    lease: Optional[int] = None


@dataclass(frozen=True, slots=True)
class MappingKey:
    """How UPnP names a mapping: (RemoteHost, ExternalPort, PortMappingProtocol)."""

    remote_host: Optional[IPv4Address | IPv6Address]
    external_port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class MappingView:
    """A mapping as shown to its own subscriber (no PCP internals, no identifiers)."""

    remote_host: Optional[IPv4Address | IPv6Address]
    external_port: int
    protocol: str
    internal_port: int
    internal_client: IPv4Address | IPv6Address
    enabled: bool
    description: str
    lease: Optional[int]  # requested lease, None = infinite
    lease_remaining: int  # seconds left of the UPnP lease, 0 for infinite
    external_address: Optional[IPv4Address | IPv6Address]

    @property
    def key(self) -> MappingKey:
        return MappingKey(self.remote_host, self.external_port, self.protocol)
