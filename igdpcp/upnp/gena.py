"""GENA subscriptions and event bodies, sans-IO (igd.md section 10).

One :class:`SubscriptionManager` per (tunnel, service).  It takes the
SUBSCRIBE / UNSUBSCRIBE headers and the caller's address, and returns the
answer or raises :class:`GenaError` with the HTTP status; it numbers event
messages and builds their bodies.  Sending is :mod:`igdpcp.upnp.gena_http`'s.

Choices:

* A callback URL must be ``http://`` with the subscribing caller's own
  address as a literal host (anti-CallStranger, clients.md R15); any other
  URL in CALLBACK makes the whole request fail with 412.
* SIDs are ``uuid:`` + uuid4, known only to the manager that made them, and
  bound to the caller who subscribed: a SID from another tunnel or another
  host is simply unknown (412).
* TIMEOUT is clamped to [:data:`MIN_TIMEOUT`, :data:`MAX_TIMEOUT`];
  absent, malformed or ``infinite`` gives :data:`DEFAULT_TIMEOUT`.
  We never answer ``infinite`` (UDA 1.1).
* At most :data:`MAX_SUBSCRIPTIONS` live subscriptions per manager, i.e.
  per (tunnel, service); one more gets 503 (a subscriber's LAN has few
  control points; the bound keeps one tunnel from costing us memory and
  NOTIFY traffic).
* Expired subscriptions are removed lazily, whenever the manager is used;
  no timers.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from igdpcp.upnp import scpd
from igdpcp.upnp.device import Service

NT_EVENT = "upnp:event"
NTS_PROPCHANGE = "upnp:propchange"
EVENT_NS = "urn:schemas-upnp-org:event-1-0"

DEFAULT_TIMEOUT = 1800  # igd.md section 10: SHOULD be >= 1800
MIN_TIMEOUT = 300  # shorter requests are raised: fewer renewals for us
MAX_TIMEOUT = 86400  # longer requests are cut: a gone CP frees its slot within a day
MAX_SUBSCRIPTIONS = 32  # per (tunnel, service)
MAX_CALLBACKS = 4  # URLs in one CALLBACK header
MAX_URL_LENGTH = 512
SEQ_MAX = 2**32 - 1  # ui4; after it SEQ wraps to 1, never 0 (pupnp)

_SECONDS = re.compile(r"Second-([0-9]{1,12})", re.IGNORECASE)
_CALLBACK = re.compile(r"\s*(?:<([^<>\s]*)>\s*)+")
_CALLBACK_URL = re.compile(r"<([^<>\s]*)>")


def evented_variables(service: Service) -> tuple[str, ...]:
    """The sendEvents="yes" variables of ``service``'s served SCPD, in SCPD order.

    The SCPD is the one table: it is also what control points read
    (WANIPConnection: PossibleConnectionTypes, ConnectionStatus,
    ExternalIPAddress, PortMappingNumberOfEntries, +SystemUpdateID in v2;
    WANCommonInterfaceConfig: PhysicalLinkStatus; igd.md sections 2, 6).
    """
    spec = scpd.default_specs().get((service.name, service.version))
    return spec.evented if spec is not None else ()


class GenaError(Exception):
    """A request GENA refuses; ``status`` is the HTTP answer (400, 412, 503)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Subscription:
    """One control point's subscription; ``seq`` is the SEQ of its next message."""

    sid: str
    caller: ipaddress.IPv4Address | ipaddress.IPv6Address
    callbacks: tuple[str, ...]
    expires: float
    seq: int = 0
    failures: int = 0  # consecutive messages no callback URL accepted

    def take_seq(self) -> int:
        """The SEQ for the next message: 0 first, +1 each, wrapping to 1 after 2**32-1."""
        seq = self.seq
        self.seq = 1 if seq >= SEQ_MAX else seq + 1
        return seq


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    """The answer to an accepted SUBSCRIBE: SID, the granted TIMEOUT, and whether it is new."""

    subscription: Subscription
    timeout: int
    new: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"SID": self.subscription.sid, "TIMEOUT": f"Second-{self.timeout}"}


@dataclass(frozen=True, slots=True)
class Event:
    """One NOTIFY to send: to ``callbacks`` in order until one accepts it."""

    sid: str
    seq: int
    callbacks: tuple[str, ...]
    body: bytes


