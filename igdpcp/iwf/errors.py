"""Typed IWF errors, and the one table from PCP result codes to them.

Front ends turn these into their own codes (``upnp/faults.py`` holds the
UPnP numbers, per IGD version).  Together the two tables are RFC 6970
section 4.3 (``spec/iwf.md`` section D).
"""

from __future__ import annotations

from ..pcp.constants import ResultCode, result_name


class IWFError(Exception):
    """Base of every error the IWF API raises for a request it refuses or cannot do."""

    #: The PCP result code behind the error, when a PCP server gave one.
    result: ResultCode | None = None

    def __init__(self, reason: str = "", result: ResultCode | None = None):
        super().__init__(reason or self.__class__.__name__)
        if result is not None:
            self.result = result


class InvalidArgument(IWFError):
    """A value the IWF cannot use (bad port, protocol, address syntax)."""


class WildcardNotPermitted(IWFError):
    """A wildcard where none is allowed; ``field`` is 'external_port', 'internal_port' or 'internal_client'."""

    def __init__(self, field: str, reason: str = ""):
        super().__init__(reason or f"wildcard not permitted in {field}")
        self.field = field


class NotAuthorized(IWFError):
    """Policy refuses it: another host's address, a port outside the operator rules."""


class Conflict(IWFError):
    """The external port is held by another mapping (PCP CANNOT_PROVIDE_EXTERNAL)."""


class NoSuchEntry(IWFError):
    """No mapping of this caller matches."""


class IndexOutOfRange(IWFError):
    """A table index past the end."""


class QuotaExceeded(IWFError):
    """The subscriber holds as many mappings as policy allows (or the CGN said USER_EX_QUOTA)."""


class NoResources(IWFError):
    """The CGN is out of ports or addresses (PCP NO_RESOURCES)."""


class ServerFailure(IWFError):
    """The PCP server refused for a reason a subscriber cannot fix, or did not answer."""


class ServerUnreachable(ServerFailure):
    """No answer from the PCP server within the call's time bound (RFC 6970 section 5.1)."""


class InconsistentParameters(IWFError):
    """A range whose start is after its end."""


# PCP result -> IWF error (RFC 6970 section 4.3; iwf.md section D).  Codes RFC 6970
# does not cover (RFC 7652's 14-23, RFC 7843's 24-26) are ServerFailure, i.e. UPnP
# 501: they describe operator configuration a subscriber cannot act on (design choice).
# CANNOT_PROVIDE_EXTERNAL means Conflict when adding; the delete path turns it into
# NoSuchEntry itself (RFC 6970 section 5.8).
RESULT_ERRORS: dict[ResultCode, type[IWFError]] = {
    ResultCode.NOT_AUTHORIZED: NotAuthorized,
    ResultCode.NO_RESOURCES: NoResources,
    ResultCode.USER_EX_QUOTA: QuotaExceeded,
    ResultCode.CANNOT_PROVIDE_EXTERNAL: Conflict,
}


def error_for_result(result: int, reason: str = "") -> IWFError:
    """The IWF error for a PCP error result (everything unlisted is ServerFailure)."""
    cls = RESULT_ERRORS.get(result, ServerFailure)
    return cls(reason or f"PCP {result_name(result)}", result=result)
