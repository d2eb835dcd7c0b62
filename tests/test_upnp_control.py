"""Control: every action, the version rules, and every fault path (igd.md 3-5, iwf.md B-D)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, ip_address
from pathlib import Path

from lxml import etree
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from igdpcp.interfaces import IPortMappingService
from igdpcp.iwf import errors
from igdpcp.iwf.model import MappingKey
from igdpcp.pcp.constants import ResultCode
from igdpcp.subscriber import Caller, Subscriber
from igdpcp.upnp import faults, soap
from igdpcp.upnp.control import MAX_LEASE_V2, NS_PORT_LISTING, Control, LinkProperties
from igdpcp.upnp.scpd import ScpdError, default_specs, parse_spec

from .fakes import FakePortMappingService

V1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
V2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
CMN = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"
SUB = Subscriber("tun7", b"\x00\x00\x00\x07")
CALLER = Caller(SUB, IPv4Address("192.168.1.10"))
OTHER = Caller(SUB, IPv4Address("192.168.1.11"))


def add_args(**over):
    args = {"NewRemoteHost": "", "NewExternalPort": "5000", "NewProtocol": "TCP", "NewInternalPort": "5000",
            "NewInternalClient": "192.168.1.10", "NewEnabled": "1", "NewPortMappingDescription": "test",
            "NewLeaseDuration": "3600"}
    args.update(over)
    return args


class ControlCase(SynchronousTestCase):
    version = 2

    def setUp(self):
        self.iwf = FakePortMappingService()
        self.clock = Clock()
        self.clock.advance(1000)
        self.control = Control(self.iwf, self.version, self.clock, link=LinkProperties("Ethernet", 100, 200))

    @property
    def ns(self):
        return V2 if self.version == 2 else V1

    def request(self, action, args=None, ns=None, service="WANIPConnection", caller=CALLER):
        """Send one SOAP request through handle(); (200, {out}) or (500, code)."""
        ns = ns or self.ns
        body = "".join(f"<{k}>{soap.xml_safe(v).replace('&', '&amp;').replace('<', '&lt;')}</{k}>"
                       for k, v in (args or {}).items())
        envelope = (f'<?xml version="1.0"?><s:Envelope xmlns:s="{soap.NS_ENVELOPE}" '
                    f's:encodingStyle="{soap.NS_ENCODING}"><s:Body><u:{action} xmlns:u="{ns}">{body}'
                    f"</u:{action}></s:Body></s:Envelope>").encode()
        reply = self.successResultOf(self.control.handle(caller, service, f'"{ns}#{action}"', envelope))
        root = etree.fromstring(reply.body)
        if reply.status == 500:
            self.assertEqual(root.findtext(f".//{{{soap.NS_CONTROL}}}errorDescription"),
                             faults.ERROR_NAMES[int(root.findtext(f".//{{{soap.NS_CONTROL}}}errorCode"))])
            return 500, int(root.findtext(f".//{{{soap.NS_CONTROL}}}errorCode"))
        self.assertEqual(reply.status, 200)
        (response,) = root.find(f"{{{soap.NS_ENVELOPE}}}Body")
        self.assertEqual(response.tag, f"{{{ns}}}{action}Response")  # answered in the client's namespace
        return 200, {el.tag: el.text or "" for el in response}

    def ok(self, action, args=None, **kw):
        status, out = self.request(action, args, **kw)
        self.assertEqual(status, 200, f"{action} failed with {out}")
        return out

    def fault(self, action, args=None, **kw):
        status, code = self.request(action, args, **kw)
        self.assertEqual(status, 500, f"{action} succeeded: {code}")
        return code

    def last_request(self):
        return [args for name, args in self.iwf.calls if name == "add_mapping"][-1][1]


class V2Tests(ControlCase):
    version = 2

    def test_fake_implements_the_interface(self):
        verifyObject(IPortMappingService, self.iwf)

    def test_add_then_read_back(self):
        self.assertEqual(self.ok("AddPortMapping", add_args()), {})
        out = self.ok("GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"})
        self.assertEqual(out, {"NewRemoteHost": "", "NewExternalPort": "5000", "NewProtocol": "TCP",
                               "NewInternalPort": "5000", "NewInternalClient": "192.168.1.10", "NewEnabled": "1",
                               "NewPortMappingDescription": "test", "NewLeaseDuration": "3600"})
        out = self.ok("GetSpecificPortMappingEntry",
                      {"NewRemoteHost": "", "NewExternalPort": "5000", "NewProtocol": "TCP"})
        self.assertEqual(out, {"NewInternalPort": "5000", "NewInternalClient": "192.168.1.10", "NewEnabled": "1",
                               "NewPortMappingDescription": "test", "NewLeaseDuration": "3600"})

    def test_out_arguments_in_scpd_order(self):
        self.ok("AddPortMapping", add_args())
        reply = self.successResultOf(self.control.call(CALLER, "WANIPConnection", V2, "GetGenericPortMappingEntry",
                                                       {"NewPortMappingIndex": "0"}))
        spec = default_specs()["WANIPConnection", 2].actions["GetGenericPortMappingEntry"]
        self.assertEqual([name for name, _ in reply], [arg.name for arg in spec.outputs])

    def test_request_values_reach_the_iwf(self):
        self.ok("AddPortMapping", add_args(NewRemoteHost="203.0.113.9", NewExternalPort="8080",
                                           NewInternalPort="80", NewProtocol="udp",
                                           NewPortMappingDescription="Tom & Jerry"))
        request = self.last_request()
        self.assertEqual((request.remote_host, request.external_port, request.internal_port, request.protocol,
                          request.internal_client, request.description, request.enabled, request.lease),
                         (ip_address("203.0.113.9"), 8080, 80, "UDP", ip_address("192.168.1.10"),
                          "Tom & Jerry", True, 3600))

    def test_empty_internal_client_means_the_caller(self):
        self.ok("AddPortMapping", add_args(NewInternalClient=""))
        self.assertIsNone(self.last_request().internal_client)
        self.assertEqual(self.iwf.tables[SUB.key][0].internal_client, CALLER.address)

    def test_lease_zero_is_604800(self):
        self.ok("AddPortMapping", add_args(NewLeaseDuration="0"))
        self.assertEqual(self.last_request().lease, MAX_LEASE_V2)

    def test_lease_above_range_is_clamped_not_refused(self):
        for lease in ("604801", "99999999999"):
            self.ok("AddPortMapping", add_args(NewLeaseDuration=lease))
            self.assertEqual(self.last_request().lease, MAX_LEASE_V2)

    def test_ill_typed_lease(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewLeaseDuration="soon")), 402)

    def test_external_port_zero_is_716(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewExternalPort="0")), 716)

    def test_internal_port_zero_is_732(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalPort="0")), 732)

    def test_enabled_must_be_1(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewEnabled="0")), 600)
        self.ok("AddPortMapping", add_args(NewEnabled="true"))

    def test_wildcard_internal_client_is_715(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalClient="0.0.0.0")), 715)

    def test_unparsable_addresses_are_600(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalClient="pc.lan")), 600)
        self.assertEqual(self.fault("AddPortMapping", add_args(NewRemoteHost="1.2.3")), 600)

    def test_bad_protocol_is_601(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewProtocol="ICMP")), 601)

    def test_bad_port_is_402(self):
        for port in ("http", "70000", "-1", ""):
            self.assertEqual(self.fault("AddPortMapping", add_args(NewExternalPort=port)), 402, port)

    def test_missing_and_extra_arguments_are_402(self):
        args = add_args()
        del args["NewRemoteHost"]
        self.assertEqual(self.fault("AddPortMapping", args), 402)
        self.assertEqual(self.fault("AddPortMapping", add_args(NewFoo="1")), 402)
        self.assertEqual(self.fault("GetExternalIPAddress", {"NewFoo": "1"}), 402)

    def test_conflict_is_718(self):
        self.ok("AddPortMapping", add_args())
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalClient="192.168.1.11")), 718)

    def test_refresh_by_re_adding(self):
        self.ok("AddPortMapping", add_args())
        self.ok("AddPortMapping", add_args(NewPortMappingDescription="again"))
        self.assertEqual([v.description for v in self.iwf.tables[SUB.key]], ["again"])

    def test_add_any_port_mapping(self):
        self.ok("AddPortMapping", add_args(NewInternalClient="192.168.1.11"))
        out = self.ok("AddAnyPortMapping", add_args())
        self.assertNotEqual(out["NewReservedPort"], "5000")
        self.assertEqual(self.iwf.calls[-1][1][2], True)  # any_port
        out = self.ok("AddAnyPortMapping", add_args(NewExternalPort="0", NewInternalPort="6000"))
        self.assertTrue(1 <= int(out["NewReservedPort"]) <= 65535)

    def test_iwf_errors_as_igd2(self):
        for error, code in ((errors.NotAuthorized(), 606), (errors.NoResources(), 728),
                            (errors.QuotaExceeded(), 728), (errors.ServerUnreachable(), 501),
                            (errors.ServerFailure(), 501), (errors.Conflict(), 718),
                            (errors.InvalidArgument(), 600)):
            self.iwf.fail_next["add_mapping"] = error
            self.assertEqual(self.fault("AddPortMapping", add_args()), code, error)

    def test_unexpected_exception_is_501_and_logged(self):
        self.iwf.fail_next["add_mapping"] = RuntimeError("bug")
        self.assertEqual(self.fault("AddPortMapping", add_args()), 501)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_fault_description_leaks_no_reason(self):
        self.iwf.fail_next["add_mapping"] = errors.ServerFailure("CGN 10.9.8.7 said UNSUPP_OPTION for tunnel x")
        reply = self.successResultOf(self.control.handle(
            CALLER, "WANIPConnection", f"{V2}#GetExternalIPAddress",
            f'<s:Envelope xmlns:s="{soap.NS_ENVELOPE}"><s:Body><u:AddPortMapping xmlns:u="{V2}">'
            f"{''.join(f'<{k}>{v}</{k}>' for k, v in add_args().items())}</u:AddPortMapping></s:Body>"
            f"</s:Envelope>".encode()))
        self.assertNotIn(b"10.9.8.7", reply.body)

    def test_get_generic_past_end_is_713(self):
        self.assertEqual(self.fault("GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"}), 713)

    def test_get_specific_unknown_is_714(self):
        args = {"NewRemoteHost": "", "NewExternalPort": "5000", "NewProtocol": "TCP"}
        self.assertEqual(self.fault("GetSpecificPortMappingEntry", args), 714)

    def test_lease_reported_within_the_v2_range(self):
        self.ok("AddPortMapping", add_args())
        self.iwf.set_lease_remaining(SUB, 0, 10**6)
        out = self.ok("GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"})
        self.assertEqual(out["NewLeaseDuration"], str(MAX_LEASE_V2))

    def test_delete(self):
        self.ok("AddPortMapping", add_args())
        key = {"NewRemoteHost": "", "NewExternalPort": "5000", "NewProtocol": "TCP"}
        self.assertEqual(self.ok("DeletePortMapping", key), {})
        self.assertEqual(self.iwf.calls[-1], ("delete_mapping", (CALLER, MappingKey(None, 5000, "TCP"))))
        self.assertEqual(self.fault("DeletePortMapping", key), 714)

    def range_args(self, start, end, protocol="TCP", manage="0"):
        return {"NewStartPort": str(start), "NewEndPort": str(end), "NewProtocol": protocol, "NewManage": manage}

    def test_delete_range(self):
        for port in ("5000", "5001", "6000"):
            self.ok("AddPortMapping", add_args(NewExternalPort=port, NewInternalPort=port))
        self.assertEqual(self.ok("DeletePortMappingRange", self.range_args(5000, 5999)), {})
        self.assertEqual([v.external_port for v in self.iwf.tables[SUB.key]], [6000])
        self.assertEqual(self.fault("DeletePortMappingRange", self.range_args(5000, 5999)), 730)
        self.assertEqual(self.fault("DeletePortMappingRange", self.range_args(6001, 6000)), 733)

    def test_delete_range_not_found_from_the_iwf_is_730(self):
        self.iwf.fail_next["delete_range"] = errors.NoSuchEntry()
        self.assertEqual(self.fault("DeletePortMappingRange", self.range_args(1, 2)), 730)

    def test_list_port_mappings(self):
        self.ok("AddPortMapping", add_args(NewPortMappingDescription="a&b"))
        self.ok("AddPortMapping", add_args(NewExternalPort="5001", NewProtocol="UDP"))
        out = self.ok("GetListOfPortMappings", dict(self.range_args(1, 65535), NewNumberOfPorts="0"))
        listing = etree.fromstring(out["NewPortListing"].encode())
        p = f"{{{NS_PORT_LISTING}}}"
        self.assertEqual(listing.tag, p + "PortMappingList")
        (entry,) = listing
        self.assertEqual([(el.tag[len(p):], el.text or "") for el in entry],
                         [("NewRemoteHost", ""), ("NewExternalPort", "5000"), ("NewProtocol", "TCP"),
                          ("NewInternalPort", "5000"), ("NewInternalClient", "192.168.1.10"), ("NewEnabled", "1"),
                          ("NewDescription", "a&b"), ("NewLeaseTime", "3600")])
        self.assertEqual(self.iwf.calls[-1][1][-1], None)  # NewNumberOfPorts 0 = no limit

    def test_list_port_mappings_faults(self):
        self.assertEqual(self.fault("GetListOfPortMappings", dict(self.range_args(1, 9), NewNumberOfPorts="0")), 730)
        self.assertEqual(self.fault("GetListOfPortMappings", dict(self.range_args(9, 1), NewNumberOfPorts="0")), 733)

    def test_status_info(self):
        out = self.ok("GetStatusInfo")
        self.assertEqual(out, {"NewConnectionStatus": "Connected", "NewLastConnectionError": "ERROR_NONE",
                               "NewUptime": "0"})
        self.clock.advance(42)
        self.iwf.connected = False
        out = self.ok("GetStatusInfo")
        self.assertEqual((out["NewConnectionStatus"], out["NewUptime"]), ("Disconnected", "42"))

    def test_status_info_iwf_error(self):
        self.iwf.fail_next["connection_status"] = errors.ServerUnreachable()
        self.assertEqual(self.fault("GetStatusInfo"), 501)

    def test_external_ip_address(self):
        self.assertEqual(self.ok("GetExternalIPAddress"), {"NewExternalIPAddress": "198.51.100.7"})
        self.iwf.external = None
        self.assertEqual(self.ok("GetExternalIPAddress"), {"NewExternalIPAddress": ""})

    def test_connection_actions(self):
        self.assertEqual(self.ok("GetConnectionTypeInfo"),
                         {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"})
        self.assertEqual(self.ok("GetNATRSIPStatus"), {"NewRSIPAvailable": "0", "NewNATEnabled": "1"})
        self.assertEqual(self.ok("SetConnectionType", {"NewConnectionType": "IP_Routed"}), {})
        self.assertEqual(self.fault("SetConnectionType", {"NewConnectionType": "IP_Bridged"}), 731)
        self.assertEqual(self.fault("SetConnectionType", {"NewConnectionType": "PPPoE"}), 601)
        self.assertEqual(self.ok("RequestConnection"), {})
        self.assertEqual(self.fault("ForceTermination"), 606)

    def test_common_interface_config(self):
        call = dict(ns=CMN, service="WANCommonInterfaceConfig")
        self.assertEqual(self.ok("GetCommonLinkProperties", **call),
                         {"NewWANAccessType": "Ethernet", "NewLayer1UpstreamMaxBitRate": "100",
                          "NewLayer1DownstreamMaxBitRate": "200", "NewPhysicalLinkStatus": "Up"})
        for counter in ("BytesSent", "BytesReceived", "PacketsSent", "PacketsReceived"):
            self.assertEqual(self.ok(f"GetTotal{counter}", **call), {f"NewTotal{counter}": "0"})

    def test_unknown_action_is_401(self):
        self.assertEqual(self.fault("Frobnicate"), 401)

    def test_wrong_service_for_the_control_url_is_401(self):
        self.assertEqual(self.fault("GetCommonLinkProperties", ns=CMN), 401)
        self.assertEqual(self.fault("GetExternalIPAddress", service="WANCommonInterfaceConfig"), 401)
        self.assertEqual(self.fault("GetExternalIPAddress", ns="urn:schemas-upnp-org:service:WANIPConnection:3"),
                         401)

    def test_v1_namespace_gets_v1_rules(self):
        """A client given the IGD:1 description (clients.md R1) talks :1 and gets :1 rules."""
        self.ok("AddPortMapping", add_args(NewLeaseDuration="0"), ns=V1)
        self.assertIsNone(self.last_request().lease)
        self.assertEqual(self.fault("AddAnyPortMapping", add_args(), ns=V1), 401)
        self.iwf.fail_next["add_mapping"] = errors.NotAuthorized()
        self.assertEqual(self.fault("AddPortMapping", add_args(), ns=V1), 718)

    def test_query_state_variable(self):
        query = dict(ns=soap.NS_CONTROL)
        self.assertEqual(self.ok("QueryStateVariable", {"varName": "ConnectionStatus"}, **query),
                         {"return": "Connected"})
        self.ok("AddPortMapping", add_args())
        self.assertEqual(self.ok("QueryStateVariable", {"varName": "PortMappingNumberOfEntries"}, **query),
                         {"return": "1"})
        self.assertEqual(self.ok("QueryStateVariable", {"varName": "PhysicalLinkStatus"}, ns=soap.NS_CONTROL,
                                 service="WANCommonInterfaceConfig"), {"return": "Up"})
        self.assertEqual(self.fault("QueryStateVariable", {"varName": "Nonsense"}, **query), 404)
        self.assertEqual(self.fault("QueryStateVariable", {"varName": "PortMappingProtocol"}, **query), 404)
        self.assertEqual(self.fault("QueryStateVariable", {"varName": "PhysicalLinkStatus"}, **query), 404)
        self.assertEqual(self.fault("QueryStateVariable", {}, **query), 402)
        self.assertEqual(self.fault("Other", {}, **query), 401)

    def test_codec_errors_become_faults(self):
        reply = self.successResultOf(self.control.handle(CALLER, "WANIPConnection", f"{V2}#AddPortMapping", b"junk"))
        self.assertEqual(reply.status, 500)
        self.assertIn(b"<errorCode>402</errorCode>", reply.body)
        reply = self.successResultOf(self.control.handle(CALLER, "WANIPConnection", None, b"junk"))
        self.assertIn(b"<errorCode>401</errorCode>", reply.body)

    def test_each_caller_sees_its_own_address_rule(self):
        self.ok("AddPortMapping", add_args(NewInternalClient=""), caller=OTHER)
        self.assertEqual(self.iwf.tables[SUB.key][0].internal_client, OTHER.address)

    def test_every_scpd_action_has_code(self):
        spec = default_specs()["WANIPConnection", 2]
        extra = spec.document.replace(b"<name>GetExternalIPAddress</name>", b"<name>GetSomethingNew</name>")
        specs = dict(default_specs())
        specs["WANIPConnection", 2] = parse_spec(extra, "WANIPConnection", 2)
        Control(self.iwf, 2, self.clock, specs=specs)  # reads state only: still covered
        extra = spec.document.replace(b"<name>DeletePortMapping</name>", b"<name>DeleteSomething</name>")
        specs["WANIPConnection", 2] = parse_spec(extra, "WANIPConnection", 2)
        self.assertRaises(ScpdError, Control, self.iwf, 2, self.clock, specs=specs)


class V1Tests(ControlCase):
    version = 1

    def test_lease_zero_is_infinite(self):
        self.ok("AddPortMapping", add_args(NewLeaseDuration="0"))
        self.assertIsNone(self.last_request().lease)

    def test_long_lease_passes_through(self):
        self.ok("AddPortMapping", add_args(NewLeaseDuration="1000000"))
        self.assertEqual(self.last_request().lease, 1000000)
        self.iwf.set_lease_remaining(SUB, 0, 1000000)
        self.assertEqual(self.ok("GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"})["NewLeaseDuration"],
                         "1000000")

    def test_external_port_zero_means_internal_port(self):
        self.ok("AddPortMapping", add_args(NewExternalPort="0", NewInternalPort="7000"))
        self.assertEqual(self.last_request().external_port, 7000)

    def test_internal_port_zero_is_402(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalPort="0")), 402)

    def test_value_errors_are_402(self):
        self.assertEqual(self.fault("AddPortMapping", add_args(NewProtocol="ICMP")), 402)
        self.assertEqual(self.fault("AddPortMapping", add_args(NewEnabled="0")), 402)
        self.assertEqual(self.fault("AddPortMapping", add_args(NewInternalClient="pc.lan")), 402)
        self.assertEqual(self.fault("SetConnectionType", {"NewConnectionType": "PPPoE"}), 402)

    def test_iwf_errors_as_igd1(self):
        for error, code in ((errors.NotAuthorized(), 718), (errors.NoResources(), 501),
                            (errors.QuotaExceeded(), 501), (errors.ServerUnreachable(), 501),
                            (errors.WildcardNotPermitted("internal_client"), 715)):
            self.iwf.fail_next["add_mapping"] = error
            self.assertEqual(self.fault("AddPortMapping", add_args()), code, error)

    def test_connection_actions(self):
        self.assertEqual(self.fault("SetConnectionType", {"NewConnectionType": "IP_Bridged"}), 501)
        self.assertEqual(self.fault("ForceTermination"), 501)
        self.assertEqual(self.ok("RequestConnection"), {})

    def test_v2_actions_and_namespace_are_not_served(self):
        self.assertEqual(self.fault("AddAnyPortMapping", add_args()), 401)
        self.assertEqual(self.fault("GetListOfPortMappings", {}), 401)
        self.assertEqual(self.fault("GetExternalIPAddress", ns=V2), 401)

    def test_happy_paths(self):
        self.ok("AddPortMapping", add_args())
        self.assertEqual(self.ok("GetExternalIPAddress"), {"NewExternalIPAddress": "198.51.100.7"})
        self.assertEqual(self.ok("GetStatusInfo")["NewConnectionStatus"], "Connected")
        self.assertEqual(self.ok("GetSpecificPortMappingEntry", {"NewRemoteHost": "", "NewExternalPort": "5000",
                                                                 "NewProtocol": "TCP"})["NewInternalPort"], "5000")
        self.assertEqual(self.ok("DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": "5000",
                                                       "NewProtocol": "TCP"}), {})
        self.assertEqual(self.fault("GetGenericPortMappingEntry", {"NewPortMappingIndex": "0"}), 713)
        self.assertEqual(self.ok("QueryStateVariable", {"varName": "ExternalIPAddress"}, ns=soap.NS_CONTROL),
                         {"return": "198.51.100.7"})


# iwf.md section D, as written there (PCP result -> (IGD:1, IGD:2)); CANNOT_PROVIDE_EXTERNAL
# is the adding case (the delete path turns it into NoSuchEntry, RFC 6970 section 5.8).
SECTION_D = {
    ResultCode.UNSUPP_VERSION: (501, 501), ResultCode.NOT_AUTHORIZED: (718, 606),
    ResultCode.MALFORMED_REQUEST: (501, 501), ResultCode.UNSUPP_OPCODE: (501, 501),
    ResultCode.UNSUPP_OPTION: (501, 501), ResultCode.MALFORMED_OPTION: (501, 501),
    ResultCode.NETWORK_FAILURE: (501, 501), ResultCode.NO_RESOURCES: (501, 728),
    ResultCode.UNSUPP_PROTOCOL: (501, 501), ResultCode.USER_EX_QUOTA: (501, 728),
    ResultCode.CANNOT_PROVIDE_EXTERNAL: (718, 718), ResultCode.ADDRESS_MISMATCH: (501, 501),
    ResultCode.EXCESSIVE_REMOTE_PEERS: (501, 501),
    **{ResultCode(code): (501, 501) for code in range(14, 27)},
}
SPEC = Path(__file__).resolve().parent.parent.parent / "shared" / "spec" / "iwf.md"


def section_d_from_spec(text):
    """Rows of the section D table: {result code: (IGD:1, IGD:2)}; the no-reply row under None."""
    section = text.split("## D.", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.search(r"\b\d{3}\b", cells[1]):
            continue
        v1 = int(re.search(r"\b\d{3}\b", cells[1]).group())
        v2 = v1 if cells[2] == "same" else int(re.search(r"\b\d{3}\b", cells[2]).group())
        if cells[0].startswith("no reply"):
            table[None] = (v1, v2)
        for low, high in re.findall(r"(\d+)[–-](\d+)", cells[0]):
            table.update({ResultCode(c): (v1, v2) for c in range(int(low), int(high) + 1)})
        if re.match(r"\d+ [A-Z_]+", cells[0]):
            table[ResultCode(int(cells[0].split()[0]))] = (v1, v2)
    return table


class ResultTableTests(SynchronousTestCase):
    def composed(self, result):
        error = errors.error_for_result(result)
        return faults.code_for(error, 1), faults.code_for(error, 2)

    def test_every_result_code_as_section_d_says(self):
        for result in ResultCode:
            if result is ResultCode.SUCCESS:
                continue
            self.assertEqual(self.composed(result), SECTION_D[result], result.name)

    def test_no_reply_is_501(self):
        error = errors.ServerUnreachable()
        self.assertEqual((faults.code_for(error, 1), faults.code_for(error, 2)), (501, 501))

    def test_section_d_copy_matches_the_spec(self):
        if not SPEC.exists():
            self.skipTest(f"{SPEC} not present")
        table = section_d_from_spec(SPEC.read_text())
        self.assertEqual(table.pop(None), (501, 501))
        self.assertEqual(table, SECTION_D)

    def test_igd2_never_sends_724_to_727(self):
        for codes in faults.IWF_ERRORS.values():
            self.assertNotIn(codes[1], (724, 725, 726, 727))
            self.assertIn(codes[0], faults.ERROR_NAMES)
            self.assertIn(codes[1], faults.ERROR_NAMES)

    def test_wildcards_by_field(self):
        for field, codes in (("external_port", (716, 716)), ("internal_port", (402, 732)),
                             ("internal_client", (715, 715))):
            error = errors.WildcardNotPermitted(field)
            self.assertEqual((faults.code_for(error, 1), faults.code_for(error, 2)), codes)
