"""SSDP: the sans-IO codec and matching, the Twisted adapter, and a real gssdp-discover."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from igdpcp.upnp import ssdp
from igdpcp.upnp.device import igd_model
from igdpcp.upnp.ssdp_protocol import AdvertiseSchedule, SSDPProtocol, listen_ssdp

IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANCOMMON1 = "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1"
LOCATION = "http://192.168.1.1:5000/rootDesc.xml"
SECRET = b"test-secret"


def search(st_value="ssdp:all", mx="3", host="239.255.255.250:1900", man='"ssdp:discover"',
           extra=()) -> bytes:
    lines = ["M-SEARCH * HTTP/1.1"]
    if host is not None:
        lines.append(f"HOST: {host}")
    if man is not None:
        lines.append(f"MAN: {man}")
    if mx is not None:
        lines.append(f"MX: {mx}")
    if st_value is not None:
        lines.append(f"ST: {st_value}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class FixedRandom:
    """uniform(a, b) at a fixed fraction of the range, so times are predictable."""

    def __init__(self, fraction=0.5):
        self.fraction = fraction

    def uniform(self, a, b):
        return a + (b - a) * self.fraction


class FakeDatagramTransport:
    def __init__(self):
        self.written = []

    def write(self, data, addr=None):
        self.written.append((data, addr))


# -- parsing -------------------------------------------------------------------

class ParseTests(SynchronousTestCase):
    def test_three_kinds(self):
        self.assertEqual(ssdp.parse(search()).kind, ssdp.M_SEARCH)
        self.assertEqual(ssdp.parse(b"NOTIFY * HTTP/1.1\r\nNT: x\r\n\r\n").kind, ssdp.NOTIFY)
        self.assertEqual(ssdp.parse(b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n").kind, ssdp.RESPONSE)

    def test_header_names_case_insensitive_space_optional(self):
        """R3: libtorrent's ST:upnp:rootdevice, async-upnp-client's HOST:239..., mixed case."""
        data = (b"M-SEARCH * HTTP/1.1\r\nHOST:239.255.255.250:1900\r\nMan:\"ssdp:discover\"\r\n"
                b"mx:  2\r\nSt:upnp:rootdevice\r\nUser-Agent: a: b\r\n\r\n")
        msg = ssdp.parse(data)
        self.assertEqual(msg.headers["host"], "239.255.255.250:1900")
        self.assertEqual(msg.headers["ST"], "upnp:rootdevice")
        self.assertEqual(msg.headers["mx"], "2")
        self.assertEqual(msg.headers["USER-AGENT"], "a: b")  # split at the first colon only
        req = ssdp.parse_search(msg)
        self.assertEqual((req.st, req.mx, req.multicast), ("upnp:rootdevice", 2, True))

    def test_bare_lf_and_no_final_blank_line(self):
        msg = ssdp.parse(b"M-SEARCH * HTTP/1.1\nST: ssdp:all\nMAN: \"ssdp:discover\"")
        self.assertEqual(msg.headers["st"], "ssdp:all")

    def test_empty_value(self):
        self.assertEqual(ssdp.parse(b"HTTP/1.1 200 OK\r\nEXT:\r\n\r\n").headers["ext"], "")

    def test_malformed(self):
        bad = [
            b"",
            b"\r\n",
            b"m-search * HTTP/1.1\r\n\r\n",  # start line is exact (R5)
            b"M-SEARCH * HTTP/1.0\r\n\r\n",
            b"M-SEARCH  * HTTP/1.1\r\n\r\n",
            b"M-SEARCH * HTTP/1.1 \r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nno colon here\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\n: empty name\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNT: a\r\n folded\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNT: a\x00b\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNT: a\rb\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNT: a\r\nnt: b\r\n\r\n",  # duplicate
            b"NOTIFY * HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n",
            b"NOTIFY * HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
        ]
        for data in bad:
            with self.assertRaises(ssdp.SSDPError, msg=data[:40]):
                ssdp.parse(data)
        with self.assertRaises(ssdp.SSDPError):
            ssdp.parse("M-SEARCH * HTTP/1.1")  # not bytes

    def test_search_checks(self):
        def req(**kw):
            return ssdp.parse_search(ssdp.parse(search(**kw)))

        for kw in [dict(man=None), dict(man="ssdp:discover"), dict(man='"ssdp:alive"'),
                   dict(st_value=None), dict(st_value=""), dict(mx="-1"), dict(mx="two"),
                   dict(mx="1.5"), dict(mx="+3"), dict(mx="\u0663")]:
            with self.assertRaises(ssdp.SSDPError, msg=kw):
                req(**kw)
        with self.assertRaises(ssdp.SSDPError):
            ssdp.parse_search(ssdp.parse(b"NOTIFY * HTTP/1.1\r\n\r\n"))

    def test_mx_cap_and_missing(self):
        def mx(value):
            return ssdp.parse_search(ssdp.parse(search(mx=value))).mx

        self.assertEqual(mx("0"), 0)
        self.assertEqual(mx("3"), 3)
        self.assertEqual(mx("5"), 5)
        self.assertEqual(mx("120"), 5)  # a device SHOULD treat MX > 5 as 5
        self.assertEqual(mx("0003"), 3)
        self.assertEqual(mx("9" * 5000), 5)  # no int() on huge strings (str-digits limit)
        self.assertIsNone(mx(None))  # R4: no KeyError, no crash

    def test_delay_bounds(self):
        def bound(**kw):
            return ssdp.response_delay_bound(ssdp.parse_search(ssdp.parse(search(**kw))))

        self.assertEqual(bound(mx="3"), 3.0)
        self.assertEqual(bound(mx="9"), 5.0)
        self.assertEqual(bound(mx=None), ssdp.MISSING_MX_DELAY)  # multicast, no MX: small delay
        self.assertEqual(bound(mx="3", host="192.168.1.1:1900"), 0.0)  # unicast: at once
        self.assertEqual(bound(mx=None, host="192.168.1.1:1900"), 0.0)
        self.assertEqual(bound(mx="2", host="[FF02::C]:1900"), 2.0)
        self.assertEqual(bound(mx="2", host=None), 2.0)  # no HOST: treated as multicast


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=2048))
    def test_random_bytes_raise_only_ssdp_error(self, data):
        self._feed(data)

    header_line = st.tuples(
        st.text(alphabet=st.characters(codec="latin-1"), max_size=20),
        st.sampled_from([":", ": ", ":\t", "", " : "]),
        st.text(alphabet=st.characters(codec="latin-1"), max_size=40),
    ).map("".join)

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["M-SEARCH * HTTP/1.1", "NOTIFY * HTTP/1.1", "HTTP/1.1 200 OK", "x"]),
           st.lists(header_line, max_size=12),
           st.sampled_from(["\r\n", "\n", "\r"]))
    def test_structured_garbage_raises_only_ssdp_error(self, start, lines, eol):
        self._feed(eol.join([start] + lines + ["", ""]).encode("latin-1"))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.none(), st.text(max_size=12)), st.text(max_size=80))
    def test_search_fields(self, mx, target):
        self._feed(search(st_value=target.replace("\r", "").replace("\n", ""),
                          mx=None if mx is None else mx.replace("\r", "").replace("\n", "")))

    def _feed(self, data):
        device = igd_model(2, SECRET, "tun1")
        try:
            msg = ssdp.parse(data)
            if msg.kind == ssdp.M_SEARCH:
                req = ssdp.parse_search(msg)
                for delay, st_value, usn in ssdp.plan_search(device, req, random.Random(0)):
                    self.assertTrue(0 <= delay <= ssdp.MAX_MX)
                    ssdp.build_response(ssdp.SSDPIdentity(LOCATION), st_value, usn, 0)
        except ssdp.SSDPError:
            pass


# -- matching ------------------------------------------------------------------

class MatchTests(SynchronousTestCase):
    def setUp(self):
        self.v1 = igd_model(1, SECRET, "tun1")
        self.v2 = igd_model(2, SECRET, "tun1")
        self.igd, self.wan, self.wcd = list(self.v2.walk())

    def test_ssdp_all_is_the_full_set(self):
        pairs = ssdp.search_answers(self.v2, "ssdp:all")
        # 3 + 2d + k with d = 2 embedded devices, k = 2 service types
        self.assertEqual(len(pairs), 3 + 2 * 2 + 2)
        self.assertEqual(pairs, ssdp.advertisement_set(self.v2))
        nts = [nt for nt, _ in pairs]
        self.assertEqual(len(set(nts)), len(nts))
        for nt, usn in pairs:
            if nt.startswith("uuid:"):
                self.assertEqual(usn, nt)
            else:
                self.assertTrue(usn.endswith("::" + nt))
        self.assertIn((WANIP2, f"{self.wcd.udn}::{WANIP2}"), pairs)
        self.assertIn((WANCOMMON1, f"{self.wan.udn}::{WANCOMMON1}"), pairs)

    def test_rootdevice(self):
        self.assertEqual(ssdp.search_answers(self.v2, "upnp:rootdevice"),
                         [("upnp:rootdevice", f"{self.igd.udn}::upnp:rootdevice")])

    def test_uuid(self):
        for dev in (self.igd, self.wan, self.wcd):
            self.assertEqual(ssdp.search_answers(self.v2, dev.udn), [(dev.udn, dev.udn)])
        self.assertEqual(ssdp.search_answers(self.v2, self.wan.udn.upper().replace("UUID", "uuid")),
                         [(self.wan.udn, self.wan.udn)])
        self.assertEqual(ssdp.search_answers(self.v2, "uuid:00000000-0000-0000-0000-000000000000"), [])

    def test_every_device_and_service_type(self):
        for root in (self.v1, self.v2):
            for dev in root.walk():
                self.assertEqual(ssdp.search_answers(root, dev.device_type),
                                 [(dev.device_type, f"{dev.udn}::{dev.device_type}")])
                for svc in dev.services:
                    self.assertEqual(ssdp.search_answers(root, svc.service_type),
                                     [(svc.service_type, f"{dev.udn}::{svc.service_type}")])

    def test_v2_answers_v1_searches_with_v1_version(self):
        """R2: miniupnpc searches IGD:1 then WANIPConnection:1; we echo :1 in ST and USN."""
        self.assertEqual(ssdp.search_answers(self.v2, IGD1), [(IGD1, f"{self.igd.udn}::{IGD1}")])
        self.assertEqual(ssdp.search_answers(self.v2, WANIP1), [(WANIP1, f"{self.wcd.udn}::{WANIP1}")])
        wcd1 = "urn:schemas-upnp-org:device:WANConnectionDevice:1"
        self.assertEqual(ssdp.search_answers(self.v2, wcd1), [(wcd1, f"{self.wcd.udn}::{wcd1}")])

    def test_nothing_for_unknown_or_higher(self):
        for target in [
            "urn:schemas-upnp-org:device:InternetGatewayDevice:3",
            "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:2",
            "urn:schemas-upnp-org:service:WANPPPConnection:1",
            "urn:schemas-upnp-org:device:InternetGatewayDevice:0",
            "urn:schemas-upnp-org:device:InternetGatewayDevice:01",
            "urn:schemas-upnp-org:device:InternetGatewayDevice",
            "urn:schemas-upnp-org:device:internetgatewaydevice:1",
            "urn:schemas-upnp-org:service:InternetGatewayDevice:1",  # a device name as service
            "urn:schemas-upnp-org:device:WANIPConnection:1",  # a service name as device
            "urn:schemas-microsoft-com:device:InternetGatewayDevice:1",
            "ssdp:ALL", "upnp:RootDevice", "uuid:", "*", "",
        ]:
            self.assertEqual(ssdp.search_answers(self.v2, target), [], target)
        self.assertEqual(ssdp.search_answers(self.v1, IGD2), [])
        self.assertEqual(ssdp.search_answers(self.v1, WANIP2), [])

    def test_plan_spreads_answers_within_mx(self):
        req = ssdp.parse_search(ssdp.parse(search("ssdp:all", mx="3")))
        plan = ssdp.plan_search(self.v2, req, random.Random(7))
        self.assertEqual(len(plan), 9)
        delays = [d for d, _, _ in plan]
        self.assertTrue(all(0 <= d <= 3 for d in delays))
        self.assertGreater(len(set(delays)), 1)


# -- building ------------------------------------------------------------------

class BuildTests(SynchronousTestCase):
    def setUp(self):
        self.identity = ssdp.SSDPIdentity(LOCATION, boot_id=7, config_id=3)
        self.v2 = igd_model(2, SECRET, "tun1")

    def test_response(self):
        data = ssdp.build_response(self.identity, IGD1, "uuid:a::" + IGD1, 784111777)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(data.endswith(b"\r\n\r\n"))
        self.assertIn(b"\r\nEXT:\r\n", data)
        headers = ssdp.parse(data).headers
        self.assertEqual(dict(headers), {
            "cache-control": "max-age=1800",
            "date": "Sun, 06 Nov 1994 08:49:37 GMT",
            "ext": "",
            "location": LOCATION,
            "server": ssdp.SERVER,
            "st": IGD1,
            "usn": "uuid:a::" + IGD1,
            "bootid.upnp.org": "7",
            "configid.upnp.org": "3",
        })
        self.assertLess(len(data), 512)  # fits the smallest datagram (igd.md section 7)

    def test_alive_and_byebye_sets(self):
        alive = ssdp.alive_set(self.identity, self.v2)
        byebye = ssdp.byebye_set(self.identity, self.v2)
        self.assertEqual(len(alive), 9)
        self.assertEqual(len(byebye), 9)
        for data, (nt, usn) in zip(alive, ssdp.advertisement_set(self.v2)):
            msg = ssdp.parse(data)
            self.assertEqual(msg.kind, ssdp.NOTIFY)
            self.assertEqual(dict(msg.headers), {
                "host": "239.255.255.250:1900", "cache-control": "max-age=1800",
                "location": LOCATION, "nt": nt, "nts": "ssdp:alive", "server": ssdp.SERVER,
                "usn": usn, "bootid.upnp.org": "7", "configid.upnp.org": "3",
            })
            self.assertLess(len(data), 512)
        for data, (nt, usn) in zip(byebye, ssdp.advertisement_set(self.v2)):
            self.assertEqual(dict(ssdp.parse(data).headers), {
                "host": "239.255.255.250:1900", "nt": nt, "nts": "ssdp:byebye", "usn": usn,
                "bootid.upnp.org": "7", "configid.upnp.org": "3",
            })
        v6 = ssdp.alive_set(self.identity, self.v2, host="[FF02::C]:1900")[0]
        self.assertEqual(ssdp.parse(v6).headers["host"], "[FF02::C]:1900")

    def test_identity_bounds(self):
        for kw in [dict(boot_id=-1), dict(boot_id=2**31), dict(config_id=16777216),
                   dict(max_age=0), dict(location="http://x/\r\nX: y")]:
            with self.assertRaises(ValueError, msg=kw):
                ssdp.SSDPIdentity(**{"location": LOCATION, **kw})
        with self.assertRaises(ValueError):
            ssdp.build_notify(self.identity, "upnp:rootdevice", "uuid:x", "ssdp:update")


# -- the Twisted adapter -------------------------------------------------------

class ProtocolTests(SynchronousTestCase):
    def make(self, version=1, advertise=AdvertiseSchedule(), fraction=0.5):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.device = igd_model(version, SECRET, "tun1")
        self.transport = FakeDatagramTransport()
        proto = SSDPProtocol(self.clock, self.device, LOCATION, random=FixedRandom(fraction),
                             boot_id=5, config_id=2, advertise=advertise)
        proto.makeConnection(self.transport)
        return proto

    def sent(self):
        out = [(ssdp.parse(data), addr) for data, addr in self.transport.written]
        self.transport.written.clear()
        return out

    def test_answer_after_delay_by_unicast(self):
        proto = self.make(advertise=None)
        proto.datagramReceived(search(IGD1, mx="2"), ("192.168.1.10", 40000))
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.99)  # FixedRandom: 0.5 * MX
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.01)
        [(msg, addr)] = self.sent()
        self.assertEqual(addr, ("192.168.1.10", 40000))
        self.assertEqual(msg.kind, ssdp.RESPONSE)
        self.assertEqual(msg.headers["st"], IGD1)
        self.assertEqual(msg.headers["location"], LOCATION)
        self.assertEqual(msg.headers["bootid.upnp.org"], "5")
        self.assertEqual(msg.headers["date"], ssdp.http_date(self.clock.seconds()))
        self.assertEqual((proto.counters["received"], proto.counters["answered"]), (1, 1))

    def test_mx_capped_and_missing_mx(self):
        proto = self.make(advertise=None, fraction=1.0)
        proto.datagramReceived(search(IGD1, mx="60"), ("192.168.1.10", 1))
        self.clock.advance(4.99)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.sent()), 1)
        proto.datagramReceived(search(IGD1, mx=None), ("192.168.1.10", 1))
        self.clock.advance(ssdp.MISSING_MX_DELAY)
        self.assertEqual(len(self.sent()), 1)

    def test_unicast_search_answered_at_once(self):
        proto = self.make(advertise=None)
        proto.datagramReceived(search("upnp:rootdevice", mx=None, host="192.168.1.1:1900"),
                               ("192.168.1.10", 1))
        self.clock.advance(0)
        self.assertEqual(len(self.sent()), 1)

    def test_v2_echoes_v1_search(self):
        proto = self.make(version=2, advertise=None)
        proto.datagramReceived(search(WANIP1, mx="1"), ("192.168.1.10", 1))
        self.clock.advance(1)
        [(msg, _)] = self.sent()
        self.assertEqual(msg.headers["st"], WANIP1)
        self.assertTrue(msg.headers["usn"].endswith("::" + WANIP1))

    def test_ssdp_all(self):
        proto = self.make(advertise=None)
        proto.datagramReceived(search("ssdp:all", mx="1"), ("192.168.1.10", 1))
        self.clock.advance(1)
        self.assertEqual({m.headers["st"] for m, _ in self.sent()},
                         {nt for nt, _ in ssdp.advertisement_set(self.device)})

    def test_drops_and_ignores(self):
        proto = self.make(advertise=None)
        for data in [b"garbage", b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n",  # no MAN
                     search(mx="x")]:
            proto.datagramReceived(data, ("192.168.1.10", 1))
        proto.datagramReceived(b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n", ("192.168.1.10", 1))
        proto.datagramReceived(search("urn:schemas-upnp-org:device:Printer:1"), ("192.168.1.10", 1))
        proto.datagramReceived(search(), ("192.168.1.10", 0))
        proto.datagramReceived(search(), ("239.255.255.250", 1900))
        proto.datagramReceived(search(), ("0.0.0.0", 1900))
        self.clock.advance(10)
        self.assertEqual(self.sent(), [])
        self.assertEqual(proto.counters["dropped_malformed"], 3)
        self.assertEqual(proto.counters["ignored"], 1)
        self.assertEqual(proto.counters["unmatched"], 1)
        self.assertEqual(proto.counters["dropped_bad_source"], 3)
        self.assertEqual(proto.counters["received"], 8)

    def test_pending_answers_bounded(self):
        proto = self.make(advertise=None)
        for _ in range(100):
            proto.datagramReceived(search("ssdp:all", mx="5"), ("192.168.1.10", 1))
        self.assertGreater(proto.counters["dropped_busy"], 0)
        self.clock.advance(5)
        self.assertLessEqual(len(self.sent()), 256)

    def test_announcements(self):
        proto = self.make(version=1)
        n = len(ssdp.advertisement_set(self.device))
        self.assertEqual(n, 9)
        self.clock.advance(0.049)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.001)  # first set after 0..100 ms (FixedRandom: 50 ms)
        first = self.sent()
        self.assertEqual(len(first), n)
        self.assertTrue(all(m.headers["nts"] == "ssdp:alive" for m, _ in first))
        self.assertTrue(all(a == ("239.255.255.250", 1900) for _, a in first))
        self.clock.advance(0.25)  # the set again, a few hundred ms later
        self.assertEqual(len(self.sent()), n)
        self.clock.advance(900 - 32.5 - 0.25 - 0.001)  # interval minus jitter (1..64 -> 32.5)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.sent()), n)
        self.clock.advance(0.25)
        self.assertEqual(len(self.sent()), n)
        self.clock.advance(900 - 32.5 - 0.25)
        self.assertEqual(len(self.sent()), n)
        self.assertEqual(proto.counters["announced"], 5)

    def test_jitter_varies(self):
        self.clock = task.Clock()
        device = igd_model(1, SECRET, "tun1")
        transport = FakeDatagramTransport()
        proto = SSDPProtocol(self.clock, device, LOCATION, random=random.Random(3),
                             advertise=AdvertiseSchedule(repeats=1))
        proto.makeConnection(transport)
        times = []
        for _ in range(4000):
            self.clock.advance(1)
            if transport.written:
                times.append(self.clock.seconds())
                transport.written.clear()
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreaterEqual(len(gaps), 3)
        self.assertTrue(all(900 - 64 - 1 <= g <= 900 for g in gaps), gaps)
        self.assertGreater(len(set(gaps)), 1)

    def test_v2_byebye_before_first_alive(self):
        self.make(version=2)
        self.clock.advance(0.05)
        nts = [m.headers["nts"] for m, _ in self.sent()]
        self.assertEqual(nts, ["ssdp:byebye"] * 9 + ["ssdp:alive"] * 9)
        self.clock.advance(0.25)
        self.assertEqual({m.headers["nts"] for m, _ in self.sent()}, {"ssdp:alive"})

    def test_v1_no_byebye_first_unless_asked(self):
        self.make(version=1, advertise=AdvertiseSchedule(byebye_first=True))
        self.clock.advance(0.05)
        self.assertEqual(self.sent()[0][0].headers["nts"], "ssdp:byebye")

    def test_byebye_on_stop_cancels_everything(self):
        proto = self.make(version=1)
        self.clock.advance(0.05)
        self.sent()
        proto.datagramReceived(search(IGD1, mx="5"), ("192.168.1.10", 1))
        proto.doStop()
        out = self.sent()
        self.assertEqual([m.headers["nts"] for m, _ in out], ["ssdp:byebye"] * 9)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2000)
        self.assertEqual(self.sent(), [])
        proto.shutdown()  # idempotent
        self.assertEqual(self.sent(), [])

    def test_no_byebye_if_never_announced(self):
        proto = self.make(version=1)
        proto.doStop()
        self.assertEqual(self.sent(), [])

    def test_send_errors_counted(self):
        proto = self.make(advertise=None)

        def fail(data, addr):
            raise OSError("ENETUNREACH")

        self.transport.write = fail
        proto.datagramReceived(search(IGD1, mx="0"), ("192.168.1.10", 1))
        self.clock.advance(0)
        self.assertEqual(proto.counters["send_failed"], 1)

    def test_schedule_validation(self):
        for kw in [dict(repeats=0), dict(repeats=4), dict(jitter=(5, 1)), dict(interval=10)]:
            with self.assertRaises(ValueError, msg=kw):
                AdvertiseSchedule(**kw)


# -- real sockets: gssdp-discover in a subscriber netns -------------------------

NS = f"gt-ssdp-s1-{os.getpid()}"  # unique per run: netns names are global
VETH = f"gt-ssdp{os.getpid()}"[:15]  # root-namespace ifname, IFNAMSIZ
IGD_ADDR = "192.168.77.1"
SUB_ADDR = "192.168.77.10"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class GssdpDiscoverTests(TestCase):
    """A real GSSDP client in its own netns finds us over a veth 'tunnel' (lab.md section 6)."""

    timeout = 30

    def setUp(self):
        if os.geteuid() != 0:
            raise SkipTest("needs root for ip netns")
        if shutil.which("gssdp-discover") is None or shutil.which("ip") is None:
            raise SkipTest("gssdp-discover (gupnp-tools) and iproute2 needed")
        self._cleanup()
        self.addCleanup(self._cleanup)
        try:
            _ip("netns", "add", NS)
            _ip("link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NS)
            _ip("addr", "add", f"{IGD_ADDR}/24", "dev", VETH)
            _ip("link", "set", VETH, "up")
            _ip("-n", NS, "link", "set", "lo", "up")
            _ip("-n", NS, "addr", "add", f"{SUB_ADDR}/24", "dev", "eth0")
            _ip("-n", NS, "link", "set", "eth0", "up")
            _ip("-n", NS, "route", "add", "default", "via", IGD_ADDR)
        except subprocess.CalledProcessError as e:
            raise SkipTest(f"cannot build the netns lab: {e.stderr.strip()}")
        self._wait_link_up()

    @staticmethod
    def _wait_link_up(deadline=5.0):
        """A search sent before the veth carries traffic is lost: wait for both ends."""
        import time

        end = time.monotonic() + deadline
        while time.monotonic() < end:
            root = _ip("-o", "link", "show", VETH, check=False).stdout
            peer = _ip("-n", NS, "-o", "link", "show", "eth0", check=False).stdout
            if "LOWER_UP" in root and "LOWER_UP" in peer:
                return
            time.sleep(0.05)

    @staticmethod
    def _cleanup():
        _ip("netns", "del", NS, check=False)
        _ip("link", "del", VETH, check=False)

    @defer.inlineCallbacks
    def discover(self, proto, target):
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        port = yield listen_ssdp(reactor, proto, IGD_ADDR)
        try:
            out, err, _ = yield getProcessOutputAndValue(
                "/usr/bin/ip",
                ["netns", "exec", NS, "timeout", "10", "gssdp-discover", "-i", "eth0",
                 "-n", "4", "-r", "1", "-t", target], env=os.environ)
        finally:
            proto.shutdown()
            yield port.stopListening()
        return out.decode(errors="replace") + err.decode(errors="replace")

    @defer.inlineCallbacks
    def test_search_answered_with_searched_version(self):
        """miniupnpc/GUPnP-IGD search IGD:1; an IGD:2 answers it as :1 (R2)."""
        from twisted.internet import reactor

        device = igd_model(2, SECRET, "tun1")
        location = f"http://{IGD_ADDR}:5000/rootDesc.xml"
        # Answer 0.6 s after each search (MX 3): well inside gssdp-discover's window.
        proto = SSDPProtocol(reactor, device, location, random=FixedRandom(0.2), advertise=None)
        text = yield self.discover(proto, IGD1)
        self.assertIn("resource available", text, dict(proto.counters))
        self.assertIn(f"USN:      {device.udn}::{IGD1}", text)
        self.assertIn(f"Location: {location}", text)
        self.assertGreaterEqual(proto.counters["answered"], 1)
        self.assertEqual(proto.counters["dropped_malformed"], 0)

    @defer.inlineCallbacks
    def test_alive_notify_seen(self):
        """Our ssdp:alive set alone (searches ignored) makes the device known."""
        from twisted.internet import reactor

        class NotifyOnly(SSDPProtocol):
            def datagramReceived(self, data, addr):
                self.counters["received"] += 1

        device = igd_model(1, SECRET, "tun1")
        location = f"http://{IGD_ADDR}:5000/rootDesc.xml"
        # Start announcing once gssdp-discover listens: the first set after ~1 s.
        proto = NotifyOnly(reactor, device, location, random=FixedRandom(1.0),
                           advertise=AdvertiseSchedule(initial_delay_max=1.0, repeats=3,
                                                       repeat_gap=0.5))
        text = yield self.discover(proto, "upnp:rootdevice")
        self.assertIn(f"USN:      {device.udn}::upnp:rootdevice", text)
        self.assertIn(f"Location: {location}", text)
