"""Root description, version choice (clients.md R1), and the SCPD files and their model."""

from __future__ import annotations

import shutil
import tempfile

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.upnp import description, scpd
from igdpcp.upnp.description import DeviceInfo, build_description, description_version, igd_models
from igdpcp.upnp.device import igd_model

D = f"{{{description.NS_DEVICE}}}"
S = f"{{{scpd.NS_SERVICE}}}"
SECRET = b"k" * 16


def parse(doc: bytes):
    return etree.fromstring(doc)


class DescriptionTests(SynchronousTestCase):
    def test_v2_tree(self):
        root = parse(build_description(igd_model(2, SECRET, "tun0")))
        self.assertEqual(root.tag, D + "root")
        self.assertEqual((root.findtext(f"{D}specVersion/{D}major"), root.findtext(f"{D}specVersion/{D}minor")),
                         ("1", "1"))
        igd = root.find(D + "device")
        self.assertEqual(igd.findtext(D + "deviceType"), "urn:schemas-upnp-org:device:InternetGatewayDevice:2")
        self.assertEqual(igd.findtext(D + "manufacturer"), "igdpcp")
        self.assertTrue(igd.findtext(D + "modelName"))
        self.assertTrue(igd.findtext(D + "presentationURL"))  # clients.md R6
        self.assertTrue(igd.findtext(D + "UDN").startswith("uuid:"))
        wan = igd.find(f"{D}deviceList/{D}device")
        self.assertEqual(wan.findtext(D + "deviceType"), "urn:schemas-upnp-org:device:WANDevice:2")
        (cmn,) = wan.findall(f"{D}serviceList/{D}service")
        self.assertEqual(
            [cmn.findtext(D + tag) for tag in ("serviceType", "serviceId", "SCPDURL", "controlURL", "eventSubURL")],
            ["urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1", "urn:upnp-org:serviceId:WANCommonIFC1",
             "/WANCfg.xml", "/ctl/CmnIfCfg", "/evt/CmnIfCfg"])
        wcd = wan.find(f"{D}deviceList/{D}device")
        self.assertEqual(wcd.findtext(D + "deviceType"), "urn:schemas-upnp-org:device:WANConnectionDevice:2")
        (ip,) = wcd.findall(f"{D}serviceList/{D}service")
        self.assertEqual(ip.findtext(D + "serviceType"), "urn:schemas-upnp-org:service:WANIPConnection:2")
        self.assertEqual(ip.findtext(D + "SCPDURL"), "/WANIPCn2.xml")
        udns = [el.text for el in root.iter(D + "UDN")]
        self.assertEqual(len(set(udns)), 3)
        for device in root.iter(D + "device"):  # UDA: required on every device
            for tag in ("deviceType", "friendlyName", "manufacturer", "modelName", "UDN"):
                self.assertTrue(device.findtext(D + tag), tag)

    def test_v1_twin_shares_udns_and_paths(self):
        models = igd_models(2, SECRET, "tun0")
        self.assertEqual(sorted(models), [1, 2])
        v1, v2 = (parse(build_description(models[v])) for v in (1, 2))
        self.assertEqual([e.text for e in v1.iter(D + "UDN")], [e.text for e in v2.iter(D + "UDN")])
        self.assertEqual([e.text for e in v1.iter(D + "controlURL")], [e.text for e in v2.iter(D + "controlURL")])
        types = [e.text for e in v1.iter(D + "serviceType")]
        self.assertIn("urn:schemas-upnp-org:service:WANIPConnection:1", types)
        self.assertNotIn(":2", " ".join(e.text for e in v1.iter(D + "deviceType")))
        self.assertEqual(sorted(igd_models(1, SECRET, "tun0")), [1])

    def test_everything_is_escaped(self):
        name = 'A & B <script>"x"</script>'
        info = DeviceInfo(model_name="M&M <1>", manufacturer="a&b")
        doc = build_description(igd_model(1, SECRET, "tun0", friendly_name=name), info)
        self.assertNotIn(b"<script>", doc)
        root = parse(doc)
        self.assertEqual(root.findtext(f"{D}device/{D}friendlyName"), name)
        self.assertEqual(root.findtext(f"{D}device/{D}modelName"), "M&M <1>")

    def test_config_id(self):
        root = parse(build_description(igd_model(1, SECRET, "t"), DeviceInfo(config_id=7)))
        self.assertEqual(root.get("configId"), "7")
        root = parse(build_description(igd_model(1, SECRET, "t"), DeviceInfo(spec_minor=0, config_id=7)))
        self.assertIsNone(root.get("configId"))

    def test_no_tunnel_name_in_the_description(self):
        doc = build_description(igd_model(2, SECRET, "vxlan-4242"))
        self.assertNotIn(b"4242", doc)


