"""The HTTP face on a real socket: framing (clients.md R14), routing, and a strict
async-upnp-client run proving that the SCPDs match the answers (clients.md R11)."""

from __future__ import annotations

import json
import os
import sys
from ipaddress import ip_address

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from igdpcp.subscriber import Caller, Subscriber
from igdpcp.upnp import soap
from igdpcp.upnp.description import DeviceInfo, igd_models
from igdpcp.upnp.http import SERVER, UPnPResource, make_site

from .fakes import FakePortMappingService

SUB = Subscriber("tun1", b"\x01")
V2 = "urn:schemas-upnp-org:service:WANIPConnection:2"


class _Raw(Protocol):
    """Writes bytes, collects everything until the server closes."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.chunks = []
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.closed.callback(b"".join(self.chunks))


def split(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def soap_request(action="GetExternalIPAddress", args="", header=b"SOAPAction", ns=V2, extra=b""):
    body = (f'<?xml version="1.0"?><s:Envelope xmlns:s="{soap.NS_ENVELOPE}" s:encodingStyle="{soap.NS_ENCODING}">'
            f'<s:Body><u:{action} xmlns:u="{ns}">{args}</u:{action}></s:Body></s:Envelope>').encode()
    return (b"POST /ctl/IPConn HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n"
            + header + b': "' + f"{ns}#{action}".encode() + b'"\r\n' + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


class HTTPTests(TestCase):
    timeout = 60
    version = 2

    def setUp(self):
        self.iwf = FakePortMappingService()
        self.events = Resource()
        self.events.isLeaf = True
        self.events.render = lambda request: b"event " + request.method
        self.allowed = True
        self.resource = UPnPResource(
            igd_models(self.version, b"s" * 16, "tun1"), self.iwf, self.caller_for, reactor,
            info=DeviceInfo(), event_resources={"/evt/IPConn": self.events})
        self.port = reactor.listenTCP(0, make_site(self.resource), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def caller_for(self, request):
        if not self.allowed:
            return None
        return Caller(SUB, ip_address(request.getClientAddress().host))

    def raw(self, payload: bytes) -> defer.Deferred:
        proto = _Raw(payload)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        return connectProtocol(endpoint, proto).addCallback(lambda _: proto.closed)

    def get(self, path: bytes, agent: bytes = b"test", method: bytes = b"GET"):
        return self.raw(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: " + agent
                        + b"\r\nConnection: close\r\n\r\n").addCallback(split)

    @defer.inlineCallbacks
    def test_control_framing(self):
        """Content-Length, never chunked, Connection: close -- and the server closes by itself."""
        raw = yield self.raw(soap_request())  # no Connection: close from the client
        status, headers, body = split(raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(status, 200)
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(headers[b"content-type"], [b'text/xml; charset="utf-8"'])
        self.assertEqual(headers[b"ext"], [b""])
        self.assertEqual(headers[b"server"], [SERVER])
        self.assertIn(b"<NewExternalIPAddress>198.51.100.7</NewExternalIPAddress>", body)

    @defer.inlineCallbacks
    def test_fault_is_500_with_length(self):
        raw = yield self.raw(soap_request("GetGenericPortMappingEntry", "<NewPortMappingIndex>3</NewPortMappingIndex>",
                                          header=b"Soapaction"))
        status, headers, body = split(raw)
        self.assertEqual(status, 500)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertIn(b"<errorCode>713</errorCode>", body)

    @defer.inlineCallbacks
    def test_http10_and_lowercase_header(self):
        request = soap_request(header=b"soapaction").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        status, headers, body = split((yield self.raw(request)))
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])

    @defer.inlineCallbacks
    def test_oversized_by_content_length_is_413_unread(self):
        head = b"POST /ctl/IPConn HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        status, headers, _ = split((yield self.raw(head + b"<x>")))  # the rest is never sent
        self.assertEqual(status, 413)
        self.assertEqual(self.iwf.calls, [])

    @defer.inlineCallbacks
    def test_oversized_with_expect_continue_gets_no_100(self):
        head = (b"POST /ctl/IPConn HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 1000000\r\n\r\n")
        raw = yield self.raw(head)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)

    @defer.inlineCallbacks
    def test_oversized_chunked_is_413(self):
        chunk = b"x" * 4096
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
        head = b"POST /ctl/IPConn HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        status, _, _ = split((yield self.raw(head + body)))
        self.assertEqual(status, 413)
        self.assertEqual(self.iwf.calls, [])

    @defer.inlineCallbacks
    def test_body_at_the_cap_is_served(self):
        request = soap_request("GetExternalIPAddress")
        body = request.partition(b"\r\n\r\n")[2]
        padded = body.replace(b"<s:Body>", b"<s:Body>" + b" " * (soap.MAX_BODY - len(body)))
        self.assertEqual(len(padded), soap.MAX_BODY)
        request = request.replace(body, padded).replace(b"Content-Length: %d" % len(body),
                                                        b"Content-Length: %d" % len(padded))
        status, _, _ = split((yield self.raw(request)))
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_description(self):
        status, headers, body = yield self.get(b"/rootDesc.xml")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b'text/xml; charset="utf-8"'])
        self.assertEqual(headers[b"content-length"], [b"%d" % len(body)])
        self.assertIn(b"InternetGatewayDevice:2", body)

    @defer.inlineCallbacks
    def test_microsoft_gets_v1_and_its_scpd(self):
        _, _, body = yield self.get(b"/rootDesc.xml", agent=b"Microsoft-Windows/10.0 UPnP/1.0")
        self.assertIn(b"InternetGatewayDevice:1", body)
        self.assertNotIn(b"InternetGatewayDevice:2", body)
        self.assertIn(b"/WANIPCn1.xml", body)
        status, _, scpd = yield self.get(b"/WANIPCn1.xml", agent=b"Microsoft-Windows/10.0 UPnP/1.0")
        self.assertEqual(status, 200)
        self.assertNotIn(b"AddAnyPortMapping", scpd)
        # and it may call through the v1 namespace on the same control URL
        raw = yield self.raw(soap_request(ns="urn:schemas-upnp-org:service:WANIPConnection:1"))
        self.assertEqual(split(raw)[0], 200)

    @defer.inlineCallbacks
    def test_scpds_served(self):
        for path, needle in ((b"/WANIPCn2.xml", b"AddAnyPortMapping"), (b"/WANCfg.xml", b"GetCommonLinkProperties")):
            status, headers, body = yield self.get(path)
            self.assertEqual(status, 200)
            self.assertIn(needle, body)
            self.assertEqual(headers[b"content-type"], [b'text/xml; charset="utf-8"'])

    @defer.inlineCallbacks
    def test_head_description(self):
        status, headers, body = yield self.get(b"/rootDesc.xml", method=b"HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertNotEqual(headers[b"content-length"], [b"0"])

    @defer.inlineCallbacks
    def test_presentation_page(self):
        status, headers, body = yield self.get(b"/")
        self.assertEqual(status, 200)
        self.assertIn(b"text/html", headers[b"content-type"][0])

    @defer.inlineCallbacks
    def test_unknown_path_404_wrong_method_405(self):
        self.assertEqual((yield self.get(b"/nothing"))[0], 404)
        self.assertEqual((yield self.get(b"/ctl/IPConn/extra"))[0], 404)
        status, headers, _ = yield self.get(b"/ctl/IPConn")
        self.assertEqual((status, headers[b"allow"]), (405, [b"POST"]))
        self.assertEqual((yield self.get(b"/rootDesc.xml", method=b"POST"))[0], 405)
        self.assertEqual((yield self.get(b"/rootDesc.xml", method=b"DELETE"))[0], 405)

    @defer.inlineCallbacks
    def test_event_resources_are_mounted(self):
        status, _, body = yield self.get(b"/evt/IPConn", method=b"SUBSCRIBE")
        self.assertEqual((status, body), (200, b"event SUBSCRIBE"))
        self.assertEqual((yield self.get(b"/evt/CmnIfCfg", method=b"SUBSCRIBE"))[0], 404)

    @defer.inlineCallbacks
    def test_no_caller_is_403(self):
        self.allowed = False
        self.assertEqual(split((yield self.raw(soap_request())))[0], 403)
        self.assertEqual(self.iwf.calls, [])

    @defer.inlineCallbacks
    def test_vanished_client_costs_nothing(self):
        """The answer to a client that hung up is dropped; the mapping stays made."""
        self.iwf.hold = True
        proto = _Raw(soap_request("AddPortMapping", "".join(
            f"<{k}>{v}</{k}>" for k, v in (("NewRemoteHost", ""), ("NewExternalPort", "5000"), ("NewProtocol", "TCP"),
                                           ("NewInternalPort", "5000"), ("NewInternalClient", ""),
                                           ("NewEnabled", "1"), ("NewPortMappingDescription", "x"),
                                           ("NewLeaseDuration", "0")))))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), proto)
        while not self.iwf.held:
            yield task.deferLater(reactor, 0.01, lambda: None)
        proto.transport.abortConnection()
        yield proto.closed
        yield task.deferLater(reactor, 0.05, lambda: None)  # let the server see the close
        d, view = self.iwf.held.pop()
        d.callback(view)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(self.iwf.tables[SUB.key]), 1)


CLIENT = r"""
import asyncio, json, sys
from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionResponseError

