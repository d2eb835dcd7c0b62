"""Operator policy for subscribers' mappings: leases, quotas, permission rules.

Rules work like miniupnpd's ``allow``/``deny`` lines: the first rule that
matches (external port range, internal address prefix, internal port range)
decides; when none matches the request is denied, so an operator's rule list
is a whitelist.  The default rule list allows ports 1024-65535 only (IGD:2's
recommended policy for unauthenticated control points, igd.md section 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_network

from .errors import NotAuthorized, QuotaExceeded


@dataclass(frozen=True, slots=True)
class PermissionRule:
    allow: bool
    external_ports: tuple[int, int]
    internal_network: object  # ipaddress network
    internal_ports: tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> "PermissionRule":
        """``allow 1024-65535 0.0.0.0/0 1024-65535`` (miniupnpd's spelling)."""
        words = text.split()
        if len(words) != 4 or words[0] not in ("allow", "deny"):
            raise ValueError("expected 'allow|deny EPORTS NETWORK IPORTS'")
        return cls(words[0] == "allow", _ports(words[1]), ip_network(words[2], strict=False),
                   _ports(words[3]))

    def matches(self, external_port: int, client, internal_port: int) -> bool:
        return (self.external_ports[0] <= external_port <= self.external_ports[1]
                and self.internal_ports[0] <= internal_port <= self.internal_ports[1]
                and client.version == self.internal_network.version
                and client in self.internal_network)


def _ports(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    low_n, high_n = int(low), int(high or low)
    if not 0 <= low_n <= high_n <= 65535:
        raise ValueError(f"bad port range {text!r}")
    return low_n, high_n


DEFAULT_RULES = (
    PermissionRule.parse("allow 1024-65535 0.0.0.0/0 1024-65535"),
    PermissionRule.parse("allow 1024-65535 ::/0 1024-65535"),
)


@dataclass(frozen=True, slots=True)
class Policy:
    """``lease_min``/``lease_max`` bound every UPnP lease (seconds).  Infinite
    IGD:1 leases are kept as infinite (renewed until deleted) unless
    ``infinite_leases`` is False, in which case they become ``lease_max``."""

    lease_min: int = 120
    lease_max: int = 7 * 86400
    infinite_leases: bool = True
    quota: int = 64
    rules: tuple[PermissionRule, ...] = field(default=DEFAULT_RULES)
    # Lifetime asked of the CGN for each PCP request; the UPnP lease is kept by renewing.
    pcp_lifetime: int = 3600

    def clamp_lease(self, lease: int | None) -> int | None:
        """Never refuse a lease value (clients.md R8): clamp it."""
        if lease is None:
            return None if self.infinite_leases else self.lease_max
        return max(self.lease_min, min(lease, self.lease_max))

    def check_client(self, caller_address, internal_client) -> None:
        """Own-address rule (miniupnpd secure mode; iwf.md E.33)."""
        if internal_client != caller_address:
            raise NotAuthorized("NewInternalClient must be the caller's own address")

    def check_rules(self, external_port: int, client: IPv4Address | IPv6Address,
                    internal_port: int) -> None:
        for rule in self.rules:
            if rule.matches(external_port, client, internal_port):
                if rule.allow:
                    return
                break
        raise NotAuthorized("the operator's permission rules do not allow this mapping")

    def check_quota(self, count: int) -> None:
        if count >= self.quota:
            raise QuotaExceeded(f"at most {self.quota} mappings per subscriber")
