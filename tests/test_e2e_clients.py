"""End to end with real UPnP clients: upnpc (miniupnpc 2.2.4), async-upnp-client in strict
mode and GUPnP-IGD, each in its own subscriber namespace with identical addressing
(192.168.1.10 <-> igdpcp 192.168.1.1), each result checked in the lab CGN's table.

Topology (tests/e2e.py): netns iwf (pcplab + igdpcp) and one netns per subscriber.
Clients discover igdpcp by SSDP, never with ``upnpc -u`` or ``-i``: igdpcp must look
connected with the CGN's public-looking pool address 5.5.5.5 (clients.md R7).  The
pool is one address, so subscribers with the same internal port need different
external ports.  Each test uses its own subscriber(s) and external ports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
import unittest

from lxml import etree

from .e2e import IWF_ADDRESS, SUBSCRIBER_ADDRESS, TCP, UDP, WANIP2, TopologyCase, add_args, listed, upnp_error

GI_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi and gir1.2-gupnpigd-1.0


class UpnpcTests(TopologyCase):
    """miniupnpc 2.2.4's upnpc against an IGD:1 igdpcp (the default), four subscribers."""

    prefix = "e2eu"
    topology_args = {"subscribers": 4}

    def test_status_connected_public_address(self):
        """-s without -i: a valid, connected IGD whose external address is the pool's."""
        out = self.upnpc_ok(1, "-s")
        self.assertIn("Status : Connected", out)
        self.assertIn("ExternalIPAddress = 5.5.5.5", out)

    def test_add_list_delete(self):
        """-a maps on the CGN under subscriber 1's THIRD_PARTY_ID; -l lists it; -d deletes it there."""
        out = self.upnpc_ok(1, "-e", "e2e add", "-a", SUBSCRIBER_ADDRESS, "8080", "18080", "TCP", "3600")
        self.assertIn("external 5.5.5.5:18080 TCP is redirected to internal 192.168.1.10:8080", out)
        m = self.assertOnCGN(1, 8080, external_port=18080, description="e2e add")
        self.assertLessEqual(m["lifetime"], 3600)

        rows = listed(self.upnpc_ok(1, "-l"))
        self.assertEqual(len(rows), 1, rows)
        self.assertEqual(rows[0][:5], ("TCP", 18080, SUBSCRIBER_ADDRESS, 8080, "e2e add"))
        self.assertTrue(3500 < rows[0][5] <= 3600, rows)

        out = self.upnpc_ok(1, "-d", "18080", "TCP")
        self.assertNotIn("failed", out)
        self.assertEqual(self.topo.cgn_mappings(1), [])
        self.assertEqual(upnp_error(self.topo.soap(1, "GetGenericPortMappingEntry", [
            ("NewPortMappingIndex", "0")])), 713, "the IWF still lists the deleted mapping")

    def test_identifiers_stay_private(self):
        """Neither the THIRD_PARTY_ID nor the tunnel's name reaches a subscriber (SSDP,
        description, SOAP answers and faults, headers) or igdpcp's log in clear."""
        topo = self.topo
        self.upnpc_ok(3, "-e", "privacy", "-a", SUBSCRIBER_ADDRESS, "8070", "18070", "TCP", "600")
        secrets = [topo.tpid_hex(3), topo.ifname(3)]
        seen = [answer for answer in topo.ssdp_search(3, st="ssdp:all")]
        seen.append(str(topo.http(3, f"GET /rootDesc.xml HTTP/1.1\r\nHost: {IWF_ADDRESS}\r\n"
                                     "Connection: close\r\n\r\n".encode())))
        seen.append(str(topo.soap(3, "GetGenericPortMappingEntry", [("NewPortMappingIndex", "0")])))
        seen.append(str(topo.soap(3, "AddPortMapping", add_args(18070, 8071))))  # a 718 fault
        seen.append(str(topo.soap(3, "NoSuchAction")))
        self.assertIn("privacy", seen[-3])  # the listing really came back
        for text in seen:
            for secret in secrets:
                self.assertNotIn(secret, text)
        log = topo.igdpcp_log()
        self.assertIn("igdpcp", log)  # the log was read
        for secret in secrets:
            self.assertNotIn(secret, log)
        self.upnpc_ok(3, "-d", "18070", "TCP")

    def test_redirect_list_and_lease_zero(self):
        """-r maps several ports to the caller at once; lease 0 (upnpc's default) is accepted."""
        out = self.upnpc_ok(2, "-r", "8081", "TCP", "8082", "UDP")
        self.assertNotIn("failed", out)
        self.assertOnCGN(2, 8081, TCP, external_port=8081)
        self.assertOnCGN(2, 8082, UDP, external_port=8082)
        # lease 0 from upnpc: never 725 OnlyPermanentLeasesSupported or 402 (clients.md R8)
        out = self.upnpc_ok(2, "-a", SUBSCRIBER_ADDRESS, "8083", "18083", "TCP", "0")
        self.assertNotIn("failed", out)
        self.assertIn("is redirected to internal 192.168.1.10:8083", out)
        m = self.assertOnCGN(2, 8083, external_port=18083)
        self.assertGreater(m["lifetime"], 3000)  # kept by renewals (pcp_lifetime 3600)
        rows = {(r[0], r[1]): r for r in listed(self.upnpc_ok(2, "-l"))}
        self.assertEqual(set(rows), {("TCP", 8081), ("UDP", 8082), ("TCP", 18083)})
        self.assertEqual(rows[("TCP", 18083)][5], 0, "an IGD:1 lease 0 stays 0 (infinite)")
        # the same by hand: HTTP 200, no fault
        reply = self.topo.soap(2, "AddPortMapping", add_args(18084, 8084, lease=0))
        self.assertEqual((reply["status"], upnp_error(reply)), (200, None), reply)
        self.assertOnCGN(2, 8084, external_port=18084)
        for port, proto in ((8081, "TCP"), (8082, "UDP"), (18083, "TCP"), (18084, "TCP")):
            self.delete_soap(2, port, proto)
        self.assertEqual(self.topo.cgn_mappings(2), [])

    def test_two_subscribers_identical_addressing(self):
        """Two subscribers, both 192.168.1.10, map internal 8080 at the same time: the CGN holds
        both under their own THIRD_PARTY_IDs; each sees only its own; a delete in one leaves the
        other.  (Independent upnpc runs go in parallel: each waits 2 s for SSDP answers.)"""
        a, b = 3, 4
        add_a, add_b = self.parallel(
            lambda: self.upnpc_ok(a, "-e", "sub a", "-a", SUBSCRIBER_ADDRESS, "8080", "28080", "TCP", "3600"),
            lambda: self.upnpc_ok(b, "-e", "sub b", "-a", SUBSCRIBER_ADDRESS, "8080", "28081", "TCP", "3600"))
        self.assertIn("external 5.5.5.5:28080 TCP is redirected to internal 192.168.1.10:8080", add_a)
        self.assertIn("external 5.5.5.5:28081 TCP is redirected to internal 192.168.1.10:8080", add_b)
        ma = self.assertOnCGN(a, 8080, external_port=28080, description="sub a")
        mb = self.assertOnCGN(b, 8080, external_port=28081, description="sub b")
        self.assertNotEqual(ma["third_party_id"], mb["third_party_id"])

        # one pool address: b cannot have a's external port (CGN conflict -> 718, clients.md R9)
        conflict, list_a = self.parallel(
            lambda: self.topo.upnpc(b, "-a", SUBSCRIBER_ADDRESS, "8081", "28080", "TCP", "3600"),
            lambda: self.upnpc_ok(a, "-l"))
        self.assertIn("718", conflict.stdout + conflict.stderr)
        self.assertEqual(self.topo.cgn_mappings(b, internal_port=8081), [])
        self.assertEqual([r[:5] for r in listed(list_a)], [("TCP", 28080, SUBSCRIBER_ADDRESS, 8080, "sub a")])
        # b sees only its own, and cannot delete a's mapping by its external port (714)
        list_b, delete_b = self.parallel(lambda: self.upnpc_ok(b, "-l"),
                                         lambda: self.topo.upnpc(b, "-d", "28080", "TCP"))
        self.assertEqual([r[:5] for r in listed(list_b)], [("TCP", 28081, SUBSCRIBER_ADDRESS, 8080, "sub b")])
        self.assertIn("714", delete_b.stdout + delete_b.stderr)
        self.assertOnCGN(a, 8080, external_port=28080, nonce=ma["nonce"])

        self.upnpc_ok(a, "-d", "28080", "TCP")
        self.assertEqual(self.topo.cgn_mappings(a), [])
        self.assertOnCGN(b, 8080, external_port=28081, nonce=mb["nonce"])
        self.delete_soap(b, 28081)
        self.assertEqual(self.topo.cgn_mappings(b), [])


