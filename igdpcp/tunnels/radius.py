"""THIRD_PARTY_ID from AAA: one RADIUS Access-Request per tunnel (RFC 7843 section 3.1).

The BRAS registers a subscriber's tunnel IDs with AAA when the subscriber
authenticates; the IWF asks AAA, by the tunnel a UPnP request arrived on, for
the ID of the BRAS-CGN tunnel, which goes into THIRD_PARTY_ID.

Attribute contract (names from the shipped ``radius.dictionary``):

- Access-Request (RFC 2865 section 4.1) carries
  Message-Authenticator (80, RFC 3579 section 3.2; first, against BlastRADIUS),
  the tunnel's interface name in each of ``name_attributes`` (default
  User-Name (1) and NAS-Port-Id (87, RFC 2869 section 5.17)),
  NAS-Identifier (32) = ``nas_identifier``, and User-Password (2, hidden per
  RFC 2865 section 5.2) only when a ``password`` is configured.
- Access-Accept carries the ID in exactly one ``attribute`` (default Class
  (25), octets, RFC 2865 section 5.25), read per ``format``: "octets" (the
  value is the ID as it goes on the wire), "spec" (text such as ``gre:7``,
  :func:`igdpcp.pcp.tpid.parse`), or a technology name ("vxlan", "vlan",
  "l2tpv3", "gre", "mpls": an integer, or decimal text, encoded per RFC 7843
  section 4).  No such attribute, or more than one: :class:`BadId`.
- Access-Reject: :class:`AaaRejected`.  No valid reply after the first
  transmission and ``retries`` retransmissions, ``timeout`` seconds apart:
  :class:`AaaUnreachable`.

Replies are matched by Identifier and source, and must pass the Response
Authenticator and Message-Authenticator checks (``VerifyReply``); anything
else is dropped and counted.  Retransmissions repeat the packet unchanged
(same Identifier and Request Authenticator, RFC 5080 section 2.2.1).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from importlib import resources
from ipaddress import ip_address

from pyrad import packet as rpacket
from pyrad.dictionary import Dictionary
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from ..interfaces import IThirdPartyIdSource
from ..logs import logger
from ..pcp import tpid
from ..subscriber import pseudonym
from .idsource import AaaRejected, AaaUnreachable, BadId, TunnelInfo

log = logger(__name__)

FORMATS = ("octets", "spec", *tpid.TECHNOLOGIES)


def load_dictionary(path: str | None = None) -> Dictionary:
    """``path``, or the dictionary shipped next to this module."""
    if path is not None:
        return Dictionary(path)
    with resources.files(__package__).joinpath("radius.dictionary").open("r", encoding="ascii") as f:
        return Dictionary(f)


# -- sans-IO: the request and the reading of its reply -------------------------------------


def build_request(dictionary: Dictionary, secret: bytes, ident: int, tunnel_name: str, *,
                  nas_identifier: str, name_attributes=("User-Name", "NAS-Port-Id"),
                  password: bytes | None = None) -> rpacket.AuthPacket:
    """The Access-Request asking for ``tunnel_name``'s ID (see the module docstring)."""
    req = rpacket.AuthPacket(code=rpacket.AccessRequest, id=ident, secret=secret, dict=dictionary)
    for name in name_attributes:
        req.AddAttribute(name, tunnel_name)
    req.AddAttribute("NAS-Identifier", nas_identifier)
    if password is not None:
        req.AddAttribute("User-Password", req.PwCrypt(password))  # creates the Request Authenticator
    req.add_message_authenticator()  # computed when encoded, placed first
    return req


def _convert(value, fmt: str) -> bytes:
    if fmt == "octets":
        if isinstance(value, int):
            raise ValueError("an integer attribute needs a technology format")
        return tpid.opaque(value)
    text = value.decode("ascii") if isinstance(value, bytes) else value
    if fmt == "spec":
        if not isinstance(text, str):
            raise ValueError("spec format needs a text attribute")
        return tpid.parse(text)
    if isinstance(text, str):
        if not text.isdigit():
            raise ValueError(f"{fmt} needs a decimal number")
        text = int(text, 10)
    return tpid.encode(fmt, text)


