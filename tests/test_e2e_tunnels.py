"""End to end over real tunnels (issue 4): subscribers behind real VXLAN tunnels with the
same addressing, found by igdpcp at run time over netlink, their THIRD_PARTY_IDs read
from the link (the VNI) or asked of a real FreeRADIUS.

Topology (tests/e2e.py, ``link="vxlan"``): netns ``iwf`` (lab CGN + igdpcp) and per
subscriber a netns whose only way to 192.168.1.1 is a VXLAN ``eth0`` (VNI 1000+i) over an
underlay bridge in netns ``acc``; in ``iwf`` the tunnels are ``vxlan1001``, ``vxlan1002``,
... all 192.168.1.1/24.  igdpcp's config has no tunnel list: ``[dynamic] pattern =
"vxlan\\d+"``, ``address = "192.168.1.1"``.  Clients discover igdpcp by SSDP (upnpc
without ``-u``); every result is checked in the lab CGN's table.  The CGN's pool is one
address, so subscribers with the same internal port get different external ports.
"""

from __future__ import annotations

import json
import re
import time
import unittest

from lxml import etree

from . import netlab, radiuslab
from .e2e import (
    HTTP_PORT,
    IWF_ADDRESS,
    SUBSCRIBER_ADDRESS,
    UNDERLAY,
    WANIP1,
    WANIP2,
    Topology,
    TopologyCase,
    add_args,
    listed,
    third_party_id_hex,
    upnp_error,
    vni,
)

GRACE = 5.0  # [dynamic] grace of the VXLAN topology (seconds)


def identity(m: dict) -> tuple:
    """A CGN mapping as the CGN knows it (nonce included): what must stay untouched."""
    return (m["third_party_id"], m["internal_address"], m["internal_port"], m["protocol"],
            m["external_address"], m["external_port"], m["nonce"])


def port_listing(body: str) -> set[tuple]:
    """(external port, internal client, internal port) of a GetListOfPortMappings answer."""
    listing = etree.fromstring(body.encode()).findtext(".//NewPortListing")
    p = "{urn:schemas-upnp-org:gw:WANIPConnection}"
    return {(int(e.findtext(p + "NewExternalPort")), e.findtext(p + "NewInternalClient"),
             int(e.findtext(p + "NewInternalPort")))
            for e in etree.fromstring(listing.encode()).iter(p + "PortMappingEntry")}


def element(body: str, name: str) -> str | None:
    m = re.search(rf"<{name}>([^<]*)</{name}>", body or "")
    return m.group(1) if m else None


# GENA from inside a subscriber namespace: optionally listen for NOTIFYs on
# 192.168.1.10:<listen>, send the given SUBSCRIBE/UNSUBSCRIBE requests one by one
# (each on its own connection), then wait up to <wait> s for <expect> NOTIFYs.
GENA_CLIENT = rf"""
import json, re, socket, sys, threading, time
cfg = json.loads(sys.argv[1])
out = {{"responses": [], "notifies": []}}


def read_message(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while m and len(body) < int(m.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.decode("latin-1"), body.decode("utf-8", "replace")


if cfg.get("listen"):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("{SUBSCRIBER_ADDRESS}", cfg["listen"]))
    listener.listen(8)

    def serve():
        while True:
            conn, peer = listener.accept()
            conn.settimeout(5)
            try:
                head, body = read_message(conn)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                continue
            finally:
                conn.close()
            out["notifies"].append({{"head": head, "body": body, "peer": peer[0]}})

    threading.Thread(target=serve, daemon=True).start()

for req in cfg["requests"]:
    head = req["method"] + " " + req.get("path", "/evt/IPConn") + " HTTP/1.1\r\n"
    head += "HOST: {IWF_ADDRESS}:{HTTP_PORT}\r\n"
    head += "".join(k + ": " + v + "\r\n" for k, v in req["headers"].items())
    head += "Content-Length: 0\r\nConnection: close\r\n\r\n"
    answer = {{"status": None, "headers": {{}}, "error": None}}
    try:
        s = socket.create_connection(("{IWF_ADDRESS}", {HTTP_PORT}), timeout=5)
        s.sendall(head.encode("latin-1"))
        text, _ = read_message(s)
        s.close()
        lines = text.split("\r\n")
        answer["status"] = int(lines[0].split()[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            answer["headers"][k.strip().lower()] = v.strip()
    except (OSError, IndexError, ValueError) as e:
        answer["error"] = repr(e)
    out["responses"].append(answer)

end = time.monotonic() + cfg.get("wait", 0)
while time.monotonic() < end and len(out["notifies"]) < cfg.get("expect", 1 << 30):
    time.sleep(0.05)
time.sleep(cfg.get("linger", 0))
print(json.dumps(out))
"""