class UpnpcIGD2Tests(TopologyCase):
    """upnpc against igdpcp serving IGD:2 ([igd] version = 2)."""

    prefix = "e2ev"
    topology_args = {"subscribers": 2, "igd_version": 2}

    def test_lease_zero_list_delete(self):
        """IGD:2: lease 0 is accepted (604800, clients.md R8); -l lists; GetListOfPortMappings
        (what -L calls) lists both mappings; -d deletes on the CGN."""
        out = self.upnpc_ok(1, "-e", "v2 a", "-a", SUBSCRIBER_ADDRESS, "8080", "18080", "TCP", "0")
        self.assertIn("is redirected to internal 192.168.1.10:8080", out)
        self.assertNotIn("failed", out)
        m = self.assertOnCGN(1, 8080, external_port=18080, description="v2 a")
        self.assertGreater(m["lifetime"], 3000)
        reply = self.topo.soap(1, "AddPortMapping", add_args(18081, 8081, lease=3600, description="v2 b"),
                               service=WANIP2)
        self.assertEqual((reply["status"], upnp_error(reply)), (200, None), reply)
        rows = {r[1]: r for r in listed(self.upnpc_ok(1, "-l"))}
        self.assertEqual(set(rows), {18080, 18081})
        self.assertTrue(604000 < rows[18080][5] <= 604800, rows)
        reply = self.topo.soap(1, "GetListOfPortMappings", [
            ("NewStartPort", "0"), ("NewEndPort", "65535"), ("NewProtocol", "TCP"), ("NewManage", "1"),
            ("NewNumberOfPorts", "1000")], service=WANIP2)
        self.assertEqual(reply["status"], 200, reply)
        self.assertEqual(port_listing(reply["body"]), {
            (18080, SUBSCRIBER_ADDRESS, 8080, "v2 a"), (18081, SUBSCRIBER_ADDRESS, 8081, "v2 b")})
        self.upnpc_ok(1, "-d", "18080", "TCP")
        self.delete_soap(1, 18081, service=WANIP2)
        self.assertEqual(self.topo.cgn_mappings(1), [])

    def test_upnpc_L_shows_entries(self):
        """upnpc -L prints the GetListOfPortMappings entries.  NewPortListing goes as CDATA: miniupnpc copies
        the element text without unescaping it."""
        for ext, internal in ((28080, 8080), (28081, 8081)):
            reply = self.topo.soap(2, "AddPortMapping", add_args(ext, internal, lease=3600), service=WANIP2)
            self.assertEqual(reply["status"], 200, reply)
        out = self.upnpc_ok(2, "-L")
        self.assertEqual({r[1] for r in listed(out)}, {28080, 28081}, out)


