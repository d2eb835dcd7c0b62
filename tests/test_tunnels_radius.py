"""THIRD_PARTY_ID from RADIUS: the request and reply (sans-IO), the client on a
Clock with an in-memory fake server (cache, TTL, retransmission, matching,
coalescing), the client on real loopback UDP, and against a real FreeRADIUS."""

import time

from pyrad import packet as rpacket
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from igdpcp import logs
from igdpcp.interfaces import IThirdPartyIdSource
from igdpcp.iwf.errors import ServerFailure
from igdpcp.tunnels.idsource import AaaRejected, AaaUnreachable, BadId, IdUnavailable, TunnelInfo
from igdpcp.tunnels.radius import RadiusIds, build_request, id_from_reply, load_dictionary, parse_server

from .radiuslab import FreeRadius

DICT = load_dictionary()
SECRET = b"lab-secret-9f2c"
SERVER = ("10.201.0.1", 1812)
CLIENT = ("10.201.0.2", 40000)
DROP = object()
VNI_1001 = b"\x00\x03\xe9"


def tunnel(name="vxlan1001", ifindex=4):
    return TunnelInfo(name, ifindex, "vxlan")


class FakeRadius(DatagramProtocol):
    """A RADIUS server built from pyrad packets: name -> reply attributes, None (reject) or DROP."""

    def __init__(self, table, secret=SECRET, key="NAS-Port-Id"):
        self.table, self.secret, self.key = table, secret, key
        self.requests = []

    def answer(self, data: bytes) -> bytes | None:
        req = rpacket.AuthPacket(packet=data, secret=self.secret, dict=DICT)
        assert req.verify_message_authenticator(), "request without a valid Message-Authenticator"
        self.requests.append(req)
        entry = self.table.get(req[self.key][0])
        if entry is DROP:
            return None
        reply = req.CreateReply(**(entry or {}))
        reply.code = rpacket.AccessAccept if entry is not None else rpacket.AccessReject
        return reply.ReplyPacket()

    def datagramReceived(self, data, addr):
        out = self.answer(data)
        if out is not None:
            self.transport.write(out, addr)


class MemoryTransport:
    def __init__(self, protocol):
        self.protocol, self.outbox, self.addrs = protocol, [], set()

    def write(self, data, addr=None):
        self.outbox.append(data)
        self.addrs.add(addr)

    def stopListening(self):
        self.closed = True


class Net(Clock):
    """A Clock whose listenUDP gives the client an in-memory socket to one FakeRadius."""

    def __init__(self, server: FakeRadius):
        super().__init__()
        self.server = server
        self.client = None
        self.wire = []  # every datagram the client sent

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.client = MemoryTransport(protocol)
        protocol.transport = self.client
        return self.client

    def flush(self):
        """Carry the client's datagrams to the server and its answers back."""
        while self.client.outbox:
            data = self.client.outbox.pop(0)
            self.wire.append(data)
            out = self.server.answer(data)
            if out is not None:
                self.client.protocol.datagramReceived(out, SERVER)

    def drop_pending(self):
        self.wire.extend(self.client.outbox)
        self.client.outbox.clear()


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0] if out else None


