"""The lab CGN: a PCP server (RFC 6887) that behaves like RFC 7843's L2-aware CGN.

Sans-IO: :meth:`LabCGN.handle` takes a datagram, its source and the time and
returns the answer's bytes (or None); it never touches a socket or a clock.
Mappings are keyed by (THIRD_PARTY_ID, internal address, protocol, internal
port), so subscribers with overlapping private addresses stay apart
(RFC 7843 section 5.2).  There is no data plane: mappings are bookkeeping only.
"""

from __future__ import annotations

import functools

import math
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import ip_address
from itertools import chain, islice

from igdpcp.pcp.codec import (
    ANY_IPV4,
    ANY_IPV6,
    Address,
    Description,
    Filter,
    MapBody,
    PCPDecodeError,
    PeerBody,
    PreferFailure,
    Response,
    ThirdParty,
    ThirdPartyId,
    UnknownOption,
    decode_request,
    encode_response,
    pack_address,
    unpack_address,
)
from igdpcp.pcp.constants import (
    ANNOUNCE_GROUP_V4,
    CLIENT_PORT,
    HEADER_SIZE,
    LONG_ERROR_LIFETIME,
    MAX_MESSAGE_SIZE,
    PCP_VERSION,
    PROTOCOL_TCP,
    PROTOCOL_UDP,
    SHORT_ERROR_LIFETIME,
    LifetimeClass,
    Opcode,
    ResultCode,
    lifetime_class,
    option_is_mandatory,
)

from .config import CGNConfig

R = ResultCode
_ANY = (ANY_IPV4, ANY_IPV6)
_PROTOCOLS = (PROTOCOL_TCP, PROTOCOL_UDP)
_FORBIDDEN_UDP = (5350, 5351)  # section 11.3: never map the PCP ports
_PROBES = 16  # random port probes before a scan
_ADDRESS_TRIES = 16  # pool addresses tried for one suggested port
MAX_KNOWN_CLIENTS = 1024  # sources remembered for unsolicited ANNOUNCE
_RESULT_KEYS = {int(r): f"result.{r.name}" for r in ResultCode}
_ERROR_HEADER = struct.Struct("!BBxBII")
_KEY_TAIL = struct.Struct("!16sBH")  # internal address, protocol, internal port


def _key(third_party_id: bytes, internal, protocol: int, port: int) -> bytes:
    """The table key, one bytes object to keep a mapping small: THIRD_PARTY_ID
    (or nothing), then 19 fixed octets of internal address, protocol and port."""
    return third_party_id + _KEY_TAIL.pack(pack_address(internal), protocol, port)


def _split_key(key: bytes) -> tuple:
    """(THIRD_PARTY_ID, internal address, protocol, internal port)."""
    address, protocol, port = _KEY_TAIL.unpack_from(key, len(key) - _KEY_TAIL.size)
    return key[:-_KEY_TAIL.size], unpack_address(address), protocol, port


def _subscriber(key: bytes):
    """Whose quota a mapping counts against: its THIRD_PARTY_ID when it has one,
    else its internal address (an int, so it never equals an ID)."""
    size = _KEY_TAIL.size
    return key[:-size] or int.from_bytes(key[-size:-3], "big")


@dataclass(slots=True, eq=False)
class Mapping:
    """One mapping.  ``ext`` packs (pool index << 24 | protocol << 16 | port):
    the key of the external index, and all the mapping needs to name its
    external side."""

    key: bytes  # see _key()
    nonce: bytes
    ext: int
    expires: float
    filters: tuple = ()
    description: str | None = None


class _Reject(Exception):
    """Stop processing and answer ``result`` (section 7.4).  ``lifetime`` None
    means the recommended one for the code's class."""

    def __init__(self, result: ResultCode, lifetime: int | None = None):
        super().__init__(result)
        self.result = result
        self.lifetime = lifetime


