"""UPnP control: check an action call against the SCPD, apply the IGD version's
rules, call the IWF, and format the answer (igd.md sections 3-5, 9; iwf.md B, C).

Sans-IO apart from Deferreds: IWF calls may wait for the PCP server.  The IGD
version that applies to a call is the one in the namespace the client used
(``WANIPConnection:1`` or ``:2``, never above the version served): a client
given the IGD:1 description (clients.md R1) gets IGD:1 rules and error codes.

Choices the specs leave open (README "UPnP control"):
  * IGD:1 NewExternalPort 0 means "same as NewInternalPort" (WANIPConnection:1
    section 2.2.16; iwf.md G.3), so PREFER_FAILURE can always be sent.
  * Lease values are clamped, never refused (clients.md R8): IGD:1 0 is an
    infinite lease (None); IGD:2 0 and anything above 604800 is 604800.
  * NewEnabled other than 1 is InvalidArgument (iwf.md B): 402 on IGD:1, 600 on IGD:2.
  * A value outside the SCPD's allowed values is 601 on IGD:2, 402 on IGD:1.
  * RequestConnection succeeds (the CGN link is always up); ForceTermination is
    refused (606 on IGD:2, 501 on IGD:1); SetConnectionType accepts only
    IP_Routed (else 731 ReadOnly on IGD:2, 501 on IGD:1).
  * Byte and packet counters are 0: the IWF carries no subscriber traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Callable, Mapping

from lxml import etree
from twisted.internet import defer
from ..logs import logger

from ..interfaces import IPortMappingService
from ..iwf import errors
from ..iwf.model import MappingKey, MappingRequest, MappingView
from ..subscriber import Caller
from . import soap
from .faults import ERROR_NAMES, UPnPFault, fault_for
from .scpd import Action, ArgumentError, ScpdError, ServiceSpec, default_specs

MAX_LEASE_V2 = 604800  # WANIPConnection:2 section 2.3.16; iwf.md E.9
#: State variables whose request values are clamped instead of range-checked (clients.md R8).
CLAMPED = frozenset({"PortMappingLeaseDuration"})

NS_PORT_LISTING = "urn:schemas-upnp-org:gw:WANIPConnection"  # igd.md section 4.4
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_LISTING_SCHEMA = f"{NS_PORT_LISTING} http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd"


@dataclass(frozen=True, slots=True)
class LinkProperties:
    """What GetCommonLinkProperties reports (operator configuration)."""

    access_type: str = "Ethernet"
    upstream_bps: int = 1_000_000_000
    downstream_bps: int = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Reply:
    """A control answer: HTTP status (200, or 500 for a fault) and the SOAP body."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Call:
    caller: Caller
    version: int  # the IGD version whose rules apply
    action: Action