class RequestAndReply(SynchronousTestCase):
    def test_request_attributes(self):
        req = build_request(DICT, SECRET, 17, "vxlan1001", nas_identifier="iwf-1", password=b"iwf-lab")
        raw = req.RequestPacket()
        self.assertEqual((raw[0], raw[1], raw[20]), (rpacket.AccessRequest, 17, 80))  # M-A first
        seen = rpacket.AuthPacket(packet=raw, secret=SECRET, dict=DICT)
        self.assertTrue(seen.verify_message_authenticator())
        self.assertEqual(seen["User-Name"], ["vxlan1001"])
        self.assertEqual(seen["NAS-Port-Id"], ["vxlan1001"])
        self.assertEqual(seen["NAS-Identifier"], ["iwf-1"])
        self.assertEqual(seen.PwDecrypt(seen["User-Password"][0]), "iwf-lab")
        self.assertNotIn(b"iwf-lab", raw)
        self.assertNotIn(SECRET, raw)

    def test_only_configured_name_attribute(self):
        req = build_request(DICT, SECRET, 1, "tun1", nas_identifier="x", name_attributes=("NAS-Port-Id",))
        seen = rpacket.AuthPacket(packet=req.RequestPacket(), secret=SECRET, dict=DICT)
        self.assertNotIn("User-Name", seen)
        self.assertNotIn("User-Password", seen)

    def reply(self, code=rpacket.AccessAccept, **attrs):
        req = build_request(DICT, SECRET, 1, "tun1", nas_identifier="x")
        req.RequestPacket()
        server_side = rpacket.AuthPacket(packet=req.RequestPacket(), secret=SECRET, dict=DICT)
        reply = server_side.CreateReply()
        for key, values in attrs.items():
            for v in values:
                reply.AddAttribute(key.replace("_", "-"), v)
        reply.code = code
        data = reply.ReplyPacket()
        decoded = req.CreateReply(packet=data)
        self.assertTrue(req.VerifyReply(decoded, data))
        return decoded

    def test_formats(self):
        self.assertEqual(id_from_reply(self.reply(Class=[VNI_1001]), "Class"), VNI_1001)
        self.assertEqual(id_from_reply(self.reply(Class=[b"gre:7"]), "Class", "spec"), b"\0\0\0\7")
        self.assertEqual(id_from_reply(self.reply(Class=[b"1001"]), "Class", "vxlan"), VNI_1001)
        self.assertEqual(id_from_reply(self.reply(Reply_Message=["l2tpv3:0x12345678"]), "Reply-Message", "spec"),
                         b"\x12\x34\x56\x78")

    def test_bad_answers(self):
        with self.assertRaises(AaaRejected):
            id_from_reply(self.reply(rpacket.AccessReject), "Class")
        for attrs, fmt in (({}, "octets"), ({"Class": [b"first-id", b"second-id"]}, "octets"),
                           ({"Class": [b"gre:x"]}, "spec"), ({"Class": [b"\xff\xfe"]}, "spec"),
                           ({"Class": [b"16777216"]}, "vxlan"), ({"Class": [b"0x10"]}, "vxlan")):
            with self.assertRaises(BadId, msg=(attrs, fmt)) as caught:
                id_from_reply(self.reply(**attrs), "Class", fmt)
            for values in attrs.values():
                for v in values:
                    self.assertNotIn(v.decode("latin-1"), str(caught.exception))
        with self.assertRaises(BadId):
            id_from_reply(self.reply(rpacket.AccessChallenge), "Class")

    def test_parse_server(self):
        self.assertEqual(parse_server("127.0.0.1:1812"), ("127.0.0.1", 1812))
        self.assertEqual(parse_server("[::1]:11812"), ("::1", 11812))
        self.assertEqual(parse_server("10.0.0.1"), ("10.0.0.1", 1812))
        self.assertEqual(parse_server("::1"), ("::1", 1812))
        for bad in ("aaa.example:1812", "1.2.3.4:0", "[::1]x"):
            self.assertRaises(ValueError, parse_server, bad)