@dataclass(slots=True)
class _Options:
    """What a request's options ask for, once checked (section 7.3)."""

    third_party: ThirdParty | None = None
    third_party_id: bytes = b""
    prefer_failure: bool = False
    filters: list = field(default_factory=list)
    description: str | None = None
    echo: list = field(default_factory=list)  # processed options, for a success answer


def _error_lifetime(result: ResultCode, lifetime: int | None) -> int:
    if lifetime is not None:
        return lifetime
    cls = lifetime_class(result)
    return SHORT_ERROR_LIFETIME if cls is LifetimeClass.SHORT else LONG_ERROR_LIFETIME


@functools.lru_cache(maxsize=4096)  # a handful of clients send most requests
def _normalise(source) -> Address:
    """The packet's source as the codec decodes addresses (IPv4 unmapped, section 5)."""
    address = source if not isinstance(source, str) else ip_address(source)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _filter_ok(f: Filter) -> bool:
    """Prefix length counts over 128 bits; IPv4 peers need 96..128, 0 clears (section 13.3)."""
    if f.prefix_length == 0:
        return True
    low = 96 if f.remote_address.version == 4 else 1
    return low <= f.prefix_length <= 128


def _merge_filters(current: tuple, new: list) -> tuple:
    """New FILTERs add to the old; a prefix-0 FILTER removes all before it (section 13.3)."""
    out = list(current)
    for f in new:
        if f.prefix_length == 0:
            out.clear()
        elif f not in out:
            out.append(f)
    return tuple(out)


