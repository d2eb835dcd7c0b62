"""PCP client logic with a Clock and in-memory UDP: matching, retransmission,
epoch, reachability, deletes, supersession."""

import random
from ipaddress import IPv4Address

from twisted.trial.unittest import SynchronousTestCase

from igdpcp.pcp import schedule
from igdpcp.pcp.client import MapSpec, PCPClient, PCPSuperseded, PCPTimeout, ServerAddress, new_nonce
from igdpcp.pcp.codec import PreferFailure, ThirdParty, ThirdPartyId
from igdpcp.pcp.constants import Opcode, ResultCode
from igdpcp.pcp.epoch import EpochTracker
from igdpcp.pcp.schedule import RetransmitPolicy

from .pcpfakes import SERVER_IP, UDPClock, answer

HOST = IPv4Address("192.168.1.10")


class FixedRandom(random.Random):
    """RAND = 0 always: retransmission times become exact."""

    def uniform(self, a, b):
        return (a + b) / 2 if a < 0 else a


class Recorder:
    def __init__(self):
        self.events = []

    def server_state_lost(self, server):
        self.events.append(("lost", server))

    def server_unreachable(self, server):
        self.events.append(("unreachable", server))

    def server_reachable(self, server):
        self.events.append(("reachable", server))

    def mapping_update(self, server, result):
        self.events.append(("update", server, result.external_port))


def spec(tpid=b"\x00\x03\xe9", nonce=None, port=8080, **kw):
    kw.setdefault("lifetime", 3600)
    kw.setdefault("external_port", 18080)
    return MapSpec(nonce or new_nonce(), 6, HOST, port, third_party_id=tpid, **kw)


class ClientTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = UDPClock()
        self.client = PCPClient(self.clock, {"cgn": ServerAddress(SERVER_IP)}, rng=FixedRandom())
        self.client.start()
        self.events = Recorder()
        self.client.add_listener(self.events)

    def pump(self, seconds, step=0.5):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def results(self, d):
        out = []
        d.addBoth(out.append)
        return out


class RequestTests(ClientTestCase):
    def test_map_carries_third_party_and_id(self):
        self.client.map("cgn", spec(prefer_failure=True))
        (req,) = self.clock.sent()
        self.assertEqual(req.opcode, Opcode.MAP)
        self.assertEqual(req.client_address, IPv4Address("10.200.0.2"))
        self.assertEqual(req.option(ThirdParty).address, HOST)
        self.assertEqual(req.option(ThirdPartyId).value, b"\x00\x03\xe9")
        self.assertIsNotNone(req.option(PreferFailure))
        self.assertEqual(req.body.external_address, IPv4Address("0.0.0.0"))

    def test_delete_is_erratum_3621(self):
        self.client.delete("cgn", spec(prefer_failure=True, external_address=IPv4Address("5.5.5.5")))
        (req,) = self.clock.sent()
        self.assertEqual(req.lifetime, 0)
        self.assertEqual(req.body.external_port, 0)
        self.assertEqual(req.body.external_address, IPv4Address("0.0.0.0"))
        self.assertIsNone(req.option(PreferFailure))
        self.assertEqual(req.option(ThirdPartyId).value, b"\x00\x03\xe9")

    def test_caller_nonce_is_used(self):
        # A restarted IWF renews with the nonce it persisted (RFC 6887 section 11.1).
        nonce = bytes(range(12))
        self.client.map("cgn", spec(nonce=nonce))
        self.client.delete("cgn", spec(nonce=nonce, port=9090))
        self.assertEqual([r.body.nonce for r in self.clock.sent()], [nonce, nonce])

    def test_unknown_server_is_refused(self):
        self.assertRaises(ValueError, self.client.map, "other", spec())


