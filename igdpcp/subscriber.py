"""The one value that carries a subscriber's identity down through the layers.

``tunnels/`` creates it; nothing below looks at sockets or interfaces.  The
THIRD_PARTY_ID is operator data (RFC 7843 section 7): ``repr`` shows only a
keyed pseudonym, so a stray log line or traceback cannot leak it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

_PSEUDONYM_KEY = os.urandom(16)


def set_pseudonym_key(key: bytes) -> None:
    """Let an operator make pseudonyms stable across restarts (config ``privacy.log_key``)."""
    global _PSEUDONYM_KEY
    _PSEUDONYM_KEY = bytes(key)


def pseudonym(value: bytes | str) -> str:
    """A short keyed hash of an identifier, safe to log (not reversible without the key)."""
    if isinstance(value, str):
        value = value.encode()
    return "p-" + hmac.new(_PSEUDONYM_KEY, value, hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A subscriber as the operator knows it: the tunnel and its THIRD_PARTY_ID.

    ``server`` names the PCP server (CGN) that holds this subscriber's mappings;
    it is chosen per subscriber so subscribers can later move between CGNs.
    """

    tunnel: str
    third_party_id: bytes = field(repr=False)
    server: str = "default"

    @property
    def key(self) -> str:
        """Stable key for stores and tables (tunnel name, not the ID)."""
        return self.tunnel

    def __repr__(self) -> str:
        return f"Subscriber({pseudonym(self.tunnel)})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Caller:
    """One UPnP control point: a host on a subscriber's LAN (addresses overlap across tunnels)."""

    subscriber: Subscriber
    address: IPv4Address | IPv6Address

    def __repr__(self) -> str:
        return f"Caller({self.subscriber!r})"

    __str__ = __repr__
