"""The IWF's local mapping table (RFC 6970 section 5.3): one per subscriber.

A :class:`MappingRecord` is the UPnP view of a mapping plus its PCP state
(nonce, server, granted address/port/lifetime, lease end).  It is what the
store persists.  All times are the reactor's wall-clock seconds so they
survive a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from ..subscriber import Subscriber
from .model import MappingKey, MappingView

PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17}


@dataclass(frozen=True, slots=True)
class MappingRecord:
    subscriber: Subscriber
    remote_host: IPv4Address | IPv6Address | None
    external_port: int  # the UPnP external port (for AddAnyPortMapping: the reserved one)
    protocol: str
    internal_client: IPv4Address | IPv6Address
    internal_port: int
    description: str
    enabled: bool
    lease: int | None  # requested UPnP lease, None = infinite
    lease_end: float | None  # absolute, None = infinite
    any_port: bool  # made by AddAnyPortMapping (no PREFER_FAILURE on re-creation)
    nonce: bytes = field(repr=False)
    server: str
    external_address: IPv4Address | IPv6Address | None = None
    granted_lifetime: int = 0
    granted_at: float = 0.0

    @property
    def key(self) -> MappingKey:
        return MappingKey(self.remote_host, self.external_port, self.protocol)

    @property
    def internal_tuple(self) -> tuple:
        """How PCP names the mapping (RFC 6887 section 11.1): one external port per tuple."""
        return (self.internal_client, self.protocol, self.internal_port)

    @property
    def pcp_expiry(self) -> float:
        return self.granted_at + self.granted_lifetime

    def view(self, now: float) -> MappingView:
        remaining = 0 if self.lease_end is None else max(0, int(self.lease_end - now))
        return MappingView(self.remote_host, self.external_port, self.protocol, self.internal_port,
                           self.internal_client, self.enabled, self.description, self.lease,
                           remaining, self.external_address)

    def granted(self, address, lifetime: int, now: float) -> "MappingRecord":
        # Built field by field: dataclasses.replace costs several times more
        # and this runs for every answer from the CGN.
        return MappingRecord(self.subscriber, self.remote_host, self.external_port, self.protocol,
                             self.internal_client, self.internal_port, self.description, self.enabled,
                             self.lease, self.lease_end, self.any_port, self.nonce, self.server,
                             address, lifetime, now)

    # -- persistence (plain columns; the store knows nothing of these types)
    def to_row(self) -> dict:
        return {
            "tunnel": self.subscriber.tunnel,
            "third_party_id": self.subscriber.third_party_id,
            "server": self.server,
            "remote_host": "" if self.remote_host is None else str(self.remote_host),
            "external_port": self.external_port,
            "protocol": self.protocol,
            "internal_client": str(self.internal_client),
            "internal_port": self.internal_port,
            "description": self.description,
            "enabled": int(self.enabled),
            "lease": self.lease,
            "lease_end": self.lease_end,
            "any_port": int(self.any_port),
            "nonce": self.nonce,
            "external_address": "" if self.external_address is None else str(self.external_address),
            "granted_lifetime": self.granted_lifetime,
            "granted_at": self.granted_at,
        }

    @classmethod
    def from_row(cls, row: dict) -> "MappingRecord":
        subscriber = Subscriber(row["tunnel"], bytes(row["third_party_id"]), row["server"])
        return cls(
            subscriber=subscriber,
            remote_host=ip_address(row["remote_host"]) if row["remote_host"] else None,
            external_port=row["external_port"],
            protocol=row["protocol"],
            internal_client=ip_address(row["internal_client"]),
            internal_port=row["internal_port"],
            description=row["description"],
            enabled=bool(row["enabled"]),
            lease=row["lease"],
            lease_end=row["lease_end"],
            any_port=bool(row["any_port"]),
            nonce=bytes(row["nonce"]),
            server=row["server"],
            external_address=ip_address(row["external_address"]) if row["external_address"] else None,
            granted_lifetime=row["granted_lifetime"],
            granted_at=row["granted_at"],
        )


class SubscriberTable:
    """One subscriber's mappings: by UPnP key, by PCP internal tuple, and in a
    stable order for GetGenericPortMappingEntry indexes."""

    __slots__ = ("by_key", "by_internal", "order", "update_id", "external_address")

    def __init__(self) -> None:
        self.by_key: dict[MappingKey, MappingRecord] = {}
        self.by_internal: dict[tuple, MappingKey] = {}
        self.order: list[MappingKey] = []
        self.update_id = 0  # SystemUpdateID: +1 per change of the table
        self.external_address = None

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: MappingKey) -> MappingRecord | None:
        return self.by_key.get(key)

    def by_tuple(self, internal_tuple: tuple) -> MappingRecord | None:
        key = self.by_internal.get(internal_tuple)
        return None if key is None else self.by_key[key]

    def at(self, index: int) -> MappingRecord | None:
        if 0 <= index < len(self.order):
            return self.by_key[self.order[index]]
        return None

    def put(self, record: MappingRecord) -> bool:
        """Insert or replace; True when the set of keys changed."""
        key = record.key
        old = self.by_key.get(key)
        if old is not None and old.internal_tuple != record.internal_tuple:
            self.by_internal.pop(old.internal_tuple, None)
        self.by_key[key] = record
        self.by_internal[record.internal_tuple] = key
        if old is None:
            self.order.append(key)
            self.update_id += 1
        return old is None

    def remove(self, key: MappingKey) -> MappingRecord | None:
        record = self.by_key.pop(key, None)
        if record is not None:
            if self.by_internal.get(record.internal_tuple) == key:
                del self.by_internal[record.internal_tuple]
            self.order.remove(key)
            self.update_id += 1
        return record

    def records(self):
        return [self.by_key[k] for k in self.order]
