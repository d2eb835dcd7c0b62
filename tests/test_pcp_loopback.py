"""The PCP client against the lab CGN over real UDP sockets on loopback."""

from ipaddress import IPv4Address

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from igdpcp.pcp import tpid
from igdpcp.pcp.client import MapSpec, PCPClient, PeerSpec, ServerAddress, new_nonce
from igdpcp.pcp.constants import ResultCode
from igdpcp.pcplab.cgn import LabCGN
from igdpcp.pcplab.config import CGNConfig
from igdpcp.pcplab.server import PCPLabServer

HOST = IPv4Address("192.168.1.10")


class Events:
    def __init__(self):
        self.lost = []

    def server_state_lost(self, server):
        self.lost.append(server)


class LoopbackTests(TestCase):
    def setUp(self):
        # Booted 1000 s ago, so that a reboot shows in the epoch (RFC 6887 section 8.5).
        self.cgn = LabCGN(CGNConfig(), reactor.seconds() - 1000)
        self.server = PCPLabServer(self.cgn, reactor)
        self.port = reactor.listenUDP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        address = ServerAddress("127.0.0.1", self.port.getHost().port)
        self.client = PCPClient(reactor, {"lab": address, "other": ServerAddress("127.0.0.1", 9)})
        self.client.start()
        self.addCleanup(self.client.stop)
        self.events = Events()
        self.client.add_listener(self.events)

    def spec(self, vni, port=8080, **kw):
        kw.setdefault("lifetime", 600)
        return MapSpec(new_nonce(), 6, HOST, port, third_party_id=tpid.vxlan_vni(vni),
                       external_port=port + 10000, **kw)

    @defer.inlineCallbacks
    def test_many_overlapping_subscribers_in_flight(self):
        # 200 subscribers, all 192.168.1.10:8080/TCP, all at once.
        specs = [self.spec(1000 + i) for i in range(200)]
        results = yield defer.gatherResults([self.client.map("lab", s, deadline=10) for s in specs])
        self.assertTrue(all(r.ok for r in results))
        for spec, result in zip(specs, results):
            self.assertEqual(result.response.body.nonce, spec.nonce)
        table = self.cgn.snapshot(reactor.seconds())
        self.assertEqual(len(table), 200)
        by_id = {m["third_party_id"]: (m["external_address"], m["external_port"]) for m in table}
        for spec, result in zip(specs, results):
            self.assertEqual(by_id[spec.third_party_id.hex()],
                             (str(result.external_address), result.external_port))
        self.assertEqual(self.client.stats["dropped_unmatched"], 0)

    @defer.inlineCallbacks
    def test_renew_delete_and_errors(self):
        spec = self.spec(7)
        first = yield self.client.map("lab", spec)
        again = yield self.client.map("lab", spec)
        self.assertEqual((first.external_address, first.external_port),
                         (again.external_address, again.external_port))
        stolen = MapSpec(new_nonce(), 6, HOST, 8080, 600, third_party_id=spec.third_party_id)
        refused = yield self.client.map("lab", stolen)
        self.assertEqual(refused.result, ResultCode.NOT_AUTHORIZED)
        gone = yield self.client.delete("lab", spec)
        self.assertEqual((gone.result, gone.lifetime), (ResultCode.SUCCESS, 0))
        self.assertEqual(self.cgn.snapshot(reactor.seconds()), [])
        no_tp = MapSpec(new_nonce(), 6, HOST, 8080, 600, third_party_id=b"x", third_party=False)
        missing = yield self.client.map("lab", no_tp)
        self.assertEqual(missing.result, ResultCode.THIRD_PARTY_MISSING_OPTION)

    @defer.inlineCallbacks
    def test_peer_and_announce(self):
        peer = PeerSpec(new_nonce(), 6, HOST, 5000, 600, IPv4Address("198.51.100.2"), 443,
                        third_party_id=b"\x00\x00\x00\x01")
        result = yield self.client.peer("lab", peer)
        self.assertTrue(result.ok)
        response = yield self.client.announce("lab")
        self.assertEqual(response.result, ResultCode.SUCCESS)

    @defer.inlineCallbacks
    def test_reboot_announce_reports_state_loss(self):
        yield self.client.map("lab", self.spec(1))
        self.server.reboot()
        for _ in range(50):
            if self.events.lost:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.events.lost[:1], ["lab"])

    @defer.inlineCallbacks
    def test_requests_go_to_the_named_server(self):
        # "other" is port 9 (discard): nothing answers, and "lab" sees nothing of it.
        before = self.cgn.counters["received"]
        d = self.client.map("other", self.spec(2), deadline=0.3)
        with self.assertRaises(Exception):
            yield d
        self.assertEqual(self.cgn.counters["received"], before)