class Control:
    """The actions of one tunnel's IGD, served as IGD ``version`` (1 or 2)."""

    _log = logger(__name__)

    def __init__(self, iwf: IPortMappingService, version: int, reactor, *,
                 specs: Mapping[tuple[str, int], ServiceSpec] | None = None,
                 link: LinkProperties = LinkProperties()):
        self._iwf = iwf
        self.version = version
        self._reactor = reactor
        self._started = reactor.seconds()
        self._specs = specs if specs is not None else default_specs()
        self._link = link
        self._handlers: dict[str, Callable[[_Call, dict], Any]] = {
            "SetConnectionType": self._set_connection_type,
            "RequestConnection": lambda call, args: {},
            "ForceTermination": self._force_termination,
            "GetGenericPortMappingEntry": self._get_generic,
            "GetSpecificPortMappingEntry": self._get_specific,
            "AddPortMapping": self._add_port_mapping,
            "AddAnyPortMapping": self._add_port_mapping,
            "DeletePortMapping": self._delete_port_mapping,
            "DeletePortMappingRange": self._delete_range,
            "GetListOfPortMappings": self._list_port_mappings,
        }
        # State variables readable by QueryStateVariable and by the actions that
        # only read them (GetStatusInfo, GetExternalIPAddress, GetCommonLinkProperties, ...).
        self._state: dict[str, Callable[[Caller], Any]] = {
            "ConnectionType": lambda caller: "IP_Routed",
            "PossibleConnectionTypes": lambda caller: "IP_Routed",
            "ConnectionStatus": self._connection_status,
            "LastConnectionError": lambda caller: "ERROR_NONE",
            "Uptime": lambda caller: int(self._reactor.seconds() - self._started),
            "RSIPAvailable": lambda caller: False,
            "NATEnabled": lambda caller: True,
            "ExternalIPAddress": self._external_ip,
            "PortMappingNumberOfEntries": lambda caller: self._iwf.mapping_count(caller.subscriber),
            "WANAccessType": lambda caller: self._link.access_type,
            "Layer1UpstreamMaxBitRate": lambda caller: self._link.upstream_bps,
            "Layer1DownstreamMaxBitRate": lambda caller: self._link.downstream_bps,
            "PhysicalLinkStatus": lambda caller: "Up",
            "TotalBytesSent": lambda caller: 0,
            "TotalBytesReceived": lambda caller: 0,
            "TotalPacketsSent": lambda caller: 0,
            "TotalPacketsReceived": lambda caller: 0,
        }
        self._check_coverage()
        # (service name, namespace a client used) -> its SCPD; every call looks one up.
        self._spec_by_type = {
            (name, spec.service_type): spec for (name, version), spec in self._specs.items()
            if version <= self.version}

    def handle(self, caller: Caller | defer.Deferred, service_name: str, soapaction: str | bytes | None,
               body: bytes) -> defer.Deferred:
        """A whole control request -> Deferred[Reply]; never fails."""
        try:
            request = soap.parse_request(body, soapaction)
        except soap.SoapError as exc:
            return defer.succeed(Reply(500, soap.build_fault(exc.code, ERROR_NAMES[exc.code])))
        # ``caller`` may be a Deferred: the tunnel's ID can come from AAA (its failure is a fault).
        if isinstance(caller, defer.Deferred):
            d = caller.addCallback(self.call, service_name, request.service_type, request.action,
                                   request.args)
        else:
            try:
                d = self.call(caller, service_name, request.service_type, request.action, request.args)
            except Exception:
                d = defer.fail()
        return d.addCallback(self._reply, request).addErrback(self._fault_reply)

    @staticmethod
    def _reply(out, request: soap.SoapRequest) -> Reply:
        return Reply(200, soap.build_response(request.service_type, request.action, out))

    def call(self, caller: Caller, service_name: str, service_type: str, action: str,
             args: Mapping[str, str]) -> defer.Deferred:
        """Deferred[list[(name, text)]] of out-arguments in SCPD order, or a UPnPFault failure.

        ``service_name`` is the service behind the control URL the request came to.
        """
        try:
            if service_type == soap.NS_CONTROL:
                return self._query_state_variable(caller, service_name, action, args)
            spec = self._spec_for_type(service_name, service_type)
            action_spec = spec.actions.get(action)
            if action_spec is None:
                raise UPnPFault(401)
            values = self._parse(spec.version, action_spec, args)
        except UPnPFault:
            return defer.fail()
        call = _Call(caller, spec.version, action_spec)
        handler = self._handlers.get(action, self._read_state)
        d = defer.maybeDeferred(handler, call, values)
        d.addCallback(action_spec.format_outputs)
        d.addErrback(self._to_fault, call.version, action)
        return d

    # -- dispatch helpers -------------------------------------------------

    def _spec_for_type(self, service_name: str, service_type: str) -> ServiceSpec:
        """The SCPD of the namespace the client used; 401 for another service or a newer version."""
        spec = self._spec_by_type.get((service_name, service_type))
        if spec is None:
            raise UPnPFault(401)
        return spec

    @staticmethod
    def _parse(version: int, action: Action, args: Mapping[str, str]) -> dict:
        try:
            return action.parse_args(args, unbounded=CLAMPED)
        except ArgumentError as exc:
            raise UPnPFault(601 if exc.kind == "range" and version >= 2 else 402) from None

    def _fault_reply(self, failure) -> Reply:
        if not failure.check(UPnPFault):
            self._log.failure("answer could not be built", failure)
        fault = failure.value if failure.check(UPnPFault) else UPnPFault(501)
        return Reply(500, soap.build_fault(fault.code, fault.description))

    def _to_fault(self, failure, version: int, action: str):
        if failure.check(UPnPFault):
            return failure
        if failure.check(errors.IWFError):
            raise fault_for(failure.value, version)
        self._log.failure("{action} failed", failure, action=action)
        raise UPnPFault(501)

    def _check_coverage(self) -> None:
        """Every action the served SCPDs declare has code behind it (start-up check)."""
        for (name, version), spec in self._specs.items():
            if version > self.version:
                continue
            for action in spec.actions.values():
                if action.name in self._handlers:
                    continue
                if action.inputs or any(a.variable.name not in self._state for a in action.outputs):
                    raise ScpdError(f"{name}:{version} {action.name} has no handler")

    # -- state variables --------------------------------------------------

    def _read_state(self, call: _Call, values: dict) -> defer.Deferred:
        """An action that only reports state variables (GetStatusInfo and the like)."""
        names = [arg.name for arg in call.action.outputs]
        ds = [defer.maybeDeferred(self._state[arg.variable.name], call.caller) for arg in call.action.outputs]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)
        d.addCallback(lambda results: dict(zip(names, results)))
        return d

    def _connection_status(self, caller: Caller) -> defer.Deferred:
        d = defer.maybeDeferred(self._iwf.connection_status, caller)
        return d.addCallback(lambda up: "Connected" if up else "Disconnected")

    def _external_ip(self, caller: Caller) -> defer.Deferred:
        d = defer.maybeDeferred(self._iwf.external_address, caller)
        return d.addCallback(lambda address: "" if address is None else str(address))

    def _query_state_variable(self, caller: Caller, service_name: str, action: str,
                              args: Mapping[str, str]) -> defer.Deferred:
        """UDA 1.0 section 3.3 QueryStateVariable (igd.md section 9); 404 for what we cannot read."""
        if action != "QueryStateVariable":
            raise UPnPFault(401)
        if set(args) != {"varName"}:
            raise UPnPFault(402)
        spec = max((s for (n, v), s in self._specs.items() if n == service_name and v <= self.version),
                   key=lambda s: s.version, default=None)
        variable = spec.variables.get(args["varName"].strip()) if spec is not None else None
        if variable is None or variable.name not in self._state:
            raise UPnPFault(404)
        d = defer.maybeDeferred(self._state[variable.name], caller)
        d.addCallback(lambda value: [("return", variable.format(value))])
        d.addErrback(self._to_fault, self.version, action)
        return d

    # -- connection actions -----------------------------------------------

    def _set_connection_type(self, call: _Call, values: dict) -> dict:
        if values["NewConnectionType"] != "IP_Routed":
            raise UPnPFault(731 if call.version >= 2 else 501)
        return {}

    def _force_termination(self, call: _Call, values: dict) -> dict:
        raise UPnPFault(606 if call.version >= 2 else 501)  # a subscriber cannot take down the CGN link

    # -- port mappings ----------------------------------------------------

    def _add_port_mapping(self, call: _Call, values: dict) -> defer.Deferred:
        any_port = call.action.name == "AddAnyPortMapping"
        request = _mapping_request(call.version, values, any_port)
        d = defer.maybeDeferred(self._iwf.add_mapping, call.caller, request, any_port=any_port)
        if any_port:
            return d.addCallback(lambda view: {"NewReservedPort": view.external_port})
        return d.addCallback(lambda view: {})

    def _delete_port_mapping(self, call: _Call, values: dict) -> defer.Deferred:
        d = defer.maybeDeferred(self._iwf.delete_mapping, call.caller, _mapping_key(values))
        return d.addCallback(lambda _: {})

    def _get_specific(self, call: _Call, values: dict) -> defer.Deferred:
        d = defer.maybeDeferred(self._iwf.get_specific, call.caller, _mapping_key(values))
        return d.addCallback(_entry, call)

    def _get_generic(self, call: _Call, values: dict) -> defer.Deferred:
        d = defer.maybeDeferred(self._iwf.get_generic, call.caller, values["NewPortMappingIndex"])
        return d.addCallback(_entry, call)

    def _delete_range(self, call: _Call, values: dict) -> defer.Deferred:
        start, end = _port_range(values)
        d = defer.maybeDeferred(self._iwf.delete_range, call.caller, start, end,
                                values["NewProtocol"], values["NewManage"])
        d.addErrback(_not_found)
        d.addCallback(_nonempty)
        return d.addCallback(lambda count: {})

    def _list_port_mappings(self, call: _Call, values: dict) -> defer.Deferred:
        start, end = _port_range(values)
        limit = values["NewNumberOfPorts"] or None  # 0 = no limit (igd.md section 4.4)
        d = defer.maybeDeferred(self._iwf.list_mappings, call.caller, start, end,
                                values["NewProtocol"], values["NewManage"], limit)
        d.addErrback(_not_found)
        return d.addCallback(lambda views: {"NewPortListing": _port_listing(_nonempty(views), call.version)})