class MatchingTests(ClientTestCase):
    def test_success_completes(self):
        out = self.results(self.client.map("cgn", spec()))
        (req,) = self.clock.sent()
        self.clock.deliver(answer(req, lifetime=7200))
        (result,) = out
        self.assertTrue(result.ok)
        self.assertEqual((result.external_address, result.external_port), (IPv4Address("5.5.5.5"), 18080))
        self.assertEqual(result.lifetime, 7200)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_overlapping_subscribers_never_confused(self):
        # Same 192.168.1.10:8080/TCP behind two tunnels, both in flight at once.
        a = self.results(self.client.map("cgn", spec(tpid=b"\x00\x03\xe9")))
        b = self.results(self.client.map("cgn", spec(tpid=b"\x00\x03\xea")))
        req_a, req_b = self.clock.sent()
        self.clock.deliver(answer(req_b, external_port=20002))
        self.clock.deliver(answer(req_a, external_port=20001))
        self.assertEqual(a[0].external_port, 20001)
        self.assertEqual(b[0].external_port, 20002)

    def test_same_nonce_different_ids_never_confused(self):
        nonce = new_nonce()
        a = self.results(self.client.map("cgn", spec(tpid=b"A", nonce=nonce)))
        b = self.results(self.client.map("cgn", spec(tpid=b"B", nonce=nonce)))
        req_a, req_b = self.clock.sent()
        self.clock.deliver(answer(req_a, external_port=1111))
        self.assertEqual(a[0].external_port, 1111)
        self.assertEqual(b, [])

    def mismatch(self, **changes):
        out = self.results(self.client.map("cgn", spec()))
        req = self.clock.sent()[-1]
        source = changes.pop("source", (SERVER_IP, 5351))
        data = bytearray(answer(req, **changes.pop("answer", {})))
        for offset, value in changes.pop("patch", {}).items():
            data[offset] = value
        self.clock.deliver(bytes(data), source=source)
        self.assertEqual(out, [])
        return out, req

    def test_wrong_source_dropped(self):
        self.mismatch(source=("10.200.0.9", 5351))
        self.mismatch(source=(SERVER_IP, 5352))
        self.assertEqual(self.client.stats["dropped_source"], 2)

    def test_wrong_nonce_protocol_port_opcode_dropped(self):
        self.mismatch(patch={24: 0xFF})  # nonce
        self.mismatch(patch={36: 17})  # protocol
        self.mismatch(patch={41: 0x91})  # internal port
        self.assertEqual(self.client.stats["dropped_unmatched"], 3)
        self.mismatch(patch={1: 0x82})  # opcode PEER
        stats = self.client.stats
        self.assertEqual(stats["dropped_unmatched"] + stats["dropped_malformed"], 4)

    def test_wrong_third_party_or_id_dropped(self):
        self.mismatch(answer={"options": (ThirdParty(IPv4Address("192.168.1.11")),
                                          ThirdPartyId(b"\x00\x03\xe9"))})
        self.mismatch(answer={"options": (ThirdParty(HOST), ThirdPartyId(b"\x00\x03\xea"))})
        self.mismatch(answer={"options": (ThirdParty(HOST),)})
        self.assertEqual(self.client.stats["dropped_unmatched"], 3)
        self.assertEqual([e[0] for e in self.events.events], ["update"] * 3)

    def test_malformed_dropped_and_counted(self):
        out = self.results(self.client.map("cgn", spec()))
        for junk in [b"", b"\x02", b"\x02\x81" + bytes(21), bytes(1200)]:
            self.clock.deliver(junk)
        self.assertEqual(out, [])
        self.assertEqual(self.client.stats["dropped_malformed"], 4)

    def test_error_result_is_returned_not_raised(self):
        out = self.results(self.client.map("cgn", spec()))
        (req,) = self.clock.sent()
        self.clock.deliver(answer(req, result=ResultCode.THIRD_PARTY_ID_UNKNOWN, lifetime=1800))
        self.assertEqual(out[0].result, ResultCode.THIRD_PARTY_ID_UNKNOWN)
        self.assertFalse(out[0].ok)

    def test_prefer_failure_success_must_echo_suggestion(self):
        out = self.results(self.client.map("cgn", spec(prefer_failure=True)))
        (req,) = self.clock.sent()
        self.clock.deliver(answer(req, external_port=18081))  # stale mapping update
        self.assertEqual(out, [])
        self.clock.deliver(answer(req))
        self.assertEqual(out[0].external_port, 18080)

    def test_absurd_lifetime_capped(self):
        out = self.results(self.client.map("cgn", spec()))
        (req,) = self.clock.sent()
        self.clock.deliver(answer(req, lifetime=5 * 365 * 86400))
        self.assertEqual(out[0].lifetime, 86400)

    def test_newer_request_supersedes(self):
        s = spec()
        first = self.results(self.client.map("cgn", s))
        second = self.results(self.client.delete("cgn", s))
        first[0].trap(PCPSuperseded)
        req = self.clock.sent()[1]
        self.clock.deliver(answer(req, lifetime=0))
        self.assertEqual(second[0].lifetime, 0)

    def test_cancel_forgets(self):
        d = self.client.map("cgn", spec())
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertFalse(self.clock.getDelayedCalls())