class ClientOnAClock(SynchronousTestCase):
    def setUp(self):
        self.server = FakeRadius({"vxlan1001": {"Class": VNI_1001}, "vxlan1002": {"Class": b"\x00\x03\xea"},
                                  "silent": DROP, "noclass": {"Reply_Message": "hi"}})
        self.net = Net(self.server)
        self.ids = RadiusIds(self.net, SERVER, SECRET, "iwf-1", ttl=300, negative_ttl=10, timeout=2,
                             retries=2)

    def ask(self, name="vxlan1001", ifindex=4):
        return self.ids.third_party_id(tunnel(name, ifindex))

    def test_provides_the_interface(self):
        verifyObject(IThirdPartyIdSource, self.ids)

    def test_known_tunnel(self):
        d = self.ask()
        self.assertFalse(d.called)  # nothing before the answer
        self.net.flush()
        self.assertEqual(result(d), VNI_1001)
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(self.net.client.addrs, {SERVER})
        self.assertEqual(self.net.getDelayedCalls(), [])  # no timer left behind

    def test_cache_until_ttl(self):
        self.ask()
        self.net.flush()
        self.net.advance(299)
        self.assertEqual(result(self.ask()), VNI_1001)  # synchronous, from the cache
        self.assertEqual((len(self.server.requests), self.ids.stats["cache_hits"]), (1, 1))
        self.net.advance(1)
        d = self.ask()
        self.net.flush()
        self.assertEqual((result(d), len(self.server.requests)), (VNI_1001, 2))

    def test_new_ifindex_asks_again(self):
        self.ask(ifindex=4)
        self.net.flush()
        d = self.ask(ifindex=9)  # the interface was re-created
        self.net.flush()
        self.assertEqual((result(d), len(self.server.requests)), (VNI_1001, 2))

    def test_forget(self):
        self.ask()
        self.net.flush()
        self.ids.forget(tunnel())
        self.ask()
        self.net.flush()
        self.assertEqual(len(self.server.requests), 2)

    def test_reject_is_cached_briefly(self):
        d = self.ask("vxlan9999")
        self.net.flush()
        failure = result(d)
        self.assertTrue(failure.check(AaaRejected))
        self.assertIsInstance(failure.value, ServerFailure)  # -> UPnP 501
        self.assertTrue(result(self.ask("vxlan9999")).check(AaaRejected))
        self.assertEqual(len(self.server.requests), 1)
        self.net.advance(10)
        d = self.ask("vxlan9999")
        self.net.flush()
        self.assertTrue(result(d).check(AaaRejected))
        self.assertEqual(len(self.server.requests), 2)

    def test_missing_attribute(self):
        d = self.ask("noclass")
        self.net.flush()
        self.assertTrue(result(d).check(BadId))

    def test_retransmits_then_fails(self):
        d = self.ask("silent")
        self.net.flush()
        self.assertEqual(len(self.net.wire), 1)
        self.net.advance(1.9)
        self.net.flush()
        self.assertEqual(len(self.net.wire), 1)
        self.net.advance(0.1)
        self.net.flush()
        self.net.advance(2)
        self.net.flush()
        self.assertEqual(len(self.net.wire), 3)  # first + 2 retransmissions, unchanged
        self.assertEqual(len(set(self.net.wire)), 1)
        self.assertFalse(d.called)
        self.net.advance(1.99)
        self.assertFalse(d.called)
        self.net.advance(0.01)  # 3 x timeout
        self.assertTrue(result(d).check(AaaUnreachable))
        self.assertEqual(self.net.getDelayedCalls(), [])
        self.ask("silent")  # a timeout is not cached
        self.assertEqual(len(self.net.client.outbox), 1)

    def test_answer_to_a_retransmission(self):
        d = self.ask()
        self.net.drop_pending()  # the first transmission is lost
        self.net.advance(2)
        self.net.flush()
        self.assertEqual(result(d), VNI_1001)
        self.assertEqual(self.ids.stats["retransmits"], 1)

    def test_coalesces_concurrent_lookups(self):
        ds = [self.ask() for _ in range(3)]
        other = self.ask("vxlan1002")
        self.net.flush()
        self.assertEqual([result(d) for d in ds], [VNI_1001] * 3)
        self.assertEqual(result(other), b"\x00\x03\xea")
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(self.ids.stats["coalesced"], 2)

    def test_cancelling_one_waiter(self):
        first, second = self.ask(), self.ask()
        first.cancel()
        self.assertTrue(result(first).check(defer.CancelledError))
        self.net.flush()
        self.assertEqual(result(second), VNI_1001)

    def _pending_packet(self):
        lookup = next(iter(self.ids._by_id.values()))
        return lookup.packet

    def _forged(self, secret=SECRET):
        """A reply to the pending request, signed with ``secret``."""
        server_side = rpacket.AuthPacket(packet=self.net.client.outbox[0], secret=SECRET, dict=DICT)
        reply = server_side.CreateReply(Class=b"\x00\x00\x07")
        reply.secret = secret
        return reply.ReplyPacket()

    def test_forged_and_foreign_replies_are_dropped(self):
        d = self.ask()
        wrong_secret = self._forged(secret=b"guess")
        proto = self.net.client.protocol
        proto.datagramReceived(wrong_secret, SERVER)
        good = self._forged()
        proto.datagramReceived(good, ("10.201.0.99", 1812))  # right bytes, wrong source
        proto.datagramReceived(good, (SERVER[0], 1813))
        proto.datagramReceived(good[:12], SERVER)  # truncated
        other_id = bytes([good[0], (good[1] + 1) % 256]) + good[2:]
        proto.datagramReceived(other_id, SERVER)  # no such request
        self.assertFalse(d.called)
        self.assertEqual(self.ids.stats["dropped"], 5)
        self.net.flush()
        self.assertEqual(result(d), VNI_1001)
        proto.datagramReceived(good, SERVER)  # a late duplicate
        self.assertEqual(self.ids.stats["dropped"], 6)

    def test_required_message_authenticator(self):
        ids = RadiusIds(Net(self.server), SERVER, SECRET, require_message_authenticator=True, timeout=1, retries=0)
        d = ids.third_party_id(tunnel())
        request = next(iter(ids._by_id.values())).packet
        server_side = rpacket.AuthPacket(packet=ids.reactor.client.outbox[0], secret=SECRET, dict=DICT)
        unsigned = server_side.CreateReply(Class=VNI_1001, message_authenticator=False)
        ids.reactor.client.protocol.datagramReceived(unsigned.ReplyPacket(), SERVER)
        self.assertFalse(d.called)
        signed = server_side.CreateReply(Class=VNI_1001)
        ids.reactor.client.protocol.datagramReceived(signed.ReplyPacket(), SERVER)
        self.assertEqual(result(d), VNI_1001)
        self.assertIsNotNone(request)

    def test_more_tunnels_than_identifiers(self):
        ds = [self.ask(f"t{i}") for i in range(300)]
        self.assertEqual(len(self.net.client.outbox), 256)
        self.assertEqual(len({data[1] for data in self.net.client.outbox}), 256)
        self.assertEqual(self.ids.stats["queued"], 44)
        self.net.flush()  # rejects free identifiers; the queue moves on
        self.assertTrue(all(result(d).check(AaaRejected) for d in ds))
        self.assertEqual(len(self.server.requests), 300)

    def test_stop_fails_lookups_in_flight(self):
        d = self.ask("silent")
        self.successResultOf(self.ids.stop())
        self.assertTrue(result(d).check(AaaUnreachable))
        self.assertEqual(self.net.getDelayedCalls(), [])

    def test_configuration_checks(self):
        for kw in ({"attribute": "Filter-Id"}, {"name_attributes": ()}, {"format": "base64"},
                   {"timeout": 0}, {"retries": -1}):
            self.assertRaises(ValueError, RadiusIds, self.net, SERVER, SECRET, **kw)
        self.assertRaises(ValueError, RadiusIds, self.net, SERVER, b"")
        self.assertRaises(ValueError, RadiusIds, self.net, ("aaa.example", 1812), SECRET)

    def test_logs_name_no_tunnel_id_or_secret(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        logs.set_level("debug")
        self.addCleanup(logs.set_level, "info")
        ds = [self.ask(name) for name in ("vxlan1001", "vxlan9999", "noclass", "silent")]
        self.net.flush()
        for _ in range(3):
            self.net.advance(2)
        ds.append(self.ask("vxlan1002", ifindex=77))
        self.net.client.protocol.datagramReceived(self._forged(secret=b"guess"), SERVER)
        self.net.flush()
        self.assertEqual([type(r) if isinstance(r, bytes) else r.type for r in map(result, ds)],
                         [bytes, AaaRejected, BadId, AaaUnreachable, bytes])
        text = "\n".join(formatEvent(e) for e in events) + repr(self.ids)
        self.assertGreaterEqual(len(events), 4)
        for secret in ("vxlan1001", "vxlan1002", "vxlan9999", "noclass", "silent", SECRET.decode(), "03e9",
                       "\\x03\\xe9"):
            self.assertNotIn(secret, text)


class ClientOnLoopback(TestCase):
    """The same client on the real reactor and real UDP (fake server)."""

    def setUp(self):
        self.server = FakeRadius({"vxlan1001": {"Class": VNI_1001}})
        self.port = reactor.listenUDP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.ids = RadiusIds(reactor, ("127.0.0.1", self.port.getHost().port), SECRET, timeout=0.5, retries=1)
        self.addCleanup(self.ids.stop)

    @defer.inlineCallbacks
    def test_known_and_unknown(self):
        self.assertEqual((yield self.ids.third_party_id(tunnel())), VNI_1001)
        with self.assertRaises(AaaRejected):
            yield self.ids.third_party_id(tunnel("vxlan9"))


USERS = """\
"vxlan1001" Cleartext-Password := "iwf-lab"
\tClass := 0x0003e9

DEFAULT NAS-Port-Id == "vxlan1002", Auth-Type := Accept
\tClass := 0x0003ea, Reply-Message := "lab"

DEFAULT NAS-Port-Id == "gre7", Auth-Type := Accept
\tClass := "gre:7"

DEFAULT NAS-Port-Id == "twoclass", Auth-Type := Accept
\tClass := 0x01, Class += 0x02
"""


class FreeRadiusLookups(TestCase):
    """A real FreeRADIUS (notes/lab.md section 9) with a users file giving each subscriber's ID."""

    timeout = 60

    @classmethod
    def setUpClass(cls):
        cls.radius = FreeRadius(USERS)
        cls.radius.start()

    @classmethod
    def tearDownClass(cls):
        cls.radius.stop()

    def client(self, **kw):
        kw.setdefault("timeout", 2.0)
        kw.setdefault("retries", 1)
        ids = RadiusIds(reactor, ("127.0.0.1", self.radius.port), self.radius.secret, "igdpcp-test", **kw)
        self.addCleanup(ids.stop)
        return ids

    @defer.inlineCallbacks
    def test_known_by_user_name_and_password(self):
        ids = self.client(password="iwf-lab")
        self.assertEqual((yield ids.third_party_id(tunnel("vxlan1001"))), VNI_1001)

    @defer.inlineCallbacks
    def test_known_by_nas_port_id(self):
        ids = self.client(name_attributes=["NAS-Port-Id"])
        self.assertEqual((yield ids.third_party_id(tunnel("vxlan1002"))), b"\x00\x03\xea")

    @defer.inlineCallbacks
    def test_spec_format(self):
        ids = self.client(format="spec")
        self.assertEqual((yield ids.third_party_id(tunnel("gre7"))), b"\x00\x00\x00\x07")

    @defer.inlineCallbacks
    def test_unknown_tunnel_is_rejected(self):
        ids = self.client(password="iwf-lab")
        with self.assertRaises(AaaRejected):
            yield ids.third_party_id(tunnel("vxlan9999"))
        with self.assertRaises(AaaRejected):  # wrong password: no ID either
            yield self.client(password="nope").third_party_id(tunnel("vxlan1001"))

    @defer.inlineCallbacks
    def test_two_ids_is_no_id(self):
        with self.assertRaises(BadId):
            yield self.client().third_party_id(tunnel("twoclass"))

    @defer.inlineCallbacks
    def test_cache_hit_does_not_reach_the_server(self):
        ids = self.client(password="iwf-lab")
        self.assertEqual((yield ids.third_party_id(tunnel("vxlan1001", 50))), VNI_1001)
        seen = self.radius.requests_seen()
        self.assertEqual((yield ids.third_party_id(tunnel("vxlan1001", 50))), VNI_1001)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.radius.requests_seen(), seen)
        self.assertEqual((ids.stats["sends"], ids.stats["cache_hits"]), (1, 1))

    @defer.inlineCallbacks
    def test_wrong_secret_gets_no_id(self):
        ids = RadiusIds(reactor, ("127.0.0.1", self.radius.port), "not-the-secret", timeout=0.5, retries=0,
                        password="iwf-lab")
        self.addCleanup(ids.stop)
        with self.assertRaises(AaaUnreachable):  # FreeRADIUS drops it (bad Message-Authenticator)
            yield ids.third_party_id(tunnel("vxlan1001"))


