"""UPnP error codes: their names, and the one table from IWF errors to them.

``iwf.errors.RESULT_ERRORS`` (PCP result -> IWF error) composed with
``IWF_ERRORS`` here (IWF error -> UPnP code per IGD version) is RFC 6970
section 4.3 (iwf.md section D); tests/test_upnp_control.py checks the
composition against that table.
"""

from __future__ import annotations

from typing import Mapping

from ..iwf import errors

# igd.md section 5.  Names as UDA and WANIPConnection:1/2 spell them.
ERROR_NAMES: Mapping[int, str] = {
    401: "Invalid Action",
    402: "Invalid Args",
    404: "Invalid Var",
    501: "Action Failed",
    600: "Argument Value Invalid",
    601: "Argument Value Out of Range",
    602: "Optional Action Not Implemented",
    603: "Out of Memory",
    604: "Human Intervention Required",
    605: "String Argument Too Long",
    606: "Action not authorized",
    704: "ConnectionSetupFailed",
    705: "ConnectionSetupInProgress",
    707: "DisconnectInProgress",
    710: "InvalidConnectionType",
    711: "ConnectionAlreadyTerminated",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    730: "PortMappingNotFound",
    731: "ReadOnly",
    732: "WildCardNotPermittedInIntPort",
    733: "InconsistentParameters",
}

# IWF error -> (IGD:1 code, IGD:2 code).  Looked up along the error's class
# hierarchy; WildcardNotPermitted is keyed by its field as well.
#   - 606 does not exist for IGD:1 control points: NotAuthorized is 718 there,
#     as miniupnpd's secure mode answers (RFC 6970 section 4.3).
#   - 728 is IGD:2 only, so quota and resource exhaustion are 501 on IGD:1.
#   - InvalidArgument (bad address syntax, PortMappingEnabled other than 1):
#     402 Invalid Args on IGD:1, 600 Argument Value Invalid on IGD:2 (igd.md
#     section 5 names 600 for bad RemoteHost/InternalClient syntax).
#   - An IGD:1 InternalPort 0 is 402: 732 is IGD:2 only.
#   - 724-727 are never sent (IGD:2 forbids them; we never need them on IGD:1).
IWF_ERRORS: Mapping[object, tuple[int, int]] = {
    errors.NotAuthorized: (718, 606),
    errors.Conflict: (718, 718),
    errors.NoSuchEntry: (714, 714),
    errors.IndexOutOfRange: (713, 713),
    errors.InvalidArgument: (402, 600),
    (errors.WildcardNotPermitted, "external_port"): (716, 716),
    (errors.WildcardNotPermitted, "internal_port"): (402, 732),
    (errors.WildcardNotPermitted, "internal_client"): (715, 715),
    errors.InconsistentParameters: (402, 733),
    errors.QuotaExceeded: (501, 728),
    errors.NoResources: (501, 728),
    errors.ServerUnreachable: (501, 501),  # RFC 6970 section 5.1
    errors.ServerFailure: (501, 501),
    errors.IWFError: (501, 501),
}


class UPnPFault(Exception):
    """A UPnP error answer: ``code`` and the description sent with it."""

    def __init__(self, code: int, description: str | None = None):
        self.code = code
        self.description = description or ERROR_NAMES.get(code, "Action Failed")
        super().__init__(f"{self.code} {self.description}")


def code_for(error: errors.IWFError, version: int) -> int:
    """The UPnP error code for an IWF error, as an IGD of ``version`` (1 or 2) answers."""
    for cls in type(error).__mro__:
        codes = IWF_ERRORS.get((cls, getattr(error, "field", None))) or IWF_ERRORS.get(cls)
        if codes is not None:
            return codes[version - 1]
    return 501


def fault_for(error: errors.IWFError, version: int) -> UPnPFault:
    """The fault to answer for an IWF error.  The description is the code's
    name only: IWF reasons may name operator details (ARCHITECTURE.md)."""
    return UPnPFault(code_for(error, version))