class RetransmissionTests(ClientTestCase):
    def test_rfc6887_schedule(self):
        self.client.map("cgn", spec())
        times = []
        for _ in range(400):
            self.clock.advance(1)
            if len(self.clock.transports[0].written) > len(times) + 1:
                times.append(self.clock.seconds())
        # IRT 3, doubling: sends at 0 (not recorded), 3, 9, 21, 45, 93, 189, 381.
        self.assertEqual(times, [3, 9, 21, 45, 93, 189, 381])
        self.assertEqual(len({r.body.nonce for r in self.clock.sent()}), 1)

    def test_mrc_gives_up(self):
        out = self.results(self.client.map("cgn", spec(), policy=RetransmitPolicy(irt=1, mrc=3)))
        self.pump(100)
        self.assertEqual(len(self.clock.transports[0].written), 3)
        out[0].trap(PCPTimeout)

    def test_mrt_caps(self):
        p = RetransmitPolicy(irt=1, mrt=4)
        rng = FixedRandom()
        rts = [p.first(rng)]
        for _ in range(5):
            rts.append(p.next(rts[-1], rng))
        self.assertEqual(rts, [1, 2, 4, 4, 4, 4])

    def test_deadline(self):
        out = self.results(self.client.map("cgn", spec(), deadline=4.0))
        self.clock.advance(3.9)
        self.assertEqual(out, [])
        self.clock.advance(0.2)
        self.assertEqual(out[0].value.sends, 2)
        out[0].trap(PCPTimeout)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_rand_is_fresh_and_bounded(self):
        p = RetransmitPolicy()
        rng = random.Random(1)
        values = [p.first(rng) for _ in range(200)]
        self.assertTrue(all(2.7 <= v <= 3.3 for v in values))
        self.assertGreater(len(set(values)), 150)


class InFlightCapTests(ClientTestCase):
    def setUp(self):
        super().setUp()
        self.client.max_in_flight = 2

    def test_excess_waits_its_turn(self):
        outs = [self.results(self.client.map("cgn", spec(port=8000 + i))) for i in range(4)]
        self.assertEqual(len(self.clock.sent()), 2)
        self.assertEqual(self.client.stats["queued"], 2)
        self.clock.deliver(answer(self.clock.sent()[0]))
        self.assertEqual(len(self.clock.sent()), 3)  # the third went out
        self.assertTrue(outs[0][0].ok)
        self.assertEqual([r.body.internal_port for r in self.clock.sent()], [8000, 8001, 8002])

    def test_queued_request_keeps_its_deadline(self):
        self.client.map("cgn", spec(port=8000))
        self.client.map("cgn", spec(port=8001))
        late = self.results(self.client.map("cgn", spec(port=8002), deadline=1.0))
        self.pump(1.5)
        late[0].trap(PCPTimeout)
        self.assertEqual(late[0].value.sends, 0)
        self.assertEqual(len(self.clock.sent()), 2)

    def test_queued_request_can_be_superseded(self):
        self.client.map("cgn", spec(port=8000))
        self.client.map("cgn", spec(port=8001))
        s = spec(port=8002)
        first = self.results(self.client.map("cgn", s))
        self.client.delete("cgn", s)
        first[0].trap(PCPSuperseded)