class FreeRadiusStopped(TestCase):
    timeout = 60

    def setUp(self):
        self.radius = FreeRadius(USERS)
        self.radius.start()
        self.addCleanup(self.radius.stop)
        self.ids = RadiusIds(reactor, ("127.0.0.1", self.radius.port), self.radius.secret, timeout=0.5,
                             retries=2, name_attributes=["NAS-Port-Id"])
        self.addCleanup(self.ids.stop)

    @defer.inlineCallbacks
    def test_server_stopped(self):
        self.assertEqual((yield self.ids.third_party_id(tunnel("vxlan1002"))), b"\x00\x03\xea")
        self.radius.kill()
        start = time.monotonic()
        with self.assertRaises(AaaUnreachable) as caught:
            yield self.ids.third_party_id(tunnel("gre7"))
        elapsed = time.monotonic() - start
        self.assertTrue(1.4 <= elapsed < 2.5, elapsed)  # 3 transmissions, 0.5 s apart
        self.assertIsInstance(caught.exception, IdUnavailable)
        # the cached answer still serves; the new tunnel is not cached as a failure
        self.assertEqual((yield self.ids.third_party_id(tunnel("vxlan1002"))), b"\x00\x03\xea")
        self.assertEqual(self.ids.stats["timeouts"], 1)
