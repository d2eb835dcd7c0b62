"""THIRD_PARTY_ID values for real tunnel identifiers (RFC 7843 section 4).

An identifier defined by another standard is encoded exactly as that standard
puts it on the wire, so the CGN can compare octet by octet.  Identifiers that
are not whole octets get zero bits appended up to the next octet; the option
codec then pads to 4 octets.  Each encoder has its decoder, for operators'
views and for tests.
"""

from __future__ import annotations

from .constants import MAX_THIRD_PARTY_ID_SIZE


def _bits(kind: str, value: int, width: int) -> bytes:
    """``value`` as ``width`` bits, left-aligned in whole octets (zero bits appended)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << width):
        raise ValueError(f"{kind} must be an integer in 0..{(1 << width) - 1}")
    octets = (width + 7) // 8
    return (value << (octets * 8 - width)).to_bytes(octets, "big")


def _unbits(kind: str, data: bytes, width: int) -> int:
    octets = (width + 7) // 8
    shift = octets * 8 - width
    if len(data) != octets:
        raise ValueError(f"{kind} takes {octets} octets")
    value = int.from_bytes(data, "big")
    if value & ((1 << shift) - 1):
        raise ValueError(f"{kind}: trailing pad bits are not zero")
    return value >> shift


# name: (bit width, where the standard carries it)
TECHNOLOGIES = {
    "vxlan": (24, "VXLAN Network Identifier, RFC 7348 section 5"),
    "vlan": (12, "802.1Q VLAN Identifier (low 12 bits of the TCI)"),
    "l2tpv3": (32, "L2TPv3 Session ID, RFC 3931 section 4.1"),
    "gre": (32, "GRE Key, RFC 2890 section 2.1"),
    "mpls": (20, "MPLS label, RFC 3032 section 2.1"),
}


def _width(kind: str) -> int:
    try:
        return TECHNOLOGIES[kind][0]
    except KeyError:
        raise ValueError(f"unknown tunnel technology {kind!r}") from None


def encode(kind: str, value: int) -> bytes:
    """The THIRD_PARTY_ID for tunnel technology ``kind`` with identifier ``value``."""
    return _bits(kind, value, _width(kind))


def decode(kind: str, data: bytes) -> int:
    """Inverse of :func:`encode`."""
    return _unbits(kind, data, _width(kind))


def vxlan_vni(vni: int) -> bytes:
    return encode("vxlan", vni)


def vlan_id(vid: int) -> bytes:
    return encode("vlan", vid)


def l2tpv3_session(session_id: int) -> bytes:
    return encode("l2tpv3", session_id)


def gre_key(key: int) -> bytes:
    return encode("gre", key)


def mpls_label(label: int) -> bytes:
    return encode("mpls", label)


def opaque(value: bytes | str) -> bytes:
    """An operator-defined ID (e.g. from AAA); at most 1016 octets."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not 1 <= len(value) <= MAX_THIRD_PARTY_ID_SIZE:
        raise ValueError(f"a THIRD_PARTY_ID is 1..{MAX_THIRD_PARTY_ID_SIZE} octets")
    return bytes(value)


def parse(spec: str) -> bytes:
    """A THIRD_PARTY_ID from its config spelling: ``vxlan:1001``, ``vlan:42``,
    ``l2tpv3:0x1234``, ``gre:7``, ``mpls:16``, ``hex:0a0b`` or ``text:subscriber-1``."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError("expected KIND:VALUE (vxlan, vlan, l2tpv3, gre, mpls, hex, text)")
    if kind == "hex":
        try:
            return opaque(bytes.fromhex(rest))
        except ValueError as e:
            raise ValueError(f"hex: {e}") from None
    if kind == "text":
        return opaque(rest)
    try:
        number = int(rest, 0)
    except ValueError:
        raise ValueError(f"{kind}: {rest!r} is not a number") from None
    return encode(kind, number)