def port_listing(body: str) -> set[tuple]:
    """(external port, internal client, internal port, description) of a GetListOfPortMappings answer."""
    listing = etree.fromstring(body.encode()).findtext(".//NewPortListing")
    p = "{urn:schemas-upnp-org:gw:WANIPConnection}"
    return {(int(e.findtext(p + "NewExternalPort")), e.findtext(p + "NewInternalClient"),
             int(e.findtext(p + "NewInternalPort")), e.findtext(p + "NewDescription"))
            for e in etree.fromstring(listing.encode()).iter(p + "PortMappingEntry")}


ASYNC_UPNP_CLIENT = r"""
import asyncio, json, logging, sys
from datetime import timedelta
from async_upnp_client.aiohttp import AiohttpNotifyServer, AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.search import async_search

SOURCE = "192.168.1.10"
IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
out = {"errors": [], "events": []}


class Errors(logging.Handler):
    def emit(self, record):
        out["errors"].append(record.getMessage())


logging.getLogger("async_upnp_client").addHandler(Errors(logging.WARNING))


async def until(predicate, timeout):
    end = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.05)
    return predicate()


async def main(external, internal, events):
    found = []

    async def on_response(headers):
        found.append({k.lower(): v for k, v in headers.items()})

    await async_search(on_response, timeout=2, search_target=IGD1, source=(SOURCE, 0))
    out["found"] = [{k: f.get(k) for k in ("st", "usn", "location", "_host")} for f in found]
    requester = AiohttpRequester()
    device = await UpnpFactory(requester, non_strict=False).async_create_device(found[0]["location"])
    out["device_type"] = device.device_type
    service = device.find_service(WANIP1)
    out["external_ip"] = (await service.action("GetExternalIPAddress").async_call())["NewExternalIPAddress"]
    status = await service.action("GetStatusInfo").async_call()
    out["status"] = status["NewConnectionStatus"]
    if events:
        server = AiohttpNotifyServer(requester, source=(SOURCE, 0))
        await server.async_start_server()
        service.on_event = lambda svc, variables: out["events"].append(
            {v.name: v.value for v in variables})
        sid, timeout = await server.event_handler.async_subscribe(service, timeout=timedelta(seconds=300))
        out["subscribed"] = int(timeout.total_seconds())
        out["initial"] = await until(lambda: out["events"], 5)
    await service.action("AddPortMapping").async_call(
        NewRemoteHost="", NewExternalPort=external, NewProtocol="TCP", NewInternalPort=internal,
        NewInternalClient=SOURCE, NewEnabled=True, NewPortMappingDescription="async-upnp-client",
        NewLeaseDuration=3600)
    entry = await service.action("GetGenericPortMappingEntry").async_call(NewPortMappingIndex=0)
    out["entry"] = {k: (v if isinstance(v, (int, str, bool)) else str(v)) for k, v in entry.items()}
    if events:
        out["changed"] = await until(
            lambda: any(e.get("PortMappingNumberOfEntries") == 1 for e in out["events"]), 5)
        await asyncio.sleep(0.5)  # let a NOTIFY in flight finish before the server stops
        await server.event_handler.async_unsubscribe(service)
        await server.async_stop_server()


try:
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "events"))
except Exception as e:
    out["exception"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


class AsyncUpnpClientTests(TopologyCase):
    """async-upnp-client 0.49 (Home Assistant's UPnP library) in strict mode (clients.md R11)."""

    prefix = "e2ea"
    topology_args = {"subscribers": 4}
    requires = ()

    def setUp(self):
        if importlib.util.find_spec("async_upnp_client") is None:
            raise unittest.SkipTest("needs async-upnp-client (pip)")
        super().setUp()

    def async_client(self, i: int, external: int, internal: int, events: bool) -> dict:
        proc, out = self.topo.python(i, ASYNC_UPNP_CLIENT, str(external), str(internal),
                                     "events" if events else "plain", timeout=40)
        self.assertIsNotNone(out, proc.stdout + proc.stderr)
        self.assertNotIn("exception", out, out)
        self.assertEqual(out["errors"], [], "async-upnp-client logged problems (strict mode)")
        self.assertTrue(out["found"], out)
        self.assertEqual(out["found"][0]["location"], "http://192.168.1.1:5000/rootDesc.xml")
        self.assertEqual(out["device_type"], "urn:schemas-upnp-org:device:InternetGatewayDevice:1")
        self.assertEqual((out["external_ip"], out["status"]), ("5.5.5.5", "Connected"))
        self.assertEqual(out["entry"]["NewExternalPort"], external, out)
        self.assertEqual(out["entry"]["NewInternalPort"], internal, out)
        self.assertEqual(out["entry"]["NewInternalClient"], SUBSCRIBER_ADDRESS, out)
        self.assertEqual(out["entry"]["NewPortMappingDescription"], "async-upnp-client", out)
        self.assertOnCGN(i, internal, external_port=external, description="async-upnp-client")
        return out

    def check_events(self, out: dict) -> None:
        self.assertTrue(out.get("initial"), f"no initial event: {out}")
        initial = out["events"][0]
        self.assertEqual(initial.get("ConnectionStatus"), "Connected", out)
        self.assertEqual(initial.get("PortMappingNumberOfEntries"), 0, out)
        self.assertTrue(out.get("changed"), f"no PortMappingNumberOfEntries change: {out}")

    def test_search_actions_strict(self):
        """SSDP search from 192.168.1.10, strict description/SCPD parsing, AddPortMapping and
        GetGenericPortMappingEntry, on tunnel 3."""
        self.async_client(3, 18110, 8110, events=False)

    def test_events_first_tunnel(self):
        """GENA on tunnel 1: initial event, then PortMappingNumberOfEntries 1 after the add."""
        self.check_events(self.async_client(1, 18100, 8100, events=True))

    def test_initial_event_external_address(self):
        """The initial event's ExternalIPAddress is the address GetExternalIPAddress has just
        reported (iwf.md B: "value from the last PCP response")."""
        out = self.async_client(4, 18130, 8130, events=True)
        self.assertEqual(out["external_ip"], "5.5.5.5")
        self.assertEqual(out["events"][0].get("ExternalIPAddress"), out["external_ip"], out)

    def test_events_other_tunnel(self):
        """GENA on tunnel 2, whose subscriber has the same address as tunnel 1's: the NOTIFY
        must leave by tunnel 2, not by the iwf namespace's first 192.168.1.0/24 route."""
        self.check_events(self.async_client(2, 18120, 8120, events=True))


GUPNP_IGD = r"""
import json, os, sys
import gi
gi.require_version("GUPnPIgd", "1.0")
from gi.repository import GLib, GUPnPIgd

external, internal, release = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
loop = GLib.MainLoop()
igd = GUPnPIgd.SimpleIgd.new()
out = {}


def say(**kw):
    out.update(kw)
    out.setdefault("events", []).append(kw)
    print(json.dumps(out), flush=True)


def mapped(igd, proto, ext_ip, replaces, ext_port, local_ip, local_port, description):
    say(event="mapped", proto=proto, external_ip=ext_ip, external_port=ext_port,
        local_ip=local_ip, local_port=local_port, description=description)


def failed(igd, error, proto, ext_port, local_ip, local_port, description):
    say(event="error", error=f"{error.domain}:{error.code}:{error.message}", external_port=ext_port)


def poll():
    if os.path.exists(release):
        igd.remove_port_local("TCP", "192.168.1.10", internal)
        GLib.timeout_add(1500, loop.quit)
        return False
    return True


igd.connect("mapped-external-port", mapped)
igd.connect("error-mapping-port", failed)
igd.add_port("TCP", external, "192.168.1.10", internal, 3600, "gupnp-igd test")
GLib.timeout_add(100, poll)
GLib.timeout_add_seconds(60, loop.quit)
loop.run()
say(event="done")
"""


class GUPnPIgdTests(TopologyCase):
    """GUPnP-IGD 1.2 (SimpleIgd, as used by Farstream/libnice) from Debian's python3-gi."""

    prefix = "e2eg"
    topology_args = {"subscribers": 1}
    requires = ()

    def setUp(self):
        probe = "import gi; gi.require_version('GUPnPIgd', '1.0'); from gi.repository import GUPnPIgd"
        if not os.path.exists(GI_PYTHON) or subprocess.run(
                [GI_PYTHON, "-c", probe], capture_output=True).returncode != 0:
            raise unittest.SkipTest("needs /usr/bin/python3 with python3-gi and gir1.2-gupnpigd-1.0")
        super().setUp()

    def gupnp(self, i: int, external: int, internal: int):
        topo = self.topo
        script = os.path.join(topo.lab.workdir, "gupnp_igd.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(GUPNP_IGD)
        release = os.path.join(topo.lab.workdir, f"gupnp-release-{external}")
        proc = topo.lab.spawn(topo.subs[i], [GI_PYTHON, script, str(external), str(internal), release],
                              name=f"gupnp-igd-{external}")
        return proc, release

    @staticmethod
    def last_event(proc) -> dict:
        lines = [line for line in proc.log().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    def wait_event(self, proc, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            event = self.last_event(proc)
            if event.get("event") in ("mapped", "error") or not proc.running():
                return event
            time.sleep(0.1)
        return self.last_event(proc)

    def test_simple_igd_add_port(self):
        """add_port(TCP, 0, 192.168.1.10, 8090, 3600): GUPnP-IGD finds the WANIPConnection:1 by
        SSDP, reads the external address and maps; the CGN holds it; remove_port deletes it."""
        proc, release = self.gupnp(1, 0, 8090)
        event = self.wait_event(proc)
        self.assertEqual(event.get("event"), "mapped", f"{event}\n{proc.log()}")
        self.assertEqual(event["external_ip"], "5.5.5.5")
        self.assertEqual((event["local_ip"], event["local_port"]), (SUBSCRIBER_ADDRESS, 8090))
        m = self.assertOnCGN(1, 8090, external_port=event["external_port"], description="gupnp-igd test")
        open(release, "w").close()
        gone = self.topo.wait_cgn(lambda ms: not self.topo.cgn_mappings(1), timeout=10)
        self.assertTrue(gone, f"still on the CGN after remove_port: {m}\n{proc.log()}")
        proc.popen.wait(timeout=10)


if __name__ == "__main__":
    unittest.main()
