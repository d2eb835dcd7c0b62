"""SSDP wire format and search matching, sans-IO (igd.md section 7).

Pure functions from datagrams to values and back: :func:`parse` and
:func:`parse_search` read what control points send, :func:`plan_search`
decides which answers a :class:`~igdpcp.upnp.device.Device` owes and when,
and the ``build_*`` functions write our datagrams.  No sockets, no clock, no
global random: the caller passes the time and a random source, so the
Twisted adapter (:mod:`igdpcp.upnp.ssdp_protocol`) stays thin and this
module is testable and fuzzable with plain values.

Choices (clients.md R2-R5):

* Header names are case-insensitive, the space after the colon optional,
  and a line splits at its first colon only.  The start line must be exact.
* Anything malformed raises :class:`SSDPError` and nothing else.
* MX is capped at 5.  A *multicast* search without MX should be dropped
  (UDA 1.1) but real stacks send it (Coherence), so, like miniupnpd without
  ``--strict``, we answer it after a random delay of up to
  :data:`MISSING_MX_DELAY` seconds instead.  A *unicast* search is answered
  at once, MX or not.
* MAN must be exactly ``"ssdp:discover"`` (quoted).
* LOCATION is never computed here: the caller gives the IWF's address on
  the tunnel (R5: never a loopback or socket-derived address).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate

from igdpcp import __version__
from igdpcp.upnp.device import Device

# UDA 1.1 (igd.md section 7): group, port, answer limits.
MULTICAST_V4 = "239.255.255.250"
SSDP_PORT = 1900
MULTICAST_HOSTS = frozenset({
    "239.255.255.250", "[ff02::c]", "[ff05::c]", "[ff0e::c]",
})
MAX_MX = 5
MISSING_MX_DELAY = 1.0  # seconds; our choice for a multicast search without MX
DEFAULT_MAX_AGE = 1800  # CACHE-CONTROL max-age SHOULD be >= 1800
SERVER = f"Linux/6 UPnP/1.1 igdpcp/{__version__}"  # OS/ver UPnP/1.1 product/ver

MAX_DATAGRAM = 8192  # larger than any sane SSDP message; bounds the parser's work
MAX_HEADERS = 64
MAX_BOOTID = 2**31 - 1  # UDA 1.1: 31-bit non-negative
MAX_CONFIGID = 16777215

# The three start lines (UDA 1.1 section 1.1.2); kind names are ours.
M_SEARCH = "M-SEARCH"
NOTIFY = "NOTIFY"
RESPONSE = "RESPONSE"
_START_LINES = {
    "M-SEARCH * HTTP/1.1": M_SEARCH,
    "NOTIFY * HTTP/1.1": NOTIFY,
    "HTTP/1.1 200 OK": RESPONSE,
}

SSDP_ALL = "ssdp:all"
ROOTDEVICE = "upnp:rootdevice"
ALIVE = "ssdp:alive"
BYEBYE = "ssdp:byebye"
DISCOVER = '"ssdp:discover"'

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LINE_SPLIT = re.compile(r"\r?\n")
# A UPnP Forum type URN; the version is a positive decimal without leading zeros.
_TYPE_URN = re.compile(r"urn:schemas-upnp-org:(device|service):([A-Za-z0-9_.\-]{1,64}):([1-9][0-9]{0,8})")


class SSDPError(ValueError):
    """A datagram that is not a well-formed SSDP message (dropped and counted)."""


class Headers(Mapping):
    """Read-only headers, looked up case-insensitively (R3); first spelling kept for repr."""

    __slots__ = ("_items",)

    def __init__(self, pairs: Mapping[str, str] | None = None):
        self._items: dict[str, str] = {k.lower(): v for k, v in (pairs or {}).items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True, slots=True)
class SSDPMessage:
    """One parsed datagram: its kind (``M_SEARCH``, ``NOTIFY``, ``RESPONSE``) and headers."""

    kind: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """The parts of an M-SEARCH that decide the answer.

    ``mx`` is None when absent, else already capped at :data:`MAX_MX`.
    ``multicast`` comes from HOST (absent HOST counts as multicast, the
    cautious side); an adapter that knows the destination may override it.
    """

    st: str
    mx: int | None
    multicast: bool
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class SSDPIdentity:
    """What every datagram of one tunnel's device says about itself.

    ``location`` is the root description URL at the IWF's address on that
    tunnel, given by the tunnels layer.  ``boot_id`` and ``config_id`` may be
    global (igd.md section 11).
    """

    location: str
    server: str = SERVER
    boot_id: int = 1
    config_id: int = 1
    max_age: int = DEFAULT_MAX_AGE

    def __post_init__(self):
        if not (0 <= self.boot_id <= MAX_BOOTID):
            raise ValueError("BOOTID.UPNP.ORG must be a 31-bit non-negative integer")
        if not (0 <= self.config_id <= MAX_CONFIGID):
            raise ValueError("CONFIGID.UPNP.ORG must be in 0..16777215")
        if self.max_age <= 0:
            raise ValueError("max-age must be positive")
        for text in (self.location, self.server):
            if _BAD_VALUE_CHARS.search(text):
                raise ValueError("control characters in an SSDP header value")


# -- parsing ---------------------------------------------------------------

def parse(datagram: bytes) -> SSDPMessage:
    """Parse one datagram; raise :class:`SSDPError` if it is not SSDP (R3, R5).

    Headers end at the first empty line or at the end of the datagram; any
    body after the empty line is ignored (SSDP has none).
    """
    if not isinstance(datagram, (bytes, bytearray)):
        raise SSDPError("datagram must be bytes")
    if len(datagram) > MAX_DATAGRAM:
        raise SSDPError("datagram too large")
    text = bytes(datagram).decode("latin-1")  # total and lossless; values checked below
    lines = _LINE_SPLIT.split(text)
    kind = _START_LINES.get(lines[0])
    if kind is None:
        raise SSDPError("not an SSDP start line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line == "":
            break
        if line[0] in " \t":
            raise SSDPError("folded header line")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise SSDPError("bad header line")
        value = value.strip(" \t")
        if _BAD_VALUE_CHARS.search(value):
            raise SSDPError("control character in header value")
        key = name.lower()
        if key in headers:
            raise SSDPError("duplicate header")
        if len(headers) >= MAX_HEADERS:
            raise SSDPError("too many headers")
        headers[key] = value
    return SSDPMessage(kind, Headers(headers))


def parse_search(message: SSDPMessage) -> SearchRequest:
    """Check an M-SEARCH (MAN, ST, MX) and extract what the answer needs."""
    if message.kind != M_SEARCH:
        raise SSDPError("not an M-SEARCH")
    headers = message.headers
    if headers.get("man") != DISCOVER:
        raise SSDPError('MAN must be "ssdp:discover"')
    st = headers.get("st")
    if not st:
        raise SSDPError("missing ST")
    mx = _parse_mx(headers.get("mx"))
    host = headers.get("host")
    multicast = host is None or _host_part(host) in MULTICAST_HOSTS
    return SearchRequest(st, mx, multicast, headers.get("user-agent"))


def _parse_mx(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise SSDPError("MX must be a non-negative integer")
    value = value.lstrip("0") or "0"
    return MAX_MX if len(value) > 1 else min(int(value), MAX_MX)  # a device SHOULD treat MX > 5 as 5


def _host_part(host: str) -> str:
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


# -- what a device advertises and answers ------------------------------------

def advertisement_set(root: Device) -> list[tuple[str, str]]:
    """The (NT, USN) pairs of the announcement set: 3 + 2d + k (UDA 1.1 section 1.2.2)."""
    pairs = [(ROOTDEVICE, f"{root.udn}::{ROOTDEVICE}")]
    for device in root.walk():
        pairs.append((device.udn, device.udn))
        pairs.append((device.device_type, f"{device.udn}::{device.device_type}"))
        for service_type in _service_types(device):
            pairs.append((service_type, f"{device.udn}::{service_type}"))
    return pairs


def search_answers(root: Device, st: str) -> list[tuple[str, str]]:
    """The (ST, USN) pairs owed to a search for ``st``; empty if nothing matches.

    A device answers every version up to its own and echoes the version
    searched for (UDA 1.1 section 1.3.2, R2): an IGD:2 answers IGD:1 as :1.
    """
    if st == SSDP_ALL:
        return advertisement_set(root)
    if st == ROOTDEVICE:
        return [(ROOTDEVICE, f"{root.udn}::{ROOTDEVICE}")]
    if st.startswith("uuid:"):
        return [(d.udn, d.udn) for d in root.walk() if d.udn.lower() == st.lower()]
    match = _TYPE_URN.fullmatch(st)
    if match is None:
        return []
    kind, name, version = match.group(1), match.group(2), int(match.group(3))
    answers = []
    for device in root.walk():
        if kind == "device":
            if device.name == name and version <= device.version:
                answers.append((st, f"{device.udn}::{st}"))
        elif any(s.name == name and version <= s.version for s in device.services):
            answers.append((st, f"{device.udn}::{st}"))
    return answers


def response_delay_bound(search: SearchRequest) -> float:
    """Upper bound of the random answer delay, in seconds (see the module docstring)."""
    if not search.multicast:
        return 0.0
    if search.mx is None:
        return MISSING_MX_DELAY
    return float(search.mx)


def plan_search(root: Device, search: SearchRequest, rng) -> list[tuple[float, str, str]]:
    """(delay, ST, USN) for each answer; each delay drawn in 0..bound from ``rng``.

    Several answers (ssdp:all) get independent delays, which spreads them
    over the MX window as UDA 1.1 section 1.3.3 asks.  ``rng`` needs only
    ``uniform(a, b)`` (a :class:`random.Random`).
    """
    answers = search_answers(root, search.st)
    bound = response_delay_bound(search)
    return [(rng.uniform(0.0, bound) if bound else 0.0, st, usn) for st, usn in answers]


def _service_types(device: Device) -> list[str]:
    seen: list[str] = []
    for service in device.services:
        if service.service_type not in seen:
            seen.append(service.service_type)
    return seen


# -- building ----------------------------------------------------------------

def _render(start: str, fields: list[tuple[str, str | int]]) -> bytes:
    lines = [start] + [f"{name}: {value}" if value != "" else f"{name}:" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_date(now: float) -> str:
    """RFC 1123 date for the DATE header."""
    return formatdate(now, usegmt=True)


def build_response(identity: SSDPIdentity, st: str, usn: str, now: float) -> bytes:
    """An M-SEARCH answer (UDA 1.1 section 1.3.3); ``now`` is POSIX time for DATE."""
    return _render("HTTP/1.1 200 OK", [
        ("CACHE-CONTROL", f"max-age={identity.max_age}"),
        ("DATE", http_date(now)),
        ("EXT", ""),
        ("LOCATION", identity.location),
        ("SERVER", identity.server),
        ("ST", st),
        ("USN", usn),
        ("BOOTID.UPNP.ORG", identity.boot_id),
        ("CONFIGID.UPNP.ORG", identity.config_id),
    ])


def build_notify(identity: SSDPIdentity, nt: str, usn: str, nts: str,
                 host: str = f"{MULTICAST_V4}:{SSDP_PORT}") -> bytes:
    """One NOTIFY; byebye carries no CACHE-CONTROL, LOCATION or SERVER (igd.md section 7 table)."""
    if nts == ALIVE:
        fields = [
            ("HOST", host),
            ("CACHE-CONTROL", f"max-age={identity.max_age}"),
            ("LOCATION", identity.location),
            ("NT", nt),
            ("NTS", ALIVE),
            ("SERVER", identity.server),
            ("USN", usn),
        ]
    elif nts == BYEBYE:
        fields = [("HOST", host), ("NT", nt), ("NTS", BYEBYE), ("USN", usn)]
    else:
        raise ValueError(f"unsupported NTS {nts!r}")
    fields += [("BOOTID.UPNP.ORG", identity.boot_id), ("CONFIGID.UPNP.ORG", identity.config_id)]
    return _render("NOTIFY * HTTP/1.1", fields)


def alive_set(identity: SSDPIdentity, root: Device,
              host: str = f"{MULTICAST_V4}:{SSDP_PORT}") -> list[bytes]:
    """The whole ssdp:alive announcement set for ``root``."""
    return [build_notify(identity, nt, usn, ALIVE, host) for nt, usn in advertisement_set(root)]


def byebye_set(identity: SSDPIdentity, root: Device,
               host: str = f"{MULTICAST_V4}:{SSDP_PORT}") -> list[bytes]:
    """One ssdp:byebye per alive (UDA 1.1 section 1.2.3)."""
    return [build_notify(identity, nt, usn, BYEBYE, host) for nt, usn in advertisement_set(root)]