def id_from_reply(reply: rpacket.Packet, attribute: str, fmt: str = "octets") -> bytes:
    """The ID in a verified reply, or :class:`AaaRejected` / :class:`BadId`.
    Messages never contain the value."""
    if reply.code == rpacket.AccessReject:
        raise AaaRejected("Access-Reject")
    if reply.code != rpacket.AccessAccept:
        raise BadId(f"unexpected RADIUS code {reply.code}")
    values = reply.get(attribute) or []
    if len(values) != 1:
        raise BadId(f"Access-Accept has {len(values)} {attribute} attributes, expected 1")
    try:
        return _convert(values[0], fmt)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadId(f"{attribute} is not a valid {fmt} ID: {type(e).__name__}") from None


# -- the client on the reactor --------------------------------------------------------------


class _Socket(DatagramProtocol):
    """Thin adapter: datagrams to :meth:`RadiusIds._received`."""

    def __init__(self, owner):
        self.owner = owner

    def datagramReceived(self, data, addr):
        self.owner._received(data, addr)


@dataclass(eq=False, repr=False)
class _Lookup:
    key: tuple
    tunnel: TunnelInfo
    packet: rpacket.AuthPacket | None = None
    raw: bytes = b""
    sends: int = 0
    timer: object = None
    forgotten: bool = False

    def __repr__(self) -> str:  # the packet holds the tunnel name in clear
        return f"_Lookup({self.tunnel!r}, sends={self.sends})"


