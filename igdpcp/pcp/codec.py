"""PCP version 2 wire codec (RFC 6887 sections 5, 7, 11-14; RFC 7843 section 4).

Pure functions between bytes and frozen values; no sockets, no clock.  Decoding
rejects malformed input with :class:`PCPDecodeError`, which names the field and
the result code a server would answer with.  Options the codec does not know
are kept as :class:`UnknownOption` so nothing a peer sends is lost.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, Union

from .constants import (
    HEADER_SIZE,
    MAP_BODY_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_THIRD_PARTY_ID_SIZE,
    NONCE_SIZE,
    OPTION_HEADER_SIZE,
    PCP_VERSION,
    PEER_BODY_SIZE,
    Opcode,
    OptionCode,
    ResultCode,
)

Address = Union[IPv4Address, IPv6Address]

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"  # section 5: ::ffff:0:0/96
ANY_IPV4 = IPv4Address("0.0.0.0")  # encodes as ::ffff:0:0, "any IPv4 address"
ANY_IPV6 = IPv6Address("::")


class PCPDecodeError(ValueError):
    """Malformed PCP message.  ``field`` says where; ``result`` is what a server answers."""

    def __init__(self, field: str, reason: str, result: ResultCode = ResultCode.MALFORMED_REQUEST):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.result = result


class PCPEncodeError(ValueError):
    """A value that cannot be put on the wire (out of range, too long)."""


def pack_address(address: Address) -> bytes:
    """128-bit address field; IPv4 as IPv4-mapped IPv6 (section 5)."""
    if address.version == 4:
        return _V4_MAPPED_PREFIX + address.packed
    return address.packed


@lru_cache(maxsize=4096)
def unpack_address(data: bytes) -> Address:
    """Inverse of :func:`pack_address`; compares all first 96 bits (section 5).

    Cached: few distinct addresses recur (subscriber LANs, the CGN's pool),
    and building an ipaddress object costs five times a cache hit.
    """
    if data[:12] == _V4_MAPPED_PREFIX:
        return IPv4Address(data[12:16])
    return IPv6Address(data)


def any_address_like(address: Address) -> Address:
    """The all-zeros address of ``address``'s family (delete, erratum 3621)."""
    return ANY_IPV4 if address.version == 4 else ANY_IPV6


# --------------------------------------------------------------------- options

@dataclass(frozen=True, slots=True)
class ThirdParty:
    """THIRD_PARTY: the internal host the mapping is for (section 13.1)."""

    code: ClassVar[int] = OptionCode.THIRD_PARTY
    address: Address

    def encode_data(self) -> bytes:
        return pack_address(self.address)


@dataclass(frozen=True, slots=True)
class PreferFailure:
    """PREFER_FAILURE: the suggested external address and port or nothing (section 13.2)."""

    code: ClassVar[int] = OptionCode.PREFER_FAILURE

    def encode_data(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Filter:
    """FILTER: allowed remote peers (section 13.3).  Prefix length counts over 128 bits."""

    code: ClassVar[int] = OptionCode.FILTER
    prefix_length: int
    remote_port: int
    remote_address: Address

    def encode_data(self) -> bytes:
        return struct.pack("!xBH", self.prefix_length, self.remote_port) + pack_address(
            self.remote_address
        )


@dataclass(frozen=True, slots=True)
class ThirdPartyId:
    """THIRD_PARTY_ID: opaque realm identifier (RFC 7843 section 4).  Never shown in repr."""

    code: ClassVar[int] = OptionCode.THIRD_PARTY_ID
    value: bytes = field(repr=False)

    def encode_data(self) -> bytes:
        return self.value


@dataclass(frozen=True, slots=True)
class Description:
    """DESCRIPTION: UTF-8 text, no terminator (RFC 7220 section 2)."""

    code: ClassVar[int] = OptionCode.DESCRIPTION
    text: str

    def encode_data(self) -> bytes:
        return self.text.encode("utf-8")


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """Any option this codec does not interpret, kept as it came."""

    code: int
    data: bytes

    def encode_data(self) -> bytes:
        return self.data


Option = Union[ThirdParty, PreferFailure, Filter, ThirdPartyId, Description, UnknownOption]

_MAP_PEER = frozenset({Opcode.MAP, Opcode.PEER})


@dataclass(frozen=True, slots=True)
class _OptionRule:
    name: str
    opcodes: frozenset
    once: bool
    min_len: int
    max_len: int


# Which opcodes each known option is valid for, and how often (sections 13.1-13.3,
# RFC 7843 section 4, RFC 7220 section 2).
OPTION_RULES: dict[int, _OptionRule] = {
    OptionCode.THIRD_PARTY: _OptionRule("THIRD_PARTY", _MAP_PEER, True, 16, 16),
    OptionCode.PREFER_FAILURE: _OptionRule("PREFER_FAILURE", frozenset({Opcode.MAP}), True, 0, 0),
    OptionCode.FILTER: _OptionRule("FILTER", frozenset({Opcode.MAP}), False, 20, 20),
    OptionCode.THIRD_PARTY_ID: _OptionRule(
        "THIRD_PARTY_ID", _MAP_PEER, True, 1, MAX_THIRD_PARTY_ID_SIZE
    ),
    OptionCode.DESCRIPTION: _OptionRule("DESCRIPTION", _MAP_PEER, True, 0, 1016),
}


def _decode_filter(data: bytes) -> Filter:
    prefix_length, remote_port = struct.unpack_from("!xBH", data)
    return Filter(prefix_length, remote_port, unpack_address(data[4:20]))


def _decode_description(data: bytes) -> Description:
    try:
        return Description(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PCPDecodeError("option DESCRIPTION", "not UTF-8", ResultCode.MALFORMED_OPTION)


# Option code -> decoder of its data (lengths already checked against OPTION_RULES).
_OPTION_DECODERS = {
    int(OptionCode.THIRD_PARTY): lambda data: ThirdParty(unpack_address(data)),
    int(OptionCode.PREFER_FAILURE): lambda data: PreferFailure(),
    int(OptionCode.FILTER): _decode_filter,
    int(OptionCode.THIRD_PARTY_ID): ThirdPartyId,
    int(OptionCode.DESCRIPTION): _decode_description,
}


_OPTION_HEADER = struct.Struct("!BxH")
_RULES = {int(code): rule for code, rule in OPTION_RULES.items()}  # plain int keys: faster lookups


def encode_options(options) -> bytes:
    """TLVs, each padded with zeros to a multiple of 4 octets (section 7.3)."""
    parts = []
    for option in options:
        data = option.encode_data()
        if len(data) > 0xFFFF:
            raise PCPEncodeError(f"option {option.code}: data too long")
        parts.append(_OPTION_HEADER.pack(option.code, len(data)))
        parts.append(data)
        pad = -len(data) % 4
        if pad:
            parts.append(b"\x00" * pad)
    return b"".join(parts)


def decode_options(data: bytes, offset: int, opcode: int) -> tuple[Option, ...]:
    """Parse the options from ``offset`` to the end, enforcing OPTION_RULES for ``opcode``."""
    options = []
    seen = set()
    end = len(data)
    while offset < end:
        if end - offset < OPTION_HEADER_SIZE:
            raise PCPDecodeError("options", "truncated option header", ResultCode.MALFORMED_OPTION)
        code, length = _OPTION_HEADER.unpack_from(data, offset)
        offset += OPTION_HEADER_SIZE
        padded = length + (-length % 4)
        rule = _RULES.get(code)
        if offset + padded > end:
            raise PCPDecodeError(f"option {rule.name if rule else code}",
                                 f"length {length} overruns the message", ResultCode.MALFORMED_OPTION)
        value = data[offset:offset + length]
        offset += padded
        if rule is None:
            options.append(UnknownOption(code, value))
            continue
        name = rule.name
        if opcode not in rule.opcodes:
            raise PCPDecodeError(f"option {name}", f"not valid for opcode {opcode}",
                                 ResultCode.MALFORMED_OPTION)
        if rule.once:
            if code in seen:
                raise PCPDecodeError(f"option {name}", "appears more than once",
                                     ResultCode.MALFORMED_OPTION)
            seen.add(code)
        if not rule.min_len <= length <= rule.max_len:
            raise PCPDecodeError(f"option {name}", f"bad length {length}", ResultCode.MALFORMED_OPTION)
        options.append(_OPTION_DECODERS[code](value))
    return tuple(options)


# ------------------------------------------------------------------- opcodes

@dataclass(frozen=True, slots=True)
class MapBody:
    """MAP opcode data (section 11.1).  In a success response the external
    address and port are the assigned ones; in a request the suggested ones."""

    nonce: bytes = field(repr=False)
    protocol: int
    internal_port: int
    external_port: int
    external_address: Address

    _STRUCT: ClassVar[struct.Struct] = struct.Struct("!12sB3xHH16s")

    def encode(self) -> bytes:
        return self._STRUCT.pack(
            self.nonce, self.protocol, self.internal_port, self.external_port,
            pack_address(self.external_address),
        )

    @classmethod
    def decode(cls, data: bytes, offset: int) -> "MapBody":
        nonce, protocol, iport, eport, eaddr = cls._STRUCT.unpack_from(data, offset)
        return cls(nonce, protocol, iport, eport, unpack_address(eaddr))


@dataclass(frozen=True, slots=True)
class PeerBody:
    """PEER opcode data (section 12.1)."""

    nonce: bytes = field(repr=False)
    protocol: int
    internal_port: int
    external_port: int
    external_address: Address
    remote_port: int
    remote_address: Address

    _STRUCT: ClassVar[struct.Struct] = struct.Struct("!12sB3xHH16sH2x16s")

    def encode(self) -> bytes:
        return self._STRUCT.pack(
            self.nonce, self.protocol, self.internal_port, self.external_port,
            pack_address(self.external_address), self.remote_port,
            pack_address(self.remote_address),
        )

    @classmethod
    def decode(cls, data: bytes, offset: int) -> "PeerBody":
        nonce, protocol, iport, eport, eaddr, rport, raddr = cls._STRUCT.unpack_from(data, offset)
        return cls(nonce, protocol, iport, eport, unpack_address(eaddr), rport, unpack_address(raddr))


_BODIES = {Opcode.ANNOUNCE: (None, 0), Opcode.MAP: (MapBody, MAP_BODY_SIZE),
           Opcode.PEER: (PeerBody, PEER_BODY_SIZE)}

Body = Union[MapBody, PeerBody, None]


# ------------------------------------------------------------------- messages

@dataclass(frozen=True, slots=True)
class Request:
    """A PCP request (section 7.1)."""

    opcode: int
    lifetime: int
    client_address: Address
    body: Body = None
    options: tuple = ()

    def option(self, cls):
        """The first option of type ``cls``, or None."""
        return _first(self.options, cls)


@dataclass(frozen=True, slots=True)
class Response:
    """A PCP response (section 7.2).  Error responses may carry no body (UNSUPP_VERSION)."""

    opcode: int
    result: int
    lifetime: int
    epoch: int
    body: Body = None
    options: tuple = ()

    def option(self, cls):
        return _first(self.options, cls)


def _first(options, cls):
    for option in options:
        if type(option) is cls:
            return option
    return None


_REQUEST_HEADER = struct.Struct("!BBxxI16s")
_RESPONSE_HEADER = struct.Struct("!BBxBII12x")


def _check_body(opcode: int, body: Body) -> bytes:
    try:
        cls, _size = _BODIES[opcode]
    except KeyError:
        raise PCPEncodeError(f"opcode {opcode} is not supported by this codec")
    if cls is None:
        if body is not None:
            raise PCPEncodeError("ANNOUNCE has no body")
        return b""
    if not isinstance(body, cls):
        raise PCPEncodeError(f"opcode {opcode} needs a {cls.__name__}")
    if len(body.nonce) != NONCE_SIZE:
        raise PCPEncodeError("nonce must be 12 octets")
    try:
        return body.encode()
    except struct.error as e:
        raise PCPEncodeError(f"body: {e}") from None


def _finish(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE_SIZE:
        raise PCPEncodeError(f"message of {len(message)} octets exceeds {MAX_MESSAGE_SIZE}")
    return message


def encode_request(request: Request) -> bytes:
    try:
        header = _REQUEST_HEADER.pack(
            PCP_VERSION, request.opcode & 0x7F, request.lifetime,
            pack_address(request.client_address),
        )
    except struct.error as e:
        raise PCPEncodeError(f"header: {e}") from None
    return _finish(header + _check_body(request.opcode, request.body)
                   + encode_options(request.options))


def encode_response(response: Response) -> bytes:
    body = b"" if response.body is None else _check_body(response.opcode, response.body)
    try:
        header = _RESPONSE_HEADER.pack(
            PCP_VERSION, 0x80 | (response.opcode & 0x7F), response.result,
            response.lifetime, response.epoch,
        )
    except struct.error as e:
        raise PCPEncodeError(f"header: {e}") from None
    return _finish(header + body + encode_options(response.options))


def _check_frame(data: bytes, want_response: bool) -> int:
    """Checks shared by requests and responses (sections 7, 8.2, 8.3); returns the opcode."""
    size = len(data)
    if size < HEADER_SIZE:
        raise PCPDecodeError("length", f"{size} octets is shorter than the 24-octet header")
    if size > MAX_MESSAGE_SIZE:
        raise PCPDecodeError("length", f"{size} octets exceeds {MAX_MESSAGE_SIZE}")
    if size % 4:
        raise PCPDecodeError("length", f"{size} octets is not a multiple of 4")
    if data[0] != PCP_VERSION:
        raise PCPDecodeError("version", f"version {data[0]} is not 2", ResultCode.UNSUPP_VERSION)
    if bool(data[1] & 0x80) != want_response:
        raise PCPDecodeError("r_bit", "R bit says response" if not want_response else "R bit says request")
    opcode = data[1] & 0x7F
    if opcode not in _BODIES:
        raise PCPDecodeError("opcode", f"opcode {opcode} is not supported", ResultCode.UNSUPP_OPCODE)
    return opcode


def _decode_body(data: bytes, opcode: int, allow_missing: bool):
    cls, size = _BODIES[opcode]
    if cls is None:
        return None, HEADER_SIZE
    if len(data) < HEADER_SIZE + size:
        if allow_missing and len(data) == HEADER_SIZE:
            return None, HEADER_SIZE
        raise PCPDecodeError("length", f"too short for the {Opcode(opcode).name} body")
    return cls.decode(data, HEADER_SIZE), HEADER_SIZE + size


def decode_request(data: bytes) -> Request:
    opcode = _check_frame(data, want_response=False)
    _v, _op, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    body, offset = _decode_body(data, opcode, allow_missing=False)
    options = decode_options(data, offset, opcode)
    return Request(opcode, lifetime, unpack_address(client), body, options)


def decode_response(data: bytes) -> Response:
    opcode = _check_frame(data, want_response=True)
    _v, _op, result, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    # An error response may be the bare header (section 9, UNSUPP_VERSION).
    body, offset = _decode_body(data, opcode, allow_missing=result != ResultCode.SUCCESS)
    options = decode_options(data, offset, opcode)
    return Response(opcode, result, lifetime, epoch, body, options)