CONNECT_CLIENT = r"""
import json, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall(b"GET /rootDesc.xml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = s.recv(65536)
    print(json.dumps({"connected": True, "data": data.decode("latin-1")}))
except OSError as e:
    print(json.dumps({"connected": False, "error": repr(e)}))
"""


def subscribe(callback: str, timeout: int = 300) -> dict:
    return {"method": "SUBSCRIBE", "headers": {"CALLBACK": f"<{callback}>", "NT": "upnp:event",
                                               "TIMEOUT": f"Second-{timeout}"}}


def renew(sid: str, timeout: int = 300) -> dict:
    return {"method": "SUBSCRIBE", "headers": {"SID": sid, "TIMEOUT": f"Second-{timeout}"}}


def unsubscribe(sid: str) -> dict:
    return {"method": "UNSUBSCRIBE", "headers": {"SID": sid}}


class TunnelCase(TopologyCase):
    """Helpers shared by the tunnel tests."""

    def gena(self, i: int, requests: list, *, listen: int = 0, expect: int = 0, wait: float = 0.0,
             linger: float = 0.0) -> dict:
        cfg = {"requests": requests, "listen": listen, "expect": expect, "wait": wait, "linger": linger}
        proc, out = self.topo.python(i, GENA_CLIENT, json.dumps(cfg), timeout=wait + linger + 30)
        self.assertIsNotNone(out, proc.stdout + proc.stderr)
        for answer in out["responses"]:
            self.assertIsNone(answer["error"], out)
        return out

    def soap_fault(self, i: int, action: str, args, code: int, service: str = WANIP1) -> dict:
        reply = self.topo.soap(i, action, args, service=service)
        self.assertEqual((reply["status"], upnp_error(reply)), (500, code), f"{action} on {service}: {reply}")
        return reply

    def soap_ok(self, i: int, action: str, args, service: str = WANIP1) -> dict:
        reply = self.topo.soap(i, action, args, service=service)
        self.assertEqual((reply["status"], upnp_error(reply)), (200, None), f"{action} on {service}: {reply}")
        return reply

    def add(self, i: int, external: int, internal: int, **kw) -> dict:
        self.soap_ok(i, "AddPortMapping", add_args(external, internal, lease=3600, **kw))
        return self.assertOnCGN(i, internal, external_port=external)

    def upnpc_add_8080_in_both(self, description_1: str, description_2: str) -> tuple[dict, dict]:
        """upnpc in subscribers 1 and 2 at once (both 192.168.1.10) maps internal 8080 to
        external 18080 and 18081; returns the two mappings the CGN then holds."""
        add_1, add_2 = self.parallel(
            lambda: self.upnpc_ok(1, "-e", description_1, "-a", SUBSCRIBER_ADDRESS, "8080", "18080", "TCP", "3600"),
            lambda: self.upnpc_ok(2, "-e", description_2, "-a", SUBSCRIBER_ADDRESS, "8080", "18081", "TCP", "3600"))
        self.assertIn("external 5.5.5.5:18080 TCP is redirected to internal 192.168.1.10:8080", add_1)
        self.assertIn("external 5.5.5.5:18081 TCP is redirected to internal 192.168.1.10:8080", add_2)
        return (self.assertOnCGN(1, 8080, external_port=18080, description=description_1),
                self.assertOnCGN(2, 8080, external_port=18081, description=description_2))

    def generic_entries(self, i: int, service: str = WANIP1, limit: int = 20) -> list[int]:
        """External ports of GetGenericPortMappingEntry 0, 1, ... until 713 (as upnpc -l)."""
        ports = []
        for index in range(limit):
            reply = self.topo.soap(i, "GetGenericPortMappingEntry", [("NewPortMappingIndex", str(index))],
                                   service=service)
            if upnp_error(reply) == 713:
                return ports
            self.assertEqual(reply["status"], 200, reply)
            ports.append(int(element(reply["body"], "NewExternalPort")))
        self.fail(f"more than {limit} entries: {ports}")