class VersionChoiceTests(SynchronousTestCase):
    def test_microsoft_and_fdssdp_get_v1(self):
        for agent in ("Microsoft-Windows/10.0 UPnP/1.0", "MICROSOFT-Windows-NT/5.1", b"FDSSDP", "xbox fdssdp/1"):
            self.assertEqual(description_version(2, agent), 1, agent)

    def test_others_get_the_served_version(self):
        for agent in (None, "", "miniupnpc/2.2", "libtorrent/2.0", "Python/3.11 aiohttp/3 async-upnp-client/0.49"):
            self.assertEqual(description_version(2, agent), 2, agent)
        self.assertEqual(description_version(1, "Microsoft"), 1)


class ScpdFileTests(SynchronousTestCase):
    """The served SCPD files: the action and evented sets the brief and igd.md name."""

    specs = scpd.load_specs()

    V1_ACTIONS = ["SetConnectionType", "GetConnectionTypeInfo", "RequestConnection", "ForceTermination",
                  "GetStatusInfo", "GetNATRSIPStatus", "GetGenericPortMappingEntry", "GetSpecificPortMappingEntry",
                  "AddPortMapping", "DeletePortMapping", "GetExternalIPAddress"]

    def test_actions(self):
        self.assertEqual(list(self.specs["WANIPConnection", 1].actions), self.V1_ACTIONS)
        self.assertEqual(list(self.specs["WANIPConnection", 2].actions),
                         self.V1_ACTIONS + ["AddAnyPortMapping", "DeletePortMappingRange", "GetListOfPortMappings"])
        self.assertEqual(list(self.specs["WANCommonInterfaceConfig", 1].actions),
                         ["GetCommonLinkProperties", "GetTotalBytesSent", "GetTotalBytesReceived",
                          "GetTotalPacketsSent", "GetTotalPacketsReceived"])

    def test_evented_sets(self):
        v1 = {"ConnectionStatus", "ExternalIPAddress", "PortMappingNumberOfEntries", "PossibleConnectionTypes"}
        self.assertEqual(set(self.specs["WANIPConnection", 1].evented), v1)
        self.assertEqual(set(self.specs["WANIPConnection", 2].evented), v1 | {"SystemUpdateID"})
        self.assertEqual(set(self.specs["WANCommonInterfaceConfig", 1].evented), {"PhysicalLinkStatus"})

    def test_types_values_and_ranges(self):
        v1, v2 = self.specs["WANIPConnection", 1].variables, self.specs["WANIPConnection", 2].variables
        self.assertEqual(v2["PortMappingProtocol"].allowed_values, ("TCP", "UDP"))
        self.assertEqual((v2["PortMappingLeaseDuration"].minimum, v2["PortMappingLeaseDuration"].maximum),
                         (0, 604800))
        self.assertIsNone(v1["PortMappingLeaseDuration"].maximum)
        self.assertEqual({name: v.data_type for name, v in v2.items() if v.data_type != "string"}, {
            "Uptime": "ui4", "RSIPAvailable": "boolean", "NATEnabled": "boolean",
            "PortMappingNumberOfEntries": "ui2", "PortMappingEnabled": "boolean",
            "PortMappingLeaseDuration": "ui4", "ExternalPort": "ui2", "InternalPort": "ui2",
            "SystemUpdateID": "ui4", "A_ARG_TYPE_Manage": "boolean"})
        self.assertIn("Connected", v1["ConnectionStatus"].allowed_values)
        self.assertIn("IP_Routed", v1["PossibleConnectionTypes"].allowed_values)

    def test_argument_shapes(self):
        add = self.specs["WANIPConnection", 2].actions["AddAnyPortMapping"]
        self.assertEqual([a.name for a in add.inputs],
                         ["NewRemoteHost", "NewExternalPort", "NewProtocol", "NewInternalPort", "NewInternalClient",
                          "NewEnabled", "NewPortMappingDescription", "NewLeaseDuration"])
        self.assertEqual([(a.name, a.variable.name) for a in add.outputs], [("NewReservedPort", "ExternalPort")])
        listing = self.specs["WANIPConnection", 2].actions["GetListOfPortMappings"]
        self.assertEqual([a.name for a in listing.inputs],
                         ["NewStartPort", "NewEndPort", "NewProtocol", "NewManage", "NewNumberOfPorts"])

    def test_document_is_the_file(self):
        self.assertEqual(self.specs["WANIPConnection", 1].document,
                         (scpd.DEFAULT_SCPD_DIR / "WANIPConnection1.xml").read_bytes())
        root = parse(self.specs["WANIPConnection", 1].document)
        self.assertEqual(root.tag, S + "scpd")

    def test_directory_is_overridable(self):
        self.assertRaises(scpd.ScpdError, scpd.load_specs, "/nonexistent")
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        shutil.copytree(scpd.DEFAULT_SCPD_DIR, tmp, dirs_exist_ok=True)
        self.assertEqual(set(scpd.load_specs(tmp)), set(scpd.SCPD_FILES))

    def test_bad_documents(self):
        for doc in (b"<x/>", b"not xml",
                    f'<scpd xmlns="{scpd.NS_SERVICE}"><serviceStateTable><stateVariable><name>A</name>'
                    f"<dataType>float</dataType></stateVariable></serviceStateTable></scpd>".encode(),
                    f'<scpd xmlns="{scpd.NS_SERVICE}"><actionList><action><name>X</name><argumentList><argument>'
                    f"<name>A</name><direction>in</direction><relatedStateVariable>Nope</relatedStateVariable>"
                    f"</argument></argumentList></action></actionList></scpd>".encode()):
            self.assertRaises(scpd.ScpdError, scpd.parse_spec, doc, "X", 1)