class ServerHealthTests(ClientTestCase):
    def test_unreachable_after_four_then_reachable(self):
        self.client.map("cgn", spec())
        self.pump(20)
        self.assertEqual(self.events.events, [])
        self.pump(2)  # 4th transmission at 21 s
        self.assertEqual(self.events.events, [("unreachable", "cgn")])
        self.pump(100)
        self.assertEqual(self.events.events, [("unreachable", "cgn")])
        req = self.clock.sent()[0]
        self.clock.deliver(answer(req))
        self.assertEqual(self.events.events[-1], ("reachable", "cgn"))

    def test_epoch_reset_reports_state_loss(self):
        for epoch, advance in [(100, 0), (160, 60), (10, 5)]:
            self.clock.advance(advance)
            self.client.map("cgn", spec())
            self.clock.deliver(answer(self.clock.sent()[-1], epoch=epoch))
        self.assertEqual(self.events.events, [("lost", "cgn")])

    def test_unsolicited_announce(self):
        self.client.map("cgn", spec())
        self.clock.deliver(answer(self.clock.sent()[0], epoch=5000))
        self.clock.advance(30)
        announce = self.client.announce  # a probe, then an unsolicited one after a reboot
        out = self.results(announce("cgn"))
        self.clock.deliver(answer(self.clock.sent()[-1], epoch=5030))
        self.assertEqual(out[0].epoch, 5030)
        self.clock.deliver(answer(self.clock.sent()[-1], epoch=0))
        self.assertEqual(self.events.events, [("lost", "cgn")])
        self.assertEqual(self.client.stats["unsolicited_announce"], 1)


class EpochTests(SynchronousTestCase):
    """RFC 6887 section 8.5 arithmetic."""

    def test_rules(self):
        t = EpochTracker()
        self.assertTrue(t.observe(1000, 50))  # first
        self.assertTrue(t.observe(1010, 60))
        self.assertTrue(t.observe(1010, 59))  # back by 1 tolerated
        self.assertFalse(t.observe(1010, 57))  # back by 2
        self.assertTrue(t.observe(1170, 217))  # 160 vs 160
        self.assertFalse(t.observe(1180, 317))  # server jumped ahead
        self.assertFalse(t.observe(1400, 320))  # server slow: 220 client vs 3 server

    def test_drift_tolerance(self):
        t = EpochTracker()
        t.observe(0, 0)
        # client_delta 1600, server 1500: 1500 + 2 < 1600 - 100 is false -> valid
        self.assertTrue(t.observe(1600, 1500))


class RenewalScheduleTests(SynchronousTestCase):
    def test_windows(self):
        rng = random.Random(7)
        for _ in range(200):
            self.assertTrue(1800 <= schedule.renewal_delay(3600, 0, rng) <= 2250)
            self.assertTrue(2700 <= schedule.renewal_delay(3600, 1, rng) <= 2925)
            self.assertTrue(3150 <= schedule.renewal_delay(3600, 2, rng) <= 3262.5)

    def test_gap_and_end(self):
        rng = FixedRandom()
        # Short lifetime: attempts crowd the end and stop before expiry.
        delays = []
        elapsed = 0.0
        for attempt in range(20):
            d = schedule.next_renewal(120, attempt, elapsed, rng)
            if d is None:
                break
            delays.append(d)
            elapsed += d
        self.assertTrue(all(d >= 4 for d in delays[1:]))
        self.assertLess(elapsed, 120)
        self.assertLess(len(delays), 20)