class VxlanDynamicTests(TunnelCase):
    """Real VXLAN tunnels found at run time ([dynamic] pattern), IDs from the VNI over netlink
    ([ids] source = "link"), IGD:2 (so both the WANIPConnection:1 and :2 rules are reachable)."""

    prefix = "e2ex"
    topology_args = {
        "subscribers": 2, "igd_version": 2, "link": "vxlan",
        "dynamic": {"pattern": r"vxlan\d+", "grace": GRACE},
        "ids": '\n[ids]\nsource = "link"\n',
    }

    # ------------------------------------------------------------ 1. overlapping subscribers over VXLAN
    def test_vxlan_same_internal_port_separate_ids(self):
        """upnpc in two VXLAN subscribers (both 192.168.1.10) maps internal 8080: the CGN holds
        two mappings, THIRD_PARTY_ID 0003e9 and 0003ea (the VNIs igdpcp read over netlink, as
        ``ip -d link`` shows them); each ``upnpc -l`` lists only its own; a delete in one leaves
        the other."""
        topo = self.topo
        for i in (1, 2):  # the IDs are the links' VNIs, seen independently of igdpcp
            details = topo.link_details(i)
            self.assertEqual(details["linkinfo"]["info_kind"], "vxlan")
            self.assertEqual(details["linkinfo"]["info_data"]["id"], vni(i))
            self.assertEqual(topo.tpid_hex(i), f"{vni(i):06x}")
        ifindexes = {i: topo.ifindex(i) for i in (1, 2)}
        stats = {i: self.rx_packets(i) for i in (1, 2)}

        m1, m2 = self.upnpc_add_8080_in_both("vx one", "vx two")
        self.assertEqual((m1["third_party_id"], m2["third_party_id"]), ("0003e9", "0003ea"))
        self.assertEqual(len(topo.cgn_mappings(internal_port=8080)), 2, topo.cgn_mappings())
        for i in (1, 2):  # the requests really came through the tunnels
            self.assertGreater(self.rx_packets(i), stats[i], f"nothing received on {topo.ifname(i)}")
            self.assertEqual(topo.ifindex(i), ifindexes[i])

        list_1, list_2 = self.parallel(lambda: self.upnpc_ok(1, "-l"), lambda: self.upnpc_ok(2, "-l"))
        self.assertEqual([r[:5] for r in listed(list_1)], [("TCP", 18080, SUBSCRIBER_ADDRESS, 8080, "vx one")])
        self.assertEqual([r[:5] for r in listed(list_2)], [("TCP", 18081, SUBSCRIBER_ADDRESS, 8080, "vx two")])

        out = self.upnpc_ok(1, "-d", "18080", "TCP")
        self.assertNotIn("failed", out)
        self.assertEqual(topo.cgn_mappings(1), [])
        self.assertEqual([identity(m) for m in topo.cgn_mappings(2)], [identity(m2)])
        self.assertEqual([r[:5] for r in listed(self.upnpc_ok(2, "-l"))],
                         [("TCP", 18081, SUBSCRIBER_ADDRESS, 8080, "vx two")])
        self.upnpc_ok(2, "-d", "18081", "TCP")
        self.assertEqual(topo.cgn_mappings(2), [])

    def rx_packets(self, i: int) -> int:
        out = self.topo.lab.ip("-j", "-s", "link", "show", "dev", self.topo.ifname(i), ns=self.topo.iwf)
        return json.loads(out)[0]["stats64"]["rx"]["packets"]

    # ------------------------------------------------------------ 2. isolation
    def test_isolation_soap_and_gena(self):
        """Subscriber B cannot reach, list, delete or subscribe to A's mappings by any SOAP or
        GENA call: another InternalClient (718 IGD:1 / 606 IGD:2), every index, A's external
        port (714), ranges (730), A's SID (412), callbacks anywhere but itself (412).  Events
        and listings stay per tunnel; A's mappings are untouched on the CGN (same nonces)."""
        topo = self.topo
        a, b = 1, 2
        mine_a = [self.add(a, 18600, 8600), self.add(a, 18602, 8602)]
        mine_b = self.add(b, 18601, 8601)
        before_a = sorted(identity(m) for m in topo.cgn_mappings(a))
        self.assertEqual(len(before_a), 2)

        # -- AddPortMapping / AddAnyPortMapping for another host (A's address space is B's too,
        # so "another host" is any address but B's own), or onto A's external port
        for client in ("192.168.1.11", f"{UNDERLAY}.11", "5.5.5.5"):
            self.soap_fault(b, "AddPortMapping", add_args(18610, 8610, client=client), 718, WANIP1)
            self.soap_fault(b, "AddPortMapping", add_args(18610, 8610, client=client), 606, WANIP2)
            self.soap_fault(b, "AddAnyPortMapping", add_args(18610, 8610, client=client), 606, WANIP2)
        self.soap_fault(b, "AddPortMapping", add_args(18600, 8600), 718, WANIP1)  # A's external port: conflict
        self.assertEqual(topo.cgn_mappings(b, internal_port=8610), [])
        self.assertEqual(topo.cgn_mappings(b, internal_port=8600), [])

        # -- listing: every index, both namespaces; GetListOfPortMappings
        self.assertEqual(self.generic_entries(b, WANIP1), [18601])
        self.assertEqual(self.generic_entries(b, WANIP2), [18601])
        self.assertEqual(sorted(self.generic_entries(a, WANIP1)), [18600, 18602])
        for index in (1, 2, 3, 65535):
            reply = topo.soap(b, "GetGenericPortMappingEntry", [("NewPortMappingIndex", str(index))])
            self.assertEqual(upnp_error(reply), 713, reply)
        for manage in ("0", "1"):
            reply = self.soap_ok(b, "GetListOfPortMappings", [
                ("NewStartPort", "0"), ("NewEndPort", "65535"), ("NewProtocol", "TCP"), ("NewManage", manage),
                ("NewNumberOfPorts", "1000")], WANIP2)
            self.assertEqual(port_listing(reply["body"]), {(18601, SUBSCRIBER_ADDRESS, 8601)})
            self.soap_fault(b, "GetListOfPortMappings", [
                ("NewStartPort", "18600"), ("NewEndPort", "18600"), ("NewProtocol", "TCP"), ("NewManage", manage),
                ("NewNumberOfPorts", "10")], 730, WANIP2)

        # -- A's external ports, by name
        for port in ("18600", "18602"):
            key = [("NewRemoteHost", ""), ("NewExternalPort", port), ("NewProtocol", "TCP")]
            for service in (WANIP1, WANIP2):
                self.soap_fault(b, "GetSpecificPortMappingEntry", key, 714, service)
                self.soap_fault(b, "DeletePortMapping", key, 714, service)
        for manage in ("0", "1"):
            self.soap_fault(b, "DeletePortMappingRange", [
                ("NewStartPort", "18600"), ("NewEndPort", "18600"), ("NewProtocol", "TCP"), ("NewManage", manage)],
                730, WANIP2)
        self.assertEqual(sorted(identity(m) for m in topo.cgn_mappings(a)), before_a)

        # -- igdpcp is not reachable from outside the tunnels (B's underlay address)
        _, direct = topo.python(b, CONNECT_CLIENT, f"{UNDERLAY}.1", str(HTTP_PORT))
        self.assertFalse(direct["connected"], direct)

        # -- GENA: A subscribes; its initial event shows A's 2 mappings
        got_a = self.gena(a, [subscribe(f"http://{SUBSCRIBER_ADDRESS}:40001/")], listen=40001, expect=1, wait=5)
        self.assertEqual(got_a["responses"][0]["status"], 200, got_a)
        sid_a = got_a["responses"][0]["headers"]["sid"]
        self.assertEqual(len(got_a["notifies"]), 1, got_a)
        self.assertEqual(element(got_a["notifies"][0]["body"], "PortMappingNumberOfEntries"), "2", got_a)
        # B: callbacks into another network or to another address; A's SID; a crafted SID
        crafted = "uuid:" + sid_a[len("uuid:"):][::-1]
        requests = [subscribe(url) for url in (
            f"http://{UNDERLAY}.11:40001/", "http://192.168.1.11:40001/", f"http://{IWF_ADDRESS}:{HTTP_PORT}/",
            "http://127.0.0.1:40001/", "http://5.5.5.5:40001/", "http://[::1]:40001/",
            "http://localhost:40001/")]
        requests.append({"method": "SUBSCRIBE", "headers": {
            "CALLBACK": f"<http://{SUBSCRIBER_ADDRESS}:40002/><http://{UNDERLAY}.11:40001/>",
            "NT": "upnp:event", "TIMEOUT": "Second-300"}})
        requests += [unsubscribe(sid_a), renew(sid_a), unsubscribe(crafted), renew(crafted)]
        # and B's own, valid subscription: its initial event shows B's 1 mapping, not A's 2
        requests.append(subscribe(f"http://{SUBSCRIBER_ADDRESS}:40002/"))
        got_b = self.gena(b, requests, listen=40002, expect=1, wait=5)
        statuses = [r["status"] for r in got_b["responses"]]
        self.assertEqual(statuses, [412] * (len(requests) - 1) + [200], got_b)
        sid_b = got_b["responses"][-1]["headers"]["sid"]
        self.assertNotEqual(sid_b, sid_a)
        self.assertEqual(len(got_b["notifies"]), 1, got_b)
        self.assertEqual(element(got_b["notifies"][0]["body"], "PortMappingNumberOfEntries"), "1", got_b)
        self.assertRegex(got_b["notifies"][0]["head"], rf"(?im)^sid:\s*{re.escape(sid_b)}\r?$")
        # A's subscription is still A's: B's SID is refused on A's tunnel, A renews and leaves
        got_a = self.gena(a, [unsubscribe(sid_b), renew(sid_b), renew(sid_a), unsubscribe(sid_a)])
        self.assertEqual([r["status"] for r in got_a["responses"]], [412, 412, 200, 200], got_a)
        self.assertEqual(got_a["responses"][2]["headers"].get("sid"), sid_a)

        # -- finally B deletes "everything" it manages: only its own mapping goes
        self.soap_ok(b, "DeletePortMappingRange", [
            ("NewStartPort", "0"), ("NewEndPort", "65535"), ("NewProtocol", "TCP"), ("NewManage", "1")], WANIP2)
        self.assertEqual(topo.cgn_mappings(b), [], mine_b)
        self.assertEqual(sorted(identity(m) for m in topo.cgn_mappings(a)), before_a,
                         "B's calls touched A's mappings on the CGN")
        self.assertEqual(sorted(self.generic_entries(a, WANIP1)), [18600, 18602])
        # B's unsubscribe after all that, then A cleans up
        got_b = self.gena(b, [unsubscribe(sid_b)])
        self.assertEqual(got_b["responses"][0]["status"], 200, got_b)
        for m in mine_a:
            self.delete_soap(a, m["external_port"])
        self.assertEqual(topo.cgn_mappings(a), [])

    # ------------------------------------------------------------ 3. dynamic tunnel up / down
    def test_new_tunnel_without_further_netlink_events(self):
        """A tunnel interface created, brought up and addressed in one go (``ip -batch``, as a
        BRAS's session set-up does) gets its IGD within 3 s, with no later netlink event on the
        host (the netlink watcher reads every queued event)."""
        topo, i = self.topo, 4
        topo.add_subscriber(i, tunnel=False)
        name = topo.ifname(i)
        batch = (f"link add {name} type vxlan id {vni(i)} local {UNDERLAY}.1 remote {UNDERLAY}.{10 + i} "
                 f"dstport 4789 dev ul0\nlink set {name} up\naddr add {IWF_ADDRESS}/24 dev {name}\n")
        self.addCleanup(self.drop_tunnel, i)
        topo.lab.run(topo.iwf, ["sh", "-c", f"printf '{batch}' | ip -batch -"])
        topo.ifindexes[i] = topo.ifindex(i)
        try:
            topo.wait_tunnel(i, timeout=3.0)
        except RuntimeError as e:
            self.fail(f"no listener on a new tunnel 3 s after it came up: {str(e)[:200]}")

    def drop_tunnel(self, i: int) -> None:
        """Cleanup: the tunnel goes, and igdpcp's listeners with it."""
        if self.topo.ifname(i) in self.topo.lab.ip("-br", "link", ns=self.topo.iwf):
            self.topo.delete_tunnel(i)
            self.topo.wait_tunnel(i, up=False)

    def test_dynamic_tunnel_rebind_and_grace(self):
        """A VXLAN tunnel created after igdpcp started gets an IGD (upnpc finds it, maps; the CGN
        holds it under VNI 1003).  Deleted and re-created within the grace time (a new ifindex),
        the front end re-binds and the mapping survives, on the CGN too; deleted for good, the
        CGN's table loses it once the grace time has passed, not before."""
        topo, i = self.topo, 3
        topo.add_subscriber(i, tunnel=False)  # the subscriber's side first, as a BRAS would
        self.assertFalse(topo.tunnel_listening(i))
        first = topo.add_tunnel(i)
        topo.wait_tunnel(i)
        out = self.upnpc_ok(i, "-e", "dynamic", "-a", SUBSCRIBER_ADDRESS, "8080", "18090", "TCP", "3600")
        self.assertIn("external 5.5.5.5:18090 TCP is redirected to internal 192.168.1.10:8080", out)
        m = self.assertOnCGN(i, 8080, external_port=18090, description="dynamic")
        self.assertEqual(m["third_party_id"], third_party_id_hex(i))

        # the session flaps: the interface goes and comes back with a new ifindex, within grace
        deleted = time.monotonic()
        topo.delete_tunnel(i)
        topo.wait_tunnel(i, up=False)
        second = topo.add_tunnel(i)
        self.assertNotEqual(second, first, "the re-created interface kept its ifindex")
        topo.wait_tunnel(i)  # bound to the new interface (an old socket would show %if<N>)
        self.assertLess(time.monotonic() - deleted, GRACE, "too slow to test the grace time")
        rows = listed(self.upnpc_ok(i, "-l"))
        self.assertEqual([r[:5] for r in rows], [("TCP", 18090, SUBSCRIBER_ADDRESS, 8080, "dynamic")])
        time.sleep(max(0.0, deleted + GRACE + 1.0 - time.monotonic()))  # past the first grace time
        self.assertEqual([identity(x) for x in topo.cgn_mappings(i)], [identity(m)],
                         "the mapping did not survive a tunnel back within the grace time")

        # the session ends: kept for the grace time, then deleted on the CGN
        topo.delete_tunnel(i)
        deleted = time.monotonic()
        topo.wait_tunnel(i, up=False)
        time.sleep(max(0.0, deleted + GRACE / 2 - time.monotonic()))
        looked = time.monotonic() - deleted
        self.assertEqual([identity(x) for x in topo.cgn_mappings(i)], [identity(m)],
                         f"deleted on the CGN {looked:.1f} s after the tunnel went (grace {GRACE} s)")
        gone = topo.wait_cgn(lambda ms: not topo.cgn_mappings(i), timeout=GRACE + 4, interval=0.1)
        elapsed = time.monotonic() - deleted
        self.assertTrue(gone, f"still on the CGN {elapsed:.1f} s after the tunnel went: {topo.cgn_mappings(i)}")
        self.assertGreater(elapsed, GRACE - 0.5)
        self.assertFalse(topo.tunnel_listening(i))