class ValueTests(SynchronousTestCase):
    variables = scpd.load_specs()["WANIPConnection", 2].variables

    def test_parse(self):
        v = self.variables
        self.assertEqual(v["ExternalPort"].parse(" 80 "), 80)
        self.assertEqual(v["PortMappingProtocol"].parse("tcp"), "TCP")
        self.assertEqual([v["PortMappingEnabled"].parse(x) for x in ("1", "true", "YES", "0", "False", "no")],
                         [True, True, True, False, False, False])
        self.assertEqual(v["PortMappingLeaseDuration"].parse("99999999999", bounded=False), 99999999999)

    def test_parse_errors(self):
        v = self.variables
        for var, text, kind in (("ExternalPort", "65536", "type"), ("ExternalPort", "1_000", "type"),
                                ("ExternalPort", "", "type"), ("PortMappingEnabled", "2", "type"),
                                ("PortMappingProtocol", "SCTP", "range"),
                                ("PortMappingLeaseDuration", "604801", "range"),
                                ("PortMappingLeaseDuration", "-1", "type")):
            with self.assertRaises(scpd.ArgumentError) as cm:
                v[var].parse(text, bounded=not text.startswith("-"))
            self.assertEqual(cm.exception.kind, kind, (var, text))

    def test_format(self):
        v = self.variables
        self.assertEqual(v["PortMappingEnabled"].format(True), "1")
        self.assertEqual(v["ExternalPort"].format(65535), "65535")
        for var, value in (("ExternalPort", 65536), ("ExternalPort", True), ("ExternalPort", "80"),
                           ("PortMappingLeaseDuration", 604801), ("PortMappingProtocol", "tcp"),
                           ("PortMappingEnabled", 1), ("RemoteHost", None)):
            self.assertRaises(ValueError, v[var].format, value)