def _mapping_request(version: int, values: dict, any_port: bool) -> MappingRequest:
    """AddPortMapping / AddAnyPortMapping arguments -> MappingRequest, by the version's rules."""
    internal = values["NewInternalPort"]
    external = values["NewExternalPort"]
    if internal == 0:
        raise errors.WildcardNotPermitted("internal_port")  # 732 on IGD:2, 402 on IGD:1
    if external == 0 and not any_port:
        if version >= 2:
            raise errors.WildcardNotPermitted("external_port")  # 716
        external = internal  # IGD:1 "same as InternalPort" (iwf.md G.3)
    if not values["NewEnabled"]:
        raise errors.InvalidArgument("PortMappingEnabled must be 1")  # iwf.md B
    lease = values["NewLeaseDuration"]
    if version == 1:
        lease = lease or None  # 0 = infinite (iwf.md E.9)
    else:
        lease = min(lease or MAX_LEASE_V2, MAX_LEASE_V2)  # 0 -> 604800, clamp (clients.md R8)
    client = _address(values["NewInternalClient"], "NewInternalClient")
    if client is not None and client.is_unspecified:
        raise errors.WildcardNotPermitted("internal_client")  # 715
    return MappingRequest(
        external_port=external, protocol=values["NewProtocol"], internal_port=internal,
        internal_client=client, remote_host=_remote_host(values["NewRemoteHost"]),
        description=values["NewPortMappingDescription"], enabled=True, lease=lease,
    )