@implementer(IThirdPartyIdSource)
class RadiusIds:
    """Ask a RADIUS server for each tunnel's THIRD_PARTY_ID; cache, coalesce, retransmit.

    Answers are cached per (interface name, ifindex) for ``ttl`` seconds (a
    re-created interface is asked about again); Access-Reject and bad answers
    for ``negative_ttl``; timeouts are not cached.  Concurrent lookups of one
    tunnel share one request.  At most 256 requests are outstanding (the
    Identifier space of one socket, RFC 2865 section 3); more wait in a queue.
    """

    def __init__(self, reactor, server: tuple[str, int], secret: bytes | str,
                 nas_identifier: str = "igdpcp", *, ttl: float = 300.0, negative_ttl: float = 10.0,
                 timeout: float = 2.0, retries: int = 2, attribute: str = "Class",
                 format: str = "octets", name_attributes=("User-Name", "NAS-Port-Id"),
                 password: bytes | str | None = None, dictionary: str | Dictionary | None = None,
                 require_message_authenticator: bool = False, bind: str | None = None, rng=None):
        self.reactor = reactor
        host, port = server
        self._server_ip = ip_address(host)
        self.server = (str(self._server_ip), int(port))
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not self._secret:
            raise ValueError("the RADIUS secret must not be empty")
        self._password = password.encode() if isinstance(password, str) else password
        self.nas_identifier = nas_identifier
        self.ttl, self.negative_ttl = float(ttl), float(negative_ttl)
        self.timeout, self.retries = float(timeout), int(retries)
        if self.timeout <= 0 or self.retries < 0 or self.ttl < 0 or self.negative_ttl < 0:
            raise ValueError("timeout must be > 0; retries, ttl, negative_ttl >= 0")
        self.dictionary = dictionary if isinstance(dictionary, Dictionary) else load_dictionary(dictionary)
        self.name_attributes = tuple(name_attributes)
        for name in (attribute, "NAS-Identifier", "Message-Authenticator", *self.name_attributes,
                     *(["User-Password"] if password is not None else [])):
            if name not in self.dictionary.attributes:
                raise ValueError(f"attribute {name!r} is not in the RADIUS dictionary")
        if not self.name_attributes:
            raise ValueError("name_attributes must name at least one attribute")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        self.attribute, self.format = attribute, format
        self.require_message_authenticator = require_message_authenticator
        self.bind = bind if bind is not None else ("::" if self._server_ip.version == 6 else "0.0.0.0")
        self.rng = rng or random.SystemRandom()
        self.stats = dict.fromkeys(
            ("requests", "sends", "retransmits", "timeouts", "accepts", "rejects", "bad_answers",
             "cache_hits", "coalesced", "dropped", "queued"), 0)
        self._port = self._proto = None
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._next_sweep = 0.0
        self._inflight: dict[tuple, list[defer.Deferred]] = {}
        self._by_id: dict[int, _Lookup] = {}
        self._queue: deque[_Lookup] = deque()

    def __repr__(self) -> str:  # the secret stays out of reprs and tracebacks
        return f"RadiusIds({self.server[0]}:{self.server[1]})"

    # -- life

    def start(self) -> None:
        """Open the client socket.  Not connect()ed: on Linux a connected UDP socket
        reports ICMP errors, which Twisted's epoll reactor treats as a lost connection."""
        if self._port is None or self._proto.transport is None:
            self._proto = _Socket(self)
            self._port = self.reactor.listenUDP(0, self._proto, interface=self.bind)

    def stop(self) -> defer.Deferred:
        """Close the socket; lookups in flight fail with :class:`AaaUnreachable`."""
        port, self._port = self._port, None
        for lookup in list(self._by_id.values()) + list(self._queue):
            self._finish(lookup, AaaUnreachable("RADIUS client stopped"), None)
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    # -- IThirdPartyIdSource

    def third_party_id(self, tunnel: TunnelInfo) -> defer.Deferred:
        key = (tunnel.name, tunnel.ifindex)
        now = self.reactor.seconds()
        hit = self._cache.get(key)
        if hit is not None:
            if now < hit[0]:
                self.stats["cache_hits"] += 1
                value = hit[1]
                return defer.succeed(value) if isinstance(value, bytes) else defer.fail(value)
            del self._cache[key]
        d = defer.Deferred(lambda d: self._cancel(key, d))
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.stats["coalesced"] += 1
            waiters.append(d)
            return d
        self._inflight[key] = [d]
        self.stats["requests"] += 1
        self._begin(_Lookup(key, tunnel))
        return d

    def forget(self, tunnel: TunnelInfo) -> None:
        for key in [k for k in self._cache if k[0] == tunnel.name]:
            del self._cache[key]
        for lookup in list(self._by_id.values()) + list(self._queue):
            if lookup.key[0] == tunnel.name:
                lookup.forgotten = True  # its answer goes to its waiters but not into the cache

    # -- requests

    def _cancel(self, key, d) -> None:
        waiters = self._inflight.get(key)
        if waiters and d in waiters:
            waiters.remove(d)  # the request goes on: its answer still fills the cache

    def _begin(self, lookup: _Lookup) -> None:
        self.start()
        if len(self._by_id) >= 256:
            self.stats["queued"] += 1
            self._queue.append(lookup)
            return
        ident = self.rng.choice([i for i in range(256) if i not in self._by_id])
        lookup.packet = build_request(
            self.dictionary, self._secret, ident, lookup.tunnel.name, nas_identifier=self.nas_identifier,
            name_attributes=self.name_attributes, password=self._password)
        lookup.raw = lookup.packet.RequestPacket()
        self._by_id[ident] = lookup
        self._send(lookup)

    def _send(self, lookup: _Lookup) -> None:
        lookup.sends += 1
        self.stats["sends"] += 1
        lookup.timer = self.reactor.callLater(self.timeout, self._expired, lookup)
        try:
            self.start()  # again, should the socket have been lost
            self._proto.transport.write(lookup.raw, self.server)
        except OSError as e:  # e.g. no route: the schedule goes on
            log.warn("RADIUS send failed: {error}", error=e)

    def _expired(self, lookup: _Lookup) -> None:
        lookup.timer = None
        if self._by_id.get(lookup.packet.id) is not lookup:
            return  # finished meanwhile
        if lookup.sends <= self.retries:
            self.stats["retransmits"] += 1
            self._send(lookup)
            return
        self.stats["timeouts"] += 1
        log.warn("RADIUS server {server} did not answer for {tunnel} ({n} transmissions)",
                 server=f"{self.server[0]}:{self.server[1]}", tunnel=pseudonym(lookup.tunnel.name),
                 n=lookup.sends)
        self._finish(lookup, AaaUnreachable(f"no RADIUS answer after {lookup.sends} transmissions"), None)

    def _received(self, data: bytes, addr) -> None:
        try:
            same = ip_address(addr[0].split("%")[0]) == self._server_ip and addr[1] == self.server[1]
        except ValueError:
            same = False
        lookup = self._by_id.get(data[1]) if same and len(data) >= 20 else None
        if lookup is None:
            self.stats["dropped"] += 1  # foreign, short, or a late answer to a finished request
            return
        try:
            reply = lookup.packet.CreateReply(packet=data)
            valid = lookup.packet.VerifyReply(reply, data, enforce_ma=self.require_message_authenticator)
        except Exception:  # pyrad raises PacketError and others on malformed input
            valid = False
        if not valid:
            self.stats["dropped"] += 1
            log.warn("dropped a RADIUS reply that failed verification")
            return
        try:
            value = id_from_reply(reply, self.attribute, self.format)
        except AaaRejected as e:
            self.stats["rejects"] += 1
            log.info("RADIUS rejected {tunnel}", tunnel=pseudonym(lookup.tunnel.name))
            self._finish(lookup, e, self.negative_ttl)
        except BadId as e:
            self.stats["bad_answers"] += 1
            log.warn("RADIUS answer for {tunnel} unusable: {reason}",
                     tunnel=pseudonym(lookup.tunnel.name), reason=str(e))
            self._finish(lookup, e, self.negative_ttl)
        else:
            self.stats["accepts"] += 1
            log.debug("RADIUS gave the ID of {tunnel}", tunnel=pseudonym(lookup.tunnel.name))
            self._finish(lookup, value, self.ttl)

    def _finish(self, lookup: _Lookup, result, ttl: float | None) -> None:
        if lookup.timer is not None and lookup.timer.active():
            lookup.timer.cancel()
        lookup.timer = None
        if lookup.packet is not None and self._by_id.get(lookup.packet.id) is lookup:
            del self._by_id[lookup.packet.id]
        elif lookup in self._queue:
            self._queue.remove(lookup)
        if ttl and not lookup.forgotten:
            self._remember(lookup.key, result, ttl)
        for d in self._inflight.pop(lookup.key, []):
            if isinstance(result, bytes):
                d.callback(result)
            else:
                d.errback(result)
        while self._queue and len(self._by_id) < 256 and self._port is not None:
            self._begin(self._queue.popleft())

    def _remember(self, key, result, ttl: float) -> None:
        now = self.reactor.seconds()
        if now >= self._next_sweep:  # drop expired entries now and then, not per lookup
            for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[k]
            self._next_sweep = now + max(self.ttl, 1.0)
        self._cache[key] = (now + ttl, result)


