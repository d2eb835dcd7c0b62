"""Interop: igdpcp's PCP client against a real PCP server, Debian's miniupnpd 2.3.1.

Topology (built once for the class by tests/netlab.py; needs root):

    root ns (this test, PCPClient)      netns ipt-cgn-<pid>                netns ipt-inet-<pid>
    ipt<pid>a 10.203.0.2/24 ---- int0 10.203.0.1/24  miniupnpd
                                     ext0 198.51.100.1/24 ---------- eth0 198.51.100.2/24

miniupnpd announces ext_ip 5.5.5.5 (a reserved address on ext0 would disable
it) and serves PCP on int0.  Known 2.3.1 behaviours checked here (lab.md 7):
option 13 is an unsupported mandatory option (UNSUPP_OPTION, request echoed);
option padding is not skipped, so a THIRD_PARTY_ID whose length is not a
multiple of 4 gets MALFORMED_OPTION; PREFER_FAILURE is honoured only for
ports the permission rules deny, not for ports another host holds.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
from ipaddress import IPv4Address
from string import Template

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from igdpcp.pcp import tpid
from igdpcp.pcp.client import MapSpec, PCPClient, PCPTimeout, ServerAddress, new_nonce
from igdpcp.pcp.codec import ThirdParty, ThirdPartyId
from igdpcp.pcp.constants import PROTOCOL_TCP, Opcode, ResultCode

from . import netlab

DATA = os.path.join(os.path.dirname(__file__), "data")
CLIENT_IP = "10.203.0.2"
SERVER_IP = "10.203.0.1"
EXT_IP = IPv4Address("5.5.5.5")
HOST = IPv4Address("192.168.1.10")  # the subscriber host on the CGN's LAN side
OTHER_HOST = IPv4Address("192.168.1.11")
DENIED_PORT = 18090  # external port denied by the permission rules
DEADLINE = 5.0


class Recorder:
    """IPCPClientListener: Mapping Updates the client did not take as answers."""

    def __init__(self):
        self.updates = []

    def mapping_update(self, server, result):
        self.updates.append(result)


def raw_map_result(local_ip: str, server_ip: str, options: bytes, internal_port: int) -> int:
    """Send one hand-packed MAP (no igdpcp codec) and return the response's result octet."""
    client = mapped(IPv4Address(local_ip))
    zero4 = mapped(IPv4Address("0.0.0.0"))
    header = struct.pack("!BBHI16s", 2, Opcode.MAP, 0, 600, client)
    body = struct.pack("!12sB3xHH16s", os.urandom(12), PROTOCOL_TCP, internal_port, internal_port, zero4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.bind((local_ip, 0))
        s.connect((server_ip, 5351))
        s.send(header + body + options)
        data = s.recv(1100)
    if len(data) < 24 or data[0] != 2 or data[1] != 0x80 | Opcode.MAP:
        raise AssertionError(f"not a MAP response: {data.hex()}")
    return data[3]


def mapped(address: IPv4Address) -> bytes:
    """The 16-octet IPv4-mapped IPv6 form PCP carries (RFC 6887 section 5)."""
    return b"\0" * 10 + b"\xff\xff" + address.packed


def raw_option(code: int, data: bytes) -> bytes:
    return struct.pack("!BxH", code, len(data)) + data + b"\0" * (-len(data) % 4)


class MiniupnpdInteropTests(TestCase):
    """One miniupnpd for the whole class; every test uses its own internal ports."""

    timeout = 20
    lab: netlab.Lab | None = None

    @classmethod
    def setUpClass(cls):
        cls._start()

    @classmethod
    def _start(cls):
        if cls.lab is not None:
            return
        netlab.skip_unless_netns("miniupnpd", "nft", "ss")
        lab = netlab.Lab("ipt")
        try:
            cls._build(lab)
        except BaseException:
            lab.teardown()
            raise
        cls.lab = lab

    @classmethod
    def _build(cls, lab: netlab.Lab) -> None:
        clash = lab.ip("-o", "-4", "addr", "show", "to", "10.203.0.0/24")
        if clash.strip():
            raise RuntimeError(f"10.203.0.0/24 is already used in the root namespace:\n{clash}")
        cls.cgn = cgn = lab.netns("cgn")
        inet = lab.netns("inet")
        lab.veth((None, lab.root_ifname("a"), f"{CLIENT_IP}/24"), (cgn, "int0", f"{SERVER_IP}/24"))
        lab.veth((cgn, "ext0", "198.51.100.1/24"), (inet, "eth0", "198.51.100.2/24"))
        lab.ip("route", "add", "default", "via", "198.51.100.2", ns=cgn)
        lab.sysctl(cgn, "net.ipv4.ip_forward", 1)
        lab.run(cgn, ["nft", "-f", os.path.join(DATA, "miniupnpd-pcp.nft")])
        with open(os.path.join(DATA, "miniupnpd-pcp.conf"), encoding="utf-8") as f:
            conf = Template(f.read()).substitute(
                ext_ifname="ext0", ext_ip=EXT_IP, listening_ifname="int0", uuid=uuid.uuid4(),
                lease_file=os.path.join(lab.workdir, "leases"), denied_port=DENIED_PORT)
        conf_path = os.path.join(lab.workdir, "miniupnpd.conf")
        with open(conf_path, "w", encoding="utf-8") as f:
            f.write(conf)
        cls.miniupnpd = lab.spawn(
            cgn, ["miniupnpd", "-d", "-f", conf_path, "-P", os.path.join(lab.workdir, "miniupnpd.pid")],
            name="miniupnpd")
        lab.wait_listening(cgn, 5351, "udp", proc=cls.miniupnpd)

    @classmethod
    def tearDownClass(cls):
        if cls.lab is not None:
            cls.lab.teardown()
            cls.lab = None

    def setUp(self):
        # trial's own runner has no setUpClass: start lazily (Lab's atexit hook tears down).
        self._start()
        self.log_start = len(self.miniupnpd.log())
        self.client = PCPClient(reactor, {"cgn": ServerAddress(SERVER_IP)}, bind=CLIENT_IP)
        self.client.start()
        self.updates = Recorder()
        self.client.add_listener(self.updates)
        self.addCleanup(self.client.stop)

    def tearDown(self):
        # Captured by pytest and shown only when the test fails.
        print(f"--- miniupnpd log during {self.id()} ---")
        print(self.server_log())
        self.assertTrue(self.miniupnpd.running(), "miniupnpd died")

    # -- helpers
    def server_log(self) -> str:
        """What miniupnpd logged since this test started."""
        return self.miniupnpd.log()[self.log_start:]

    def chain(self, name: str) -> list[dict]:
        """The rules of chain ``name`` of ``table inet filter`` in the cgn netns (nft JSON)."""
        out = self.lab.run(self.cgn, ["nft", "-j", "list", "chain", "inet", "filter", name]).stdout
        return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]

    def forward_ports(self) -> set[int]:
        """Destination ports miniupnpd accepts in its forward chain."""
        return {expr["match"]["right"] for rule in self.chain("miniupnpd") for expr in rule["expr"]
                if expr.get("match", {}).get("left", {}).get("payload", {}).get("field") == "dport"}

    def nat_rules(self) -> set[tuple[int, int, IPv4Address, int]]:
        """(protocol, external port, DNAT address, DNAT port) for each rule miniupnpd holds."""
        rules = set()
        for rule in self.chain("prerouting_miniupnpd"):
            proto = dport = dnat = None
            for expr in rule["expr"]:
                match = expr.get("match")
                if match:
                    left = match["left"]
                    if left.get("payload", {}).get("field") == "dport":
                        dport = match["right"]
                    elif left.get("payload", {}).get("offset") == 72:  # IPv4 protocol octet
                        proto = match["right"]
                    elif left.get("meta", {}).get("key") == "l4proto":
                        proto = match["right"]
                if "dnat" in expr:
                    dnat = expr["dnat"]
            if dnat is not None:
                rules.add((proto, dport, IPv4Address(dnat["addr"]), dnat.get("port")))
        return rules

    def spec(self, internal_port, *, nonce=None, host=HOST, lifetime=600, external_port=None, **kw):
        return MapSpec(nonce or new_nonce(), PROTOCOL_TCP, host, internal_port, lifetime,
                       external_port=internal_port if external_port is None else external_port, **kw)

    def map(self, spec, **kw):
        return self.client.map("cgn", spec, deadline=DEADLINE, **kw)

    def delete(self, spec):
        return self.client.delete("cgn", spec, deadline=DEADLINE)

    def assertEchoesThirdParty(self, result, host=HOST):
        tp = result.response.option(ThirdParty)
        self.assertIsNotNone(tp, "THIRD_PARTY not echoed")
        self.assertEqual(tp.address, host)

    # -- 1. create
    @defer.inlineCallbacks
    def test_map_third_party_success(self):
        """MAP with THIRD_PARTY 192.168.1.10:18080, no THIRD_PARTY_ID: SUCCESS, 5.5.5.5:18080,
        THIRD_PARTY echoed, and miniupnpd really installed the DNAT."""
        spec = self.spec(18080)
        r = yield self.map(spec)
        self.assertEqual(r.result, ResultCode.SUCCESS)
        self.assertEqual((r.external_address, r.external_port, r.lifetime), (EXT_IP, 18080, 600))
        self.assertEqual(r.response.opcode, Opcode.MAP)
        self.assertEqual(r.response.body.nonce, spec.nonce)
        self.assertEchoesThirdParty(r)
        self.assertIsNone(r.response.option(ThirdPartyId))
        self.assertIn((PROTOCOL_TCP, 18080, HOST, 18080), self.nat_rules())
        # ... and its pinhole in the filter chain our base chain "forward" jumps to.
        self.assertIn(18080, self.forward_ports())
        r = yield self.delete(spec)
        self.assertEqual(r.result, ResultCode.SUCCESS)

    # -- 2. renew
    @defer.inlineCallbacks
    def test_renew_same_nonce_clamps_lifetime(self):
        """Renewal with the same nonce keeps the external port; lifetimes are clamped to
        min_lifetime 120 / max_lifetime 86400."""
        spec = self.spec(18100)
        first = yield self.map(spec)
        self.assertEqual((first.result, first.external_port), (ResultCode.SUCCESS, 18100))
        for asked, granted in ((60, 120), (100000, 86400)):
            renew = MapSpec(spec.nonce, spec.protocol, spec.internal_address, spec.internal_port,
                            asked, external_port=first.external_port)
            r = yield self.map(renew)
            self.assertEqual(r.result, ResultCode.SUCCESS)
            self.assertEqual((r.external_address, r.external_port), (EXT_IP, 18100))
            self.assertEqual(r.lifetime, granted)
            self.assertEchoesThirdParty(r)
        self.assertIn((PROTOCOL_TCP, 18100, HOST, 18100), self.nat_rules())
        yield self.delete(spec)

    # -- 3. delete
    @defer.inlineCallbacks
    def test_delete_other_nonce_refused_then_own_nonce_deletes(self):
        """delete() (lifetime 0, port 0, address ::ffff:0.0.0.0 per erratum 3621): another
        nonce gets NOT_AUTHORIZED and the rule stays; the mapping's nonce removes it."""
        spec = self.spec(18110)
        r = yield self.map(spec)
        self.assertEqual(r.result, ResultCode.SUCCESS)
        rule = (PROTOCOL_TCP, 18110, HOST, 18110)
        self.assertIn(rule, self.nat_rules())

        intruder = MapSpec(new_nonce(), PROTOCOL_TCP, HOST, 18110, 600)
        r = yield self.delete(intruder)
        self.assertEqual(r.result, ResultCode.NOT_AUTHORIZED)
        self.assertEqual(r.response.body.nonce, intruder.nonce)
        self.assertIn(rule, self.nat_rules())

        r = yield self.delete(spec)
        self.assertEqual(r.result, ResultCode.SUCCESS)
        self.assertEqual(r.lifetime, 0)
        self.assertEchoesThirdParty(r)
        self.assertNotIn(rule, self.nat_rules())
        self.assertNotIn(18110, self.forward_ports())
        self.assertFalse([x for x in self.nat_rules() if x[1] == 18110])

    # -- 4. THIRD_PARTY_ID
    @defer.inlineCallbacks
    def test_third_party_id_4_octets_unsupp_option(self):
        """miniupnpd does not know option 13: UNSUPP_OPTION, with the request's options
        echoed; the client matched that echo (same THIRD_PARTY_ID) to its request."""
        for port, value in ((18120, tpid.l2tpv3_session(1001)), (18121, tpid.gre_key(7))):
            self.assertEqual(len(value), 4)
            r = yield self.map(self.spec(port, third_party_id=value))
            self.assertEqual(r.result, ResultCode.UNSUPP_OPTION)
            self.assertEqual(r.response.option(ThirdPartyId).value, value)
            self.assertEchoesThirdParty(r)
            self.assertFalse([x for x in self.nat_rules() if x[1] == port])
        self.assertIn("Unrecognized mandatory PCP OPTION: 13", self.server_log())
        self.assertEqual(self.client.stats["dropped_unmatched"], 0)

    @defer.inlineCallbacks
    def test_third_party_id_3_octets_malformed_option(self):
        """A 3-octet VXLAN VNI ID (+1 pad octet): miniupnpd's option parser does not skip
        padding ("parsePCPOptions: remain=1") and answers MALFORMED_OPTION (6) instead of
        UNSUPP_OPTION.  The client reports exactly the code on the wire (checked with a
        hand-packed request) and still matches the echo, padding and all."""
        vni = tpid.vxlan_vni(1001)
        self.assertEqual(len(vni), 3)
        wire = raw_map_result(CLIENT_IP, SERVER_IP,
                              raw_option(1, mapped(HOST)) + raw_option(13, vni),
                              18131)
        self.assertEqual(wire, ResultCode.MALFORMED_OPTION)
        r = yield self.map(self.spec(18130, third_party_id=vni))
        self.assertEqual(r.result, wire)
        self.assertEqual(r.response.option(ThirdPartyId).value, vni)
        self.assertIn("parsePCPOptions: remain=1", self.server_log())
        self.assertFalse([x for x in self.nat_rules() if x[1] in (18130, 18131)])

    # -- 5. ANNOUNCE and PREFER_FAILURE
    @defer.inlineCallbacks
    def test_announce(self):
        response = yield self.client.announce("cgn", deadline=DEADLINE)
        self.assertEqual((response.opcode, response.result), (Opcode.ANNOUNCE, ResultCode.SUCCESS))
        self.assertLess(response.epoch, 300)  # system_uptime=no: seconds since miniupnpd started

    @defer.inlineCallbacks
    def test_prefer_failure_denied_port_cannot_provide_external(self):
        """PREFER_FAILURE for an external port the permission rules deny: CANNOT_PROVIDE_EXTERNAL
        at once, nothing installed (the same without PREFER_FAILURE would move to DENIED_PORT+1)."""
        spec = self.spec(DENIED_PORT, host=IPv4Address("192.168.1.12"), prefer_failure=True)
        started = time.monotonic()
        r = yield self.map(spec)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(r.result, ResultCode.CANNOT_PROVIDE_EXTERNAL)
        self.assertFalse([x for x in self.nat_rules() if x[1] == DENIED_PORT])

    @defer.inlineCallbacks
    def test_prefer_failure_held_port_gets_other_port(self):
        """PREFER_FAILURE on 18140, already held by 192.168.1.10: miniupnpd 2.3.1 ignores
        PREFER_FAILURE when its port_in_use check finds the conflict and grants 18141.  The
        client (RFC 6887 13.2) does not take that SUCCESS as the answer: it reports a Mapping
        Update and the request times out; the stray mapping is deleted by its nonce."""
        holder = self.spec(18140)
        r = yield self.map(holder)
        self.assertEqual((r.result, r.external_port), (ResultCode.SUCCESS, 18140))

        spec = self.spec(18140, host=OTHER_HOST, prefer_failure=True)
        d = self.client.map("cgn", spec, deadline=1.5)
        yield self.assertFailure(d, PCPTimeout)
        self.assertGreaterEqual(self.client.stats["dropped_unmatched"], 1)
        self.assertTrue(self.updates.updates)
        update = self.updates.updates[0]
        self.assertEqual((update.result, update.external_port), (ResultCode.SUCCESS, 18141))
        self.assertEqual(update.response.body.nonce, spec.nonce)
        self.assertIn((PROTOCOL_TCP, 18141, OTHER_HOST, 18140), self.nat_rules())

        r = yield self.delete(spec)
        self.assertEqual(r.result, ResultCode.SUCCESS)
        r = yield self.delete(holder)
        self.assertEqual(r.result, ResultCode.SUCCESS)
        self.assertFalse([x for x in self.nat_rules() if x[1] in (18140, 18141)])