@dataclass
class SubscriptionManager:
    """The subscriptions of one service on one tunnel.

    ``clock`` provides ``seconds()`` (the reactor, or a ``task.Clock``);
    ``evented`` defaults to :func:`evented_variables`; ``new_sid`` exists
    for tests.
    """

    service: Service
    clock: object
    evented: tuple[str, ...] | None = None
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    default_timeout: int = DEFAULT_TIMEOUT
    min_timeout: int = MIN_TIMEOUT
    max_timeout: int = MAX_TIMEOUT
    new_sid: Callable[[], str] = field(default=lambda: f"uuid:{uuid.uuid4()}")
    _subs: dict[str, Subscription] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.evented is None:
            self.evented = evented_variables(self.service)

    # -- requests ----------------------------------------------------------

    def subscribe(self, caller, headers: Mapping[str, str]) -> SubscribeResult:
        """A SUBSCRIBE: new (CALLBACK + NT) or renewal (SID only).

        ``headers`` must look names up case-insensitively (as twisted.web
        and :class:`igdpcp.upnp.ssdp.Headers` do) or use lower-case keys.
        """
        caller = _address(caller)
        sid, nt, callback = (_header(headers, n) for n in ("sid", "nt", "callback"))
        timeout = self.grant(_header(headers, "timeout"))
        self.expire()
        if sid is not None:
            if nt is not None or callback is not None:
                raise GenaError(400, "SID with NT or CALLBACK")
            sub = self._own(sid, caller)
            sub.expires = self.clock.seconds() + timeout
            return SubscribeResult(sub, timeout, new=False)
        if nt != NT_EVENT:
            raise GenaError(412, "NT must be upnp:event")
        callbacks = parse_callbacks(callback, caller)
        if len(self._subs) >= self.max_subscriptions:
            raise GenaError(503, "too many subscriptions")
        sub = Subscription(self.new_sid(), caller, callbacks, self.clock.seconds() + timeout)
        self._subs[sub.sid] = sub
        return SubscribeResult(sub, timeout, new=True)

    def unsubscribe(self, caller, headers: Mapping[str, str]) -> Subscription:
        """An UNSUBSCRIBE (SID only); returns the cancelled subscription."""
        caller = _address(caller)
        sid, nt, callback = (_header(headers, n) for n in ("sid", "nt", "callback"))
        if sid is not None and (nt is not None or callback is not None):
            raise GenaError(400, "SID with NT or CALLBACK")
        if sid is None:
            raise GenaError(412, "missing SID")
        self.expire()
        sub = self._own(sid, caller)
        del self._subs[sid]
        return sub

    def grant(self, timeout: str | None) -> int:
        """The TIMEOUT we grant for a requested ``Second-N`` (never infinite)."""
        match = _SECONDS.fullmatch(timeout.strip()) if timeout else None
        if match is None:
            return self.default_timeout
        return max(self.min_timeout, min(int(match.group(1)), self.max_timeout))

    # -- state -------------------------------------------------------------

    def get(self, sid: str) -> Subscription | None:
        """The live subscription with ``sid``, or None."""
        self.expire()
        return self._subs.get(sid)

    def drop(self, sid: str) -> None:
        """Forget a subscription (its callbacks keep failing)."""
        self._subs.pop(sid, None)

    def subscriptions(self) -> list[Subscription]:
        self.expire()
        return list(self._subs.values())

    def expire(self) -> list[Subscription]:
        """Remove and return subscriptions whose TIMEOUT has run out."""
        now = self.clock.seconds()
        gone = [s for s in self._subs.values() if s.expires <= now]
        for sub in gone:
            del self._subs[sub.sid]
        return gone

    def _own(self, sid: str, caller) -> Subscription:
        sub = self._subs.get(sid)
        if sub is None or sub.caller != caller:
            raise GenaError(412, "unknown or expired SID")
        return sub

    # -- events ------------------------------------------------------------

    def initial_event(self, sub: Subscription, state: Mapping[str, object]) -> Event:
        """The SEQ 0 message with every evented variable (UDA 1.1 section 4.2)."""
        names = self.evented
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"state lacks evented variables {missing}")
        return self._event(sub, [(n, state[n]) for n in names])

    def change_events(self, changes: Mapping[str, object]) -> list[Event]:
        """One message per live subscription for the evented variables in ``changes``.

        Variables this service does not event are ignored, so one observer
        may feed every service of a tunnel the same change dict.
        """
        names = self.evented
        values = [(n, changes[n]) for n in names if n in changes]
        if not values:
            return []
        return [self._event(sub, values) for sub in self.subscriptions()]

    def _event(self, sub: Subscription, values) -> Event:
        return Event(sub.sid, sub.take_seq(), sub.callbacks, propertyset(values))


def propertyset(values) -> bytes:
    """The NOTIFY body: one ``e:property`` per (name, value), values escaped."""
    items = values.items() if isinstance(values, Mapping) else values
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n',
             f'<e:propertyset xmlns:e="{EVENT_NS}">']
    for name, value in items:
        parts.append(f"<e:property><{name}>{escape(format_value(value))}</{name}></e:property>")
    parts.append("</e:propertyset>\n")
    return "".join(parts).encode("utf-8")


def format_value(value: object) -> str:
    """UPnP text for a state value: booleans 1/0, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def parse_callbacks(header: str | None, caller) -> tuple[str, ...]:
    """The URLs of a CALLBACK header, each checked against ``caller``; 412 if any is bad."""
    if not header or len(header) > MAX_CALLBACKS * (MAX_URL_LENGTH + 2) + 16:
        raise GenaError(412, "missing or oversized CALLBACK")
    if not _CALLBACK.fullmatch(header):
        raise GenaError(412, "CALLBACK must be <url>...")
    urls = tuple(_CALLBACK_URL.findall(header))
    if len(urls) > MAX_CALLBACKS:
        raise GenaError(412, "too many callback URLs")
    caller = _address(caller)
    for url in urls:
        if not callback_allowed(url, caller):
            raise GenaError(412, "callback URL not allowed")
    return urls


def callback_allowed(url: str, caller) -> bool:
    """True if ``url`` is http:// to the caller's own literal address (R15)."""
    if not url or len(url) > MAX_URL_LENGTH or not url.isascii():
        return False
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError if not a number in range
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme.lower() != "http" or host is None or port == 0:
        return False
    if parts.username is not None or parts.password is not None or parts.fragment:
        return False
    netloc_host = parts.netloc.rpartition("@")[2]
    if netloc_host.startswith("[") != (":" in host):  # IPv6 only in brackets, IPv4 never
        return False
    try:
        return ipaddress.ip_address(host) == _address(caller)
    except ValueError:  # a name, or a zone index: never
        return False


def _address(value):
    """An ip_address; an IPv4-mapped IPv6 caller (dual-stack listener) counts as its IPv4."""
    if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        value = ipaddress.ip_address(value)
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return value.ipv4_mapped
    return value


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.upper())
    if value is None:
        return None
    return value.strip()