def _mapping_key(values: dict) -> MappingKey:
    return MappingKey(_remote_host(values["NewRemoteHost"]), values["NewExternalPort"], values["NewProtocol"])


def _remote_host(text: str):
    """"" (or an unspecified address) is the wildcard, None."""
    address = _address(text, "NewRemoteHost")
    return None if address is None or address.is_unspecified else address


def _address(text: str, name: str):
    """An IP literal, or None for "".  DNS names are refused: the carrier IWF
    cannot resolve names of the subscriber's LAN (iwf.md G.13)."""
    text = text.strip()
    if not text:
        return None
    try:
        return ip_address(text)
    except ValueError:
        raise errors.InvalidArgument(f"{name} is not an IP address") from None


def _port_range(values: dict) -> tuple[int, int]:
    start, end = values["NewStartPort"], values["NewEndPort"]
    if start > end:
        raise errors.InconsistentParameters("NewStartPort > NewEndPort")  # 733
    return start, end


def _not_found(failure):
    failure.trap(errors.NoSuchEntry)
    raise UPnPFault(730)


def _nonempty(found):
    """Range actions that find nothing answer 730 PortMappingNotFound (igd.md section 4.4)."""
    if not found:
        raise UPnPFault(730)
    return found


def _lease_out(view: MappingView, version: int) -> int:
    """The remaining lease as the SCPD allows it (IGD:2 range 0-604800)."""
    return min(view.lease_remaining, MAX_LEASE_V2) if version >= 2 else view.lease_remaining


def _entry(view: MappingView, call: _Call) -> dict:
    """A mapping as Get*PortMappingEntry reports it: only the action's out-arguments."""
    full = {
        "NewRemoteHost": "" if view.remote_host is None else str(view.remote_host),
        "NewExternalPort": view.external_port,
        "NewProtocol": view.protocol,
        "NewInternalPort": view.internal_port,
        "NewInternalClient": str(view.internal_client),
        "NewEnabled": bool(view.enabled),
        "NewPortMappingDescription": view.description,
        "NewLeaseDuration": _lease_out(view, call.version),
    }
    return {arg.name: full[arg.name] for arg in call.action.outputs}


def _port_listing(views, version: int) -> str:
    """The A_ARG_TYPE_PortListing document (igd.md section 4.4); soap.py escapes it."""
    p = f"{{{NS_PORT_LISTING}}}"
    root = etree.Element(p + "PortMappingList", nsmap={"p": NS_PORT_LISTING, "xsi": _XSI})
    root.set(f"{{{_XSI}}}schemaLocation", _LISTING_SCHEMA)
    for view in views:
        entry = etree.SubElement(root, p + "PortMappingEntry")
        for tag, value in (
            ("NewRemoteHost", "" if view.remote_host is None else str(view.remote_host)),
            ("NewExternalPort", str(view.external_port)),
            ("NewProtocol", view.protocol),
            ("NewInternalPort", str(view.internal_port)),
            ("NewInternalClient", str(view.internal_client)),
            ("NewEnabled", "1" if view.enabled else "0"),
            ("NewDescription", soap.xml_safe(view.description)),
            ("NewLeaseTime", str(_lease_out(view, version))),
        ):
            etree.SubElement(entry, p + tag).text = value
    return etree.tostring(root, encoding="unicode")