class SharedSSDPSocketTests(TunnelCase):
    """``igd.ssdp_socket = "shared"`` (one SSDP socket for every tunnel, 1 descriptor per
    tunnel instead of 2): static veth tunnels with the same addressing, upnpc by SSDP."""

    prefix = "e2es"
    topology_args = {"subscribers": 2, "ssdp_socket": "shared"}

    def test_one_socket_discovery_isolation_and_rebind(self):
        """One unbound socket on :1900 joined on both tunnels; upnpc in each subscriber finds
        its own IGD and maps the same internal port (two CGN mappings, the right IDs, each
        listing only its own); a re-created tunnel (new ifindex) is joined again."""
        topo = self.topo
        sockets = topo.lab.run(topo.iwf, ["ss", "-Hlun", "sport = :1900"]).stdout.strip().splitlines()
        self.assertEqual(len(sockets), 1, sockets)
        self.assertIn("0.0.0.0:1900", sockets[0])
        self.assertEqual(topo.ssdp_joined() & {"tun1", "tun2"}, {"tun1", "tun2"})

        m1, m2 = self.upnpc_add_8080_in_both("one", "two")
        self.assertEqual((m1["third_party_id"], m2["third_party_id"]),
                         (third_party_id_hex(1), third_party_id_hex(2)))
        self.assertEqual([r[:5] for r in listed(self.upnpc_ok(1, "-l"))],
                         [("TCP", 18080, SUBSCRIBER_ADDRESS, 8080, "one")])
        self.assertEqual([r[:5] for r in listed(self.upnpc_ok(2, "-l"))],
                         [("TCP", 18081, SUBSCRIBER_ADDRESS, 8080, "two")])

        first = topo.ifindexes[2]
        topo.delete_tunnel(2)
        topo.wait_tunnel(2, up=False)
        self.assertNotEqual(topo.add_tunnel(2), first)
        topo.wait_tunnel(2)
        self.upnpc_ok(2, "-d", "18081", "TCP")  # found again by SSDP on the new interface
        self.assertEqual(topo.cgn_mappings(2), [])
        self.assertEqual([identity(m) for m in topo.cgn_mappings(1)], [identity(m1)])