async def main(url, version):
    device = await UpnpFactory(AiohttpRequester(), non_strict=False).async_create_device(url)
    ip = next(s for s in device.all_services if ":WANIPConnection:" in s.service_type)
    cmn = next(s for s in device.all_services if ":WANCommonInterfaceConfig:" in s.service_type)
    out = {"device_type": device.device_type, "service_type": ip.service_type}
    call = lambda service, name, **args: service.action(name).async_call(**args)
    mapping = dict(NewRemoteHost="", NewExternalPort=5000, NewProtocol="TCP", NewInternalPort=5000,
                   NewInternalClient="127.0.0.1", NewEnabled=True, NewPortMappingDescription="a & b <c>",
                   NewLeaseDuration=0)
    out["add"] = await call(ip, "AddPortMapping", **mapping)
    out["generic"] = await call(ip, "GetGenericPortMappingEntry", NewPortMappingIndex=0)
    out["specific"] = await call(ip, "GetSpecificPortMappingEntry", NewRemoteHost="", NewExternalPort=5000,
                                 NewProtocol="TCP")
    # every action without in-arguments, strictly validated against the SCPD
    for service in (ip, cmn):
        for name, action in service.actions.items():
            if not action.in_arguments() and name not in ("ForceTermination",):
                out[name] = await action.async_call()
    out["SetConnectionType"] = await call(ip, "SetConnectionType", NewConnectionType="IP_Routed")
    try:
        await call(ip, "GetGenericPortMappingEntry", NewPortMappingIndex=7)
    except UpnpActionResponseError as exc:
        out["fault"] = [exc.status, exc.error_code, exc.error_desc]
    if version == 2:
        out["any"] = await call(ip, "AddAnyPortMapping", **mapping)
        out["list"] = await call(ip, "GetListOfPortMappings", NewStartPort=1, NewEndPort=65535, NewProtocol="TCP",
                                 NewManage=True, NewNumberOfPorts=0)
        out["range"] = await call(ip, "DeletePortMappingRange", NewStartPort=1, NewEndPort=65535, NewProtocol="TCP",
                                  NewManage=True)
    out["delete"] = await call(ip, "DeletePortMapping", NewRemoteHost="", NewExternalPort=5000, NewProtocol="TCP") \
        if version == 1 else None
    print(json.dumps(out, default=str))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