class LabCGN:
    """PCP server state and request processing.  ``now`` is any monotonic seconds count."""

    def __init__(self, config: CGNConfig | None = None, now: float = 0.0,
                 rng: random.Random | None = None):
        self.config = config = config or CGNConfig()
        self.rng = rng or random.Random()
        self.counters: Counter = Counter()  # received, dropped.*, result.*, announce.*
        self._pool = config.pool_addresses()
        self._pool_index = {a: i for i, a in enumerate(self._pool)}
        self._family = {v: [i for i, a in enumerate(self._pool) if a.version == v] for v in (4, 6)}
        lo, hi = config.port_range
        self._capacity = {p: hi - lo + 1 for p in _PROTOCOLS}
        self._capacity[PROTOCOL_UDP] -= sum(lo <= p <= hi for p in _FORBIDDEN_UDP)
        self._clients: dict = {}  # (host, port) -> None, oldest first
        self.reboot(now)
        self.counters.clear()

    # ------------------------------------------------------------ state

    def reboot(self, now: float) -> None:
        """Lose all mappings and restart the epoch at 0 (section 8.5); known clients stay."""
        self._boot = now
        self._table: dict = {}  # key -> Mapping
        self._by_ext: dict = {}  # Mapping.ext -> Mapping
        self._used: Counter = Counter()  # pool index << 8 | protocol -> ports in use
        self._per_subscriber: Counter = Counter()  # subscriber -> mappings (quota)
        self.counters["reboots"] += 1

    def epoch(self, now: float) -> int:
        """Seconds since (re)boot (section 8.5)."""
        return max(0, int(now - self._boot)) & 0xFFFFFFFF

    def __len__(self) -> int:
        return len(self._table)

    def expire(self, now: float) -> int:
        """Remove every mapping past its lifetime; returns how many."""
        dead = [m for m in self._table.values() if m.expires <= now]
        for m in dead:
            self._remove(m)
        self.counters["expired"] += len(dead)
        return len(dead)

    def known_clients(self) -> list:
        return list(self._clients)

    def announce(self, now: float) -> bytes:
        """An unsolicited ANNOUNCE (section 14.1.3), to send after a reboot."""
        self.counters["announce.sent"] += 1
        return encode_response(Response(Opcode.ANNOUNCE, R.SUCCESS, 0, self.epoch(now)))

    def announce_targets(self) -> list:
        """Where unsolicited ANNOUNCEs go: each known client's (host, port), then
        224.0.0.1:5350 if ``announce_multicast`` (section 14.1.3)."""
        targets = list(self._clients)
        if self.config.announce_multicast:
            targets.append((ANNOUNCE_GROUP_V4, CLIENT_PORT))
        return targets

    def snapshot(self, now: float) -> list:
        """The live mappings as plain values, for the operator view."""
        out = []
        for m in self._table.values():
            if m.expires <= now:
                continue
            tpid, internal, protocol, internal_port = _split_key(m.key)
            out.append({
                "third_party_id": tpid.hex(),
                "internal_address": str(internal),
                "internal_port": internal_port,
                "protocol": protocol,
                "external_address": str(self._pool[m.ext >> 24]),
                "external_port": m.ext & 0xFFFF,
                "lifetime": math.ceil(m.expires - now),
                "nonce": m.nonce.hex(),
                "description": m.description,
                "filters": [_filter_text(f) for f in m.filters],
            })
        return out

    def stats(self, now: float) -> dict:
        return {"epoch": self.epoch(now), "mappings": len(self._table),
                "known_clients": len(self._clients), "counters": dict(self.counters)}

    # ---------------------------------------------------------- requests

    def handle(self, data: bytes, source_ip, source_port: int, now: float) -> bytes | None:
        """The answer to one datagram, or None to send nothing (section 8.3)."""
        self.counters["received"] += 1
        if len(data) < 4:
            self.counters["dropped.short"] += 1
            return None
        if data[1] & 0x80:
            self.counters["dropped.response"] += 1
            return None
        if data[0] != PCP_VERSION:
            return self._raw_error(data, R.UNSUPP_VERSION, now)
        try:
            request = decode_request(data)
        except PCPDecodeError as e:
            return self._raw_error(data, e.result, now)
        self._remember((str(source_ip), source_port))
        try:
            source = _normalise(source_ip)
            if request.client_address != source:
                raise _Reject(R.ADDRESS_MISMATCH)  # section 8.3
            options = self._check_options(request, source)
            if request.opcode == Opcode.ANNOUNCE:
                return self._send(Response(Opcode.ANNOUNCE, R.SUCCESS, 0, self.epoch(now)))
            internal = options.third_party.address if options.third_party else source
            if request.opcode == Opcode.MAP:
                return self._map(request, options, internal, now)
            return self._peer(request, options, internal, now)
        except _Reject as e:
            # Error answers copy the request, options and all (section 7.3).
            return self._send(Response(
                request.opcode, e.result, _error_lifetime(e.result, e.lifetime), self.epoch(now),
                request.body, request.options,
            ))

    def _send(self, response: Response) -> bytes:
        self.counters[_RESULT_KEYS[response.result]] += 1
        return encode_response(response)

    def _raw_error(self, data: bytes, result: ResultCode, now: float) -> bytes:
        """An error for a request that could not be decoded (section 8.3): a copy
        of the request, cut to 1100 octets and a multiple of 4, with the response
        header written over it.  The request's last 96 client-address bits stay
        where the response's reserved field is.  UNSUPP_VERSION is the header only."""
        if result == R.UNSUPP_VERSION:
            message = bytearray(HEADER_SIZE)
            if len(data) >= HEADER_SIZE:
                message[12:24] = data[12:24]
        else:
            message = bytearray(data[:min(len(data), MAX_MESSAGE_SIZE) & ~3])
            message.extend(bytes(max(0, HEADER_SIZE - len(message))))
        _ERROR_HEADER.pack_into(message, 0, PCP_VERSION, 0x80 | (data[1] & 0x7F), result,
                                _error_lifetime(result, None), self.epoch(now))
        self.counters[_RESULT_KEYS[result]] += 1
        return bytes(message)

    def _remember(self, client: tuple) -> None:
        clients = self._clients
        if client in clients:
            del clients[client]  # re-inserted last: most recent
        elif len(clients) >= MAX_KNOWN_CLIENTS:
            del clients[next(iter(clients))]
        clients[client] = None

    def _check_options(self, request, source) -> _Options:
        """Options in order (section 7.3), then RFC 7843 section 5.2's rules."""
        cfg = self.config
        out = _Options()
        deleting = request.lifetime == 0
        for option in request.options:
            kind = type(option)
            if kind is UnknownOption:
                if option_is_mandatory(option.code):
                    raise _Reject(R.UNSUPP_OPTION)
                continue  # optional and unknown: ignored, not echoed
            if kind is ThirdParty:
                if not cfg.allow_third_party:
                    raise _Reject(R.UNSUPP_OPTION)  # section 13.1
                if option.address == source:
                    raise _Reject(R.MALFORMED_REQUEST)
                out.third_party = option
            elif kind is ThirdPartyId:
                if cfg.third_party_id == "unsupported":
                    raise _Reject(R.UNSUPP_OPTION)  # as miniupnpd does
                out.third_party_id = option.value
            elif kind is PreferFailure:
                if deleting or request.body.external_port == 0:
                    raise _Reject(R.MALFORMED_OPTION)  # sections 13.2, 15
                out.prefer_failure = True
            elif kind is Filter:
                if cfg.max_filters == 0:
                    raise _Reject(R.UNSUPP_OPTION)
                if deleting or not _filter_ok(option):
                    raise _Reject(R.MALFORMED_OPTION)  # section 13.3
                out.filters.append(option)
            elif kind is Description:
                out.description = option.text
            out.echo.append(option)
        # RFC 7843 section 5.2 (and 4.1 for a server that expects both).
        if out.third_party_id and out.third_party is None:
            raise _Reject(R.THIRD_PARTY_MISSING_OPTION)
        if out.third_party is not None and not out.third_party_id and cfg.require_third_party_id:
            raise _Reject(R.THIRD_PARTY_MISSING_OPTION)
        if out.third_party_id:
            lengths, known = cfg.third_party_id_lengths, cfg.known_third_party_ids
            if lengths is not None and len(out.third_party_id) not in lengths:
                raise _Reject(R.UNSUPP_THIRD_PARTY_ID_LENGTH)
            if known is not None and out.third_party_id not in known:
                raise _Reject(R.THIRD_PARTY_ID_UNKNOWN)
        return out

    # --------------------------------------------------------------- MAP

    def _map(self, request, options: _Options, internal, now: float) -> bytes:
        """Section 11.3."""
        body = request.body
        _check_protocol(body.protocol, body.internal_port)
        key = _key(options.third_party_id, internal, body.protocol, body.internal_port)
        mapping = self._live(key, now)
        if request.lifetime == 0:
            return self._delete(request, options, mapping, now)
        if body.internal_port == 0:
            raise _Reject(R.NOT_AUTHORIZED)  # all-ports mappings: not offered (policy)
        if mapping is not None and mapping.nonce != body.nonce:
            raise _Reject(R.NOT_AUTHORIZED, self._remaining(mapping, now))  # section 11.3
        lifetime = self._clamp(request.lifetime)
        filters = _merge_filters(mapping.filters if mapping else (), options.filters)
        if len(filters) > self.config.max_filters:
            raise _Reject(R.EXCESSIVE_REMOTE_PEERS)
        if mapping is None:
            ext = self._allocate(key, body.protocol, body.external_address, body.external_port,
                                 options.prefer_failure, now)
            mapping = self._add(key, body.nonce, ext, now + lifetime)
        elif options.prefer_failure and not self._same_external(mapping, body):
            # Renewal asking for another external address or port (section 11.3 item 1).
            raise _Reject(R.CANNOT_PROVIDE_EXTERNAL, self._remaining(mapping, now))
        else:
            mapping.expires = now + lifetime
        mapping.filters = filters
        if options.description is not None:
            mapping.description = options.description
        return self._send(Response(
            Opcode.MAP, R.SUCCESS, lifetime, self.epoch(now),
            MapBody(body.nonce, body.protocol, body.internal_port, mapping.ext & 0xFFFF,
                    self._pool[mapping.ext >> 24]),
            tuple(options.echo),
        ))

    def _delete(self, request, options: _Options, mapping: Mapping | None, now: float) -> bytes:
        """Lifetime 0 (section 15): idempotent, and only with the creating nonce."""
        body = request.body
        if mapping is not None:
            if mapping.nonce != body.nonce:
                raise _Reject(R.NOT_AUTHORIZED, self._remaining(mapping, now))
            self._remove(mapping)
            body = _with_external(body, mapping.ext & 0xFFFF, self._pool[mapping.ext >> 24])
        return self._send(Response(request.opcode, R.SUCCESS, 0, self.epoch(now), body,
                                   tuple(options.echo)))

    # -------------------------------------------------------------- PEER

    def _peer(self, request, options: _Options, internal, now: float) -> bytes:
        """Section 12.3, kept simple: the PEER shares the endpoint-independent
        mapping of its internal tuple (one external port whatever the peer),
        creating it if needed; it can lengthen that mapping, never shorten it."""
        body = request.body
        _check_protocol(body.protocol, body.internal_port)
        if body.internal_port == 0 or body.remote_port == 0 or body.remote_address in _ANY:
            raise _Reject(R.MALFORMED_REQUEST)  # section 12.1: one flow, fully named
        key = _key(options.third_party_id, internal, body.protocol, body.internal_port)
        mapping = self._live(key, now)
        if request.lifetime == 0:
            return self._delete(request, options, mapping, now)
        if mapping is not None and mapping.nonce != body.nonce:
            raise _Reject(R.NOT_AUTHORIZED, self._remaining(mapping, now))
        lifetime = self._clamp(request.lifetime)
        if mapping is None:
            ext = self._allocate(key, body.protocol, body.external_address, body.external_port,
                                 False, now)
            mapping = self._add(key, body.nonce, ext, now + lifetime)
            if options.description is not None:
                mapping.description = options.description
        else:
            mapping.expires = max(mapping.expires, now + lifetime)
            lifetime = self._remaining(mapping, now)
        return self._send(Response(
            Opcode.PEER, R.SUCCESS, lifetime, self.epoch(now),
            _with_external(body, mapping.ext & 0xFFFF, self._pool[mapping.ext >> 24]),
            tuple(options.echo),
        ))

    # ------------------------------------------------------ table helpers

    def _clamp(self, lifetime: int) -> int:
        return min(max(lifetime, self.config.min_lifetime), self.config.max_lifetime)

    @staticmethod
    def _remaining(mapping: Mapping, now: float) -> int:
        return max(1, math.ceil(mapping.expires - now))

    def _same_external(self, mapping: Mapping, body) -> bool:
        return (body.external_port == mapping.ext & 0xFFFF
                and (body.external_address in _ANY
                     or body.external_address == self._pool[mapping.ext >> 24]))

    def _live(self, key: bytes, now: float) -> Mapping | None:
        mapping = self._table.get(key)
        if mapping is not None and mapping.expires <= now:
            self._remove(mapping)  # lazy expiry
            self.counters["expired"] += 1
            return None
        return mapping

    def _free(self, ext: int, now: float) -> bool:
        mapping = self._by_ext.get(ext)
        if mapping is None:
            return True
        if mapping.expires <= now:
            self._remove(mapping)
            self.counters["expired"] += 1
            return True
        return False

    def _add(self, key: bytes, nonce: bytes, ext: int, expires: float) -> Mapping:
        mapping = Mapping(key, nonce, ext, expires)
        self._table[key] = mapping
        self._by_ext[ext] = mapping
        self._used[ext >> 16] += 1
        self._per_subscriber[_subscriber(key)] += 1
        return mapping

    def _remove(self, mapping: Mapping) -> None:
        del self._table[mapping.key]
        del self._by_ext[mapping.ext]
        self._used[mapping.ext >> 16] -= 1
        subscriber = _subscriber(mapping.key)
        self._per_subscriber[subscriber] -= 1
        if not self._per_subscriber[subscriber]:
            del self._per_subscriber[subscriber]

    # -------------------------------------------------------- allocation

    def _allocate(self, key: bytes, protocol: int, address, port: int, exact: bool,
                  now: float) -> int:
        """An external (address, port) for a new mapping, packed as Mapping.ext.

        The subscriber (THIRD_PARTY_ID, else internal address) has a home
        address in the pool chosen by a stable hash, so its mappings share one
        external address (paired pooling, RFC 6888 REQ-2) and keep it across
        reboots.  A suggested pool address comes first.  PREFER_FAILURE
        (``exact``) takes the suggested port or fails (section 13.2)."""
        subscriber = _subscriber(key)
        quota = self.config.quota
        if quota and self._per_subscriber[subscriber] >= quota:
            raise _Reject(R.USER_EX_QUOTA)
        wanted = self._pool_index.get(address)
        if exact and wanted is None and address not in _ANY:
            raise _Reject(R.CANNOT_PROVIDE_EXTERNAL)  # an address we do not have
        family = self._family[address.version] or self._family[4] or self._family[6]
        home = zlib.crc32(key[:-3] if isinstance(subscriber, int) else subscriber)

        def order():
            """Pool indexes to try: the suggested one, then the family from home."""
            if wanted is not None:
                yield wanted
                if exact:
                    return
            for i in range(len(family)):
                index = family[(home + i) % len(family)]
                if index != wanted:
                    yield index

        lo, hi = self.config.port_range
        if port and lo <= port <= hi and not (protocol == PROTOCOL_UDP and port in _FORBIDDEN_UDP):
            first = None
            for index in islice(order(), _ADDRESS_TRIES):
                ext = index << 24 | protocol << 16 | port
                if self._free(ext, now):
                    return ext
                first = self._by_ext[ext] if first is None else first
            if exact:
                raise _Reject(R.CANNOT_PROVIDE_EXTERNAL,
                              min(self._remaining(first, now), LONG_ERROR_LIFETIME))
        elif exact:
            raise _Reject(R.CANNOT_PROVIDE_EXTERNAL)  # a port we never give
        for index in order():
            ext = self._any_port(index, protocol, now)
            if ext is not None:
                return ext
        raise _Reject(R.NO_RESOURCES)  # until the next expire() sweep frees ports

    def _any_port(self, index: int, protocol: int, now: float) -> int | None:
        """A free port on one address: random probes, then a scan from a random
        point; a full address is skipped at once by its use count."""
        if self._used[index << 8 | protocol] >= self._capacity[protocol]:
            return None
        lo, hi = self.config.port_range
        base = index << 24 | protocol << 16
        randint = self.rng.randint
        udp = protocol == PROTOCOL_UDP
        for _ in range(_PROBES):
            port = randint(lo, hi)
            if not (udp and port in _FORBIDDEN_UDP) and self._free(base | port, now):
                return base | port
        start = randint(lo, hi)
        for port in chain(range(start, hi + 1), range(lo, start)):
            if not (udp and port in _FORBIDDEN_UDP) and self._free(base | port, now):
                return base | port
        return None


def _check_protocol(protocol: int, internal_port: int) -> None:
    """Sections 11.1, 11.3: TCP and UDP only; protocol 0 takes no port."""
    if protocol == 0 and internal_port != 0:
        raise _Reject(R.MALFORMED_REQUEST)
    if protocol not in _PROTOCOLS:
        raise _Reject(R.UNSUPP_PROTOCOL)


def _with_external(body, port: int, address):
    """``body`` (MapBody or PeerBody) with the assigned external port and address."""
    if isinstance(body, MapBody):
        return MapBody(body.nonce, body.protocol, body.internal_port, port, address)
    return PeerBody(body.nonce, body.protocol, body.internal_port, port, address,
                    body.remote_port, body.remote_address)


def _filter_text(f: Filter) -> str:
    """``198.51.100.0/24 port 0``: IPv4 prefixes shown over 32 bits, not 128."""
    length = f.prefix_length - 96 if f.remote_address.version == 4 else f.prefix_length
    return f"{f.remote_address}/{length} port {f.remote_port}"