# -- configuration --------------------------------------------------------------------------

_KEYS = {"server", "secret", "secret_file", "nas_identifier", "name_attributes", "password",
         "password_file", "attribute", "format", "ttl", "negative_ttl", "timeout", "retries",
         "require_message_authenticator", "dictionary", "bind"}


def parse_server(text: str) -> tuple[str, int]:
    """``"127.0.0.1:1812"``, ``"[::1]:1812"`` or a bare address (port 1812)."""
    host, port = text, 1812
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def _read_secret(table: dict, key: str, err) -> bytes | None:
    inline, path = table.get(key), table.get(f"{key}_file")
    if inline is not None and path is not None:
        raise err(f"radius.{key}", f"give {key} or {key}_file, not both")
    if path is not None:
        try:
            with open(path, "rb") as f:
                return f.read().strip()
        except OSError as e:
            raise err(f"radius.{key}_file", f"cannot read: {e.strerror}") from None
    if inline is not None and not isinstance(inline, str):
        raise err(f"radius.{key}", "expected a string")
    return inline.encode() if inline is not None else None


def radius_from_config(table: dict, reactor, err) -> RadiusIds:
    """:class:`RadiusIds` from the ``[ids.radius]`` table (shape in ``idsource.make_source``).
    ``err(key, message)`` builds the config error; messages never contain the secret."""
    for key in table:
        if key not in _KEYS:
            raise err(f"radius.{key}", "unknown key")
    if "server" not in table:
        raise err("radius.server", "required")
    try:
        server = parse_server(str(table["server"]))
    except ValueError as e:
        raise err("radius.server", str(e)) from None
    secret = _read_secret(table, "secret", err)
    if not secret:
        raise err("radius.secret", "required (secret or secret_file)")
    kwargs = {}
    for key, kind in (("nas_identifier", str), ("attribute", str), ("format", str), ("ttl", (int, float)),
                      ("negative_ttl", (int, float)), ("timeout", (int, float)), ("retries", int),
                      ("require_message_authenticator", bool), ("dictionary", str), ("bind", str),
                      ("name_attributes", list)):
        if key in table:
            value = table[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise err(f"radius.{key}", f"wrong type {type(value).__name__}")
            kwargs[key] = value
    try:
        return RadiusIds(reactor, server, secret, password=_read_secret(table, "password", err), **kwargs)
    except (ValueError, OSError) as e:
        raise err("radius", str(e)) from None