class StrictClientTests(TestCase):
    """async-upnp-client in strict mode (non_strict=False) against the real server."""

    timeout = 120

    def serve(self, version):
        self.iwf = FakePortMappingService()
        resource = UPnPResource(igd_models(version, b"s" * 16, "tun1"), self.iwf,
                                lambda request: Caller(SUB, ip_address(request.getClientAddress().host)), reactor)
        port = reactor.listenTCP(0, make_site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/rootDesc.xml"

    @defer.inlineCallbacks
    def run_client(self, version):
        url = self.serve(version)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", CLIENT, url, str(version)], env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, 0, err.decode(errors="replace")[-3000:])
        return json.loads(out)

    def check_common(self, out, version):
        self.assertEqual(out["device_type"], f"urn:schemas-upnp-org:device:InternetGatewayDevice:{version}")
        self.assertEqual(out["add"], {})
        generic = out["generic"]
        self.assertEqual((generic["NewExternalPort"], generic["NewProtocol"], generic["NewInternalClient"],
                          generic["NewEnabled"], generic["NewPortMappingDescription"]),
                         (5000, "TCP", "127.0.0.1", True, "a & b <c>"))
        self.assertEqual(out["specific"]["NewInternalPort"], 5000)
        self.assertEqual(out["GetExternalIPAddress"], {"NewExternalIPAddress": "198.51.100.7"})
        self.assertEqual(out["GetStatusInfo"]["NewConnectionStatus"], "Connected")
        self.assertEqual(out["GetNATRSIPStatus"], {"NewRSIPAvailable": False, "NewNATEnabled": True})
        self.assertEqual(out["GetConnectionTypeInfo"]["NewConnectionType"], "IP_Routed")
        self.assertEqual(out["GetCommonLinkProperties"]["NewPhysicalLinkStatus"], "Up")
        self.assertEqual(out["GetTotalBytesSent"], {"NewTotalBytesSent": 0})
        self.assertEqual(out["SetConnectionType"], {})
        self.assertEqual(out["fault"], [500, 713, "SpecifiedArrayIndexInvalid"])

    @defer.inlineCallbacks
    def test_igd2(self):
        out = yield self.run_client(2)
        self.check_common(out, 2)
        self.assertEqual(out["generic"]["NewLeaseDuration"], 604800)  # lease 0 -> 604800 on IGD:2
        self.assertNotEqual(out["any"]["NewReservedPort"], 0)
        self.assertIn("PortMappingList", out["list"]["NewPortListing"])
        self.assertEqual(out["range"], {})
        self.assertEqual(self.iwf.tables[SUB.key], [])

    @defer.inlineCallbacks
    def test_igd1(self):
        out = yield self.run_client(1)
        self.check_common(out, 1)
        self.assertEqual(out["generic"]["NewLeaseDuration"], 0)  # infinite
        self.assertEqual(out["delete"], {})
        self.assertEqual(self.iwf.tables[SUB.key], [])
