"""PCP numbers, named as the RFCs name them."""

from __future__ import annotations

from enum import IntEnum

PCP_VERSION = 2  # RFC 6887 section 7.1
SERVER_PORT = 5351  # section 19.1
CLIENT_PORT = 5350  # section 14.1.3: unsolicited ANNOUNCE destination port
ANNOUNCE_GROUP_V4 = "224.0.0.1"  # section 14.1.3
ANNOUNCE_GROUP_V6 = "ff02::1"

MAX_MESSAGE_SIZE = 1100  # section 7
HEADER_SIZE = 24  # sections 7.1, 7.2
MAP_BODY_SIZE = 36  # section 11.1
PEER_BODY_SIZE = 56  # section 12.1
NONCE_SIZE = 12  # section 11.1, 96 bits
OPTION_HEADER_SIZE = 4  # section 7.3
MAX_THIRD_PARTY_ID_SIZE = 1016  # RFC 7843 section 4

PROTOCOL_ALL = 0  # section 11.1
PROTOCOL_TCP = 6
PROTOCOL_UDP = 17

SHORT_ERROR_LIFETIME = 30  # section 7.4, recommended
LONG_ERROR_LIFETIME = 30 * 60
MIN_RENEWAL_GAP = 4  # section 11.2.1: renewals at least 4 s apart


class Opcode(IntEnum):
    """Section 19.2; RFC 7652 section 7."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2
    AUTHENTICATION = 3


class OptionCode(IntEnum):
    """Section 19.4; RFC 7843 section 4; RFC 7220 section 2."""

    THIRD_PARTY = 1  # section 13.1
    PREFER_FAILURE = 2  # section 13.2
    FILTER = 3  # section 13.3
    THIRD_PARTY_ID = 13  # RFC 7843 section 4
    DESCRIPTION = 128  # RFC 7220 section 2


def option_is_mandatory(code: int) -> bool:
    """Codes 0-127 must be processed; 128-255 may be ignored (section 7.3)."""
    return code < 128


class ResultCode(IntEnum):
    """Section 7.4; RFC 7652 section 7 (14-23); RFC 7843 section 4.1 (24-26)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13
    INITIATION = 14
    AUTHENTICATION_REQUIRED = 15
    AUTHENTICATION_FAILED = 16
    AUTHENTICATION_SUCCEEDED = 17
    AUTHORIZATION_FAILED = 18
    SESSION_TERMINATED = 19
    UNKNOWN_SESSION_ID = 20
    DOWNGRADE_ATTACK_DETECTED = 21
    AUTHENTICATION_REQUEST = 22
    AUTHENTICATION_REPLY = 23
    THIRD_PARTY_ID_UNKNOWN = 24
    THIRD_PARTY_MISSING_OPTION = 25
    UNSUPP_THIRD_PARTY_ID_LENGTH = 26


class LifetimeClass(IntEnum):
    """How long an error is expected to last (section 7.4)."""

    NONE = 0  # SUCCESS, and RFC 7652 exchange codes
    SHORT = 1
    LONG = 2
    DEPENDS = 3  # CANNOT_PROVIDE_EXTERNAL: read the response's lifetime


_SHORT = {ResultCode.NETWORK_FAILURE, ResultCode.NO_RESOURCES, ResultCode.USER_EX_QUOTA}
_NONE = {ResultCode.SUCCESS, *(ResultCode(c) for c in range(14, 24))}


def lifetime_class(result: int) -> LifetimeClass:
    if result in _NONE:
        return LifetimeClass.NONE
    if result in _SHORT:
        return LifetimeClass.SHORT
    if result == ResultCode.CANNOT_PROVIDE_EXTERNAL:
        return LifetimeClass.DEPENDS
    return LifetimeClass.LONG


def is_short_error(result: int, lifetime: int) -> bool:
    """Whether retrying soon may help.  For DEPENDS codes the server's lifetime
    decides: at most the short recommendation (30 s) counts as short (iwf.md G.12)."""
    cls = lifetime_class(result)
    if cls is LifetimeClass.DEPENDS:
        return lifetime <= SHORT_ERROR_LIFETIME
    return cls is LifetimeClass.SHORT


def result_name(result: int) -> str:
    """The RFC's name for a result code, or its number if unassigned."""
    try:
        return ResultCode(result).name
    except ValueError:
        return str(result)