# ------------------------------------------------------------------ 4. IDs from FreeRADIUS

RADIUS_IDS = {1: "52414431", 2: "52414432"}  # "RAD1", "RAD2": not the VNIs (0003e9, 0003ea)

RADIUS_USERS = "".join(
    f'DEFAULT NAS-Port-Id == "vxlan{vni(i)}", Auth-Type := Accept\n\tClass := 0x{tpid}\n\n'
    for i, tpid in RADIUS_IDS.items())

RADIUS_TTL = 2.0
RADIUS_TIMEOUT, RADIUS_RETRIES = 0.5, 1


class RadiusIdTests(TunnelCase):
    """[ids] source = "radius": a real FreeRADIUS inside the iwf netns, its users file giving
    each tunnel's ID in Class (the VXLAN VNIs are deliberately different)."""

    prefix = "e2er"
    radius: radiuslab.FreeRadius | None = None

    @classmethod
    def _start(cls):
        if cls.__dict__.get("topo") is not None:
            return
        netlab.skip_unless_netns(*cls.requires)
        radiuslab.skip_unless_freeradius()
        radius = radiuslab.FreeRadius(RADIUS_USERS)
        ids = (f'\n[ids]\nsource = "radius"\n\n[ids.radius]\nserver = "127.0.0.1:{radius.port}"\n'
               f'secret = "{radius.secret}"\nname_attributes = ["NAS-Port-Id"]\nttl = {RADIUS_TTL}\n'
               f'negative_ttl = 1\ntimeout = {RADIUS_TIMEOUT}\nretries = {RADIUS_RETRIES}\n')
        topo = Topology(cls.prefix, subscribers=2, link="vxlan", dynamic={"pattern": r"vxlan\d+", "grace": 30},
                        ids=ids, third_party_ids=RADIUS_IDS,
                        before_igdpcp=lambda t: radius.start(netns=t.iwf))
        try:
            cls.topo = topo.start()
        except BaseException:
            radius.stop()
            raise
        cls.radius = radius

    @classmethod
    def tearDownClass(cls):
        if cls.__dict__.get("radius") is not None:
            cls.radius.stop()
            cls.radius = None
        super().tearDownClass()

    def test_ids_from_radius_and_aaa_down(self):
        """upnpc maps; the CGN shows the ID FreeRADIUS gave (Class), not the VNI.  FreeRADIUS
        stopped: AddPortMapping on a tunnel never asked about, and on one whose answer has
        expired, gets HTTP 500 / UPnPError 501 and the CGN receives nothing at all."""
        topo, radius = self.topo, self.radius
        out = self.upnpc_ok(1, "-e", "radius", "-a", SUBSCRIBER_ADDRESS, "8080", "18080", "TCP", "3600")
        asked = time.monotonic()
        self.assertIn("external 5.5.5.5:18080 TCP is redirected to internal 192.168.1.10:8080", out)
        m = self.assertOnCGN(1, 8080, external_port=18080, description="radius")
        self.assertEqual(m["third_party_id"], RADIUS_IDS[1])
        self.assertEqual([x for x in topo.admin("/mappings") if x["third_party_id"] == third_party_id_hex(1)], [])
        self.assertGreater(radius.requests_seen(), 0)
        self.assertIn("vxlan1001", radius.log())

        radius.kill()
        table = sorted(identity(x) for x in topo.admin("/mappings"))
        received = topo.admin("/stats")["counters"].get("received", 0)
        # subscriber 2: its tunnel was never looked up, so nothing is cached
        reply = topo.soap(2, "AddPortMapping", add_args(18081, 8081, lease=3600))
        self.assertEqual((reply["status"], upnp_error(reply)), (500, 501), reply)
        attempts = RADIUS_TIMEOUT * (RADIUS_RETRIES + 1)
        self.assertGreater(reply["elapsed"], attempts - 0.2, reply)
        self.assertLess(reply["elapsed"], attempts + 2.5, reply)  # well inside soap_deadline (4 s)
        # subscriber 1: its answer was cached; once the ttl has run out the same holds
        time.sleep(max(0.0, asked + RADIUS_TTL + 0.5 - time.monotonic()))
        reply = topo.soap(1, "AddPortMapping", add_args(18082, 8082, lease=3600))
        self.assertEqual((reply["status"], upnp_error(reply)), (500, 501), reply)
        for body in (reply["body"], reply["head"]):
            self.assertNotIn(RADIUS_IDS[1], body.lower())
        time.sleep(0.5)
        self.assertEqual(topo.admin("/stats")["counters"].get("received", 0), received,
                         "the CGN received a PCP request while AAA was down")
        self.assertEqual(sorted(identity(x) for x in topo.admin("/mappings")), table)
        self.assertTrue(topo.igdpcp.running())


if __name__ == "__main__":
    unittest.main()
