"""GENA: subscription rules, event bodies and SEQ, the HTTP resource, the NOTIFY sender,
and a loopback end-to-end run."""

from __future__ import annotations

import ipaddress
import itertools
import uuid

from lxml import etree
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from igdpcp.subscriber import Caller, Subscriber
from igdpcp.upnp import gena
from igdpcp.upnp.device import igd_model
from igdpcp.upnp.gena_http import EventSubResource, NotifySender, publish
from igdpcp.upnp.ssdp import SERVER

SECRET = b"test-secret"
CP = ipaddress.IPv4Address("192.168.1.10")
OTHER = ipaddress.IPv4Address("192.168.1.11")
CB = "http://192.168.1.10:49152/evt"
STATE_V2 = {
    "PossibleConnectionTypes": "IP_Routed",
    "ConnectionStatus": "Connected",
    "ExternalIPAddress": "203.0.113.7",
    "PortMappingNumberOfEntries": 0,
    "SystemUpdateID": 1,
}


def services(version=2):
    root = igd_model(version, SECRET, "tun1")
    found = {s.name: s for d in root.walk() for s in d.services}
    return found["WANIPConnection"], found["WANCommonInterfaceConfig"]


def make_manager(version=2, **kw):
    clock = task.Clock()
    clock.advance(1000)
    counter = itertools.count()
    kw.setdefault("new_sid", lambda: f"uuid:00000000-0000-4000-8000-{next(counter):012d}")
    return gena.SubscriptionManager(services(version)[0], clock, **kw), clock


def new(manager, caller=CP, callback=f"<{CB}>", timeout=None, **extra):
    headers = {"nt": "upnp:event", "callback": callback, **extra}
    if timeout is not None:
        headers["timeout"] = timeout
    return manager.subscribe(caller, headers)


def props(body: bytes):
    root = etree.fromstring(body)
    assert root.tag == "{urn:schemas-upnp-org:event-1-0}propertyset"
    out = []
    for prop in root:
        assert prop.tag == "{urn:schemas-upnp-org:event-1-0}property"
        [var] = list(prop)
        out.append((var.tag, var.text or ""))
    return out


# -- subscriptions ---------------------------------------------------------------

class SubscribeTests(SynchronousTestCase):
    def setUp(self):
        self.m, self.clock = make_manager()

    def test_new_subscription(self):
        r = new(self.m)
        self.assertTrue(r.new)
        self.assertEqual(r.timeout, 1800)
        self.assertEqual(r.headers, {"SID": r.subscription.sid, "TIMEOUT": "Second-1800"})
        self.assertEqual(r.subscription.callbacks, (CB,))
        self.assertEqual(r.subscription.caller, CP)
        self.assertEqual(r.subscription.expires, 1000 + 1800)

    def test_real_sids_are_random_uuids(self):
        m = gena.SubscriptionManager(services()[0], task.Clock())
        a, b = new(m).subscription.sid, new(m).subscription.sid
        self.assertNotEqual(a, b)
        for sid in (a, b):
            self.assertTrue(sid.startswith("uuid:"))
            self.assertEqual(uuid.UUID(sid[5:]).version, 4)

    def test_timeouts(self):
        cases = {None: 1800, "Second-3600": 3600, "second-2000": 2000, "Second-1": 300,
                 "Second-999999999999": 86400, "Second-infinite": 1800, "infinite": 1800,
                 "Second-": 1800, "Second--5": 1800, "Second-1e3": 1800, "junk": 1800,
                 " Second-600 ": 600}
        for value, granted in cases.items():
            self.assertEqual(new(self.m, timeout=value).timeout, granted, value)
        # never "infinite" in an answer
        self.assertNotIn("infinite", new(self.m, timeout="Second-infinite").headers["TIMEOUT"])

    def test_several_callbacks_and_caller_as_text(self):
        r = new(self.m, caller="192.168.1.10",
                callback="<http://192.168.1.10:5000/a> <http://192.168.1.10/b?x=1><http://192.168.1.10:80/>")
        self.assertEqual(r.subscription.callbacks,
                         ("http://192.168.1.10:5000/a", "http://192.168.1.10/b?x=1",
                          "http://192.168.1.10:80/"))

    def test_ipv4_mapped_caller(self):
        r = new(self.m, caller=ipaddress.IPv6Address("::ffff:192.168.1.10"))
        self.assertEqual(r.subscription.caller, CP)

    def test_ipv6_caller(self):
        cp6 = ipaddress.IPv6Address("fd00::10")
        self.assertTrue(new(self.m, caller=cp6, callback="<http://[fd00::10]:4004/e>").new)
        with self.assertRaises(gena.GenaError):
            new(self.m, caller=cp6, callback="<http://fd00::10:4004/e>")

    def assertStatus(self, status, fn, *args, **kw):
        with self.assertRaises(gena.GenaError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.status, status, (args, kw))

    def test_412_bad_callbacks(self):
        """R15 anti-CallStranger: only http:// to the subscriber's own literal address."""
        bad = [
            None, "", "http://192.168.1.10/", "<>", "<http://192.168.1.10/", "x<http://192.168.1.10/>",
            "<http://192.168.1.11/>",  # another host on the same LAN
            "<http://192.168.1.10/ok><http://192.168.1.11/>",  # one bad URL spoils the lot
            "<https://192.168.1.10/>", "<ftp://192.168.1.10/>", "<192.168.1.10:80/>",
            "<http://localhost/>", "<http://cp.lan/>", "<http://127.0.0.1/>",
            "<http://203.0.113.5/>",  # the Internet
            "<http://user@192.168.1.10/>", "<http://192.168.1.10@203.0.113.5/>",
            "<http://192.168.1.10:99999/>", "<http://192.168.1.10:0/>", "<http://192.168.1.10:x/>",
            "<http://192.168.001.010/>", "<http://3232235786/>", "<http://0xc0a8010a/>",
            "<http://[::ffff:192.168.1.10]/>", "<http://192.168.1.10/#f>",
            "<http://192.168.1.10/a b>", "<http://192.168.1.10/\u00e9>",
            "<http://192.168.1.10/" + "a" * 600 + ">",
            "".join(f"<http://192.168.1.10/{i}>" for i in range(5)),
        ]
        for callback in bad:
            self.assertStatus(412, new, self.m, callback=callback)
        self.assertStatus(412, self.m.subscribe, CP, {"nt": "upnp:event"})
        self.assertEqual(self.m.subscriptions(), [])

    def test_412_bad_nt(self):
        for nt in (None, "", "upnp:propchange", "UPNP:EVENT x"):
            headers = {"callback": f"<{CB}>"}
            if nt is not None:
                headers["nt"] = nt
            self.assertStatus(412, self.m.subscribe, CP, headers)

    def test_400_sid_with_nt_or_callback(self):
        sid = new(self.m).subscription.sid
        self.assertStatus(400, self.m.subscribe, CP, {"sid": sid, "nt": "upnp:event"})
        self.assertStatus(400, self.m.subscribe, CP, {"sid": sid, "callback": f"<{CB}>"})
        self.assertStatus(400, self.m.unsubscribe, CP, {"sid": sid, "nt": "upnp:event"})
        self.assertStatus(400, self.m.unsubscribe, CP, {"sid": sid, "callback": f"<{CB}>"})
        self.assertIsNotNone(self.m.get(sid))

    def test_renew(self):
        sub = new(self.m).subscription
        self.clock.advance(1000)
        r = self.m.subscribe(CP, {"sid": sub.sid, "timeout": "Second-600"})
        self.assertFalse(r.new)
        self.assertIs(r.subscription, sub)
        self.assertEqual(r.headers, {"SID": sub.sid, "TIMEOUT": "Second-600"})
        self.assertEqual(sub.expires, 2000 + 600)
        self.assertEqual(self.m.subscribe(CP, {"SID": sub.sid}).timeout, 1800)  # upper-case keys too

    def test_412_crafted_and_unknown_sids(self):
        sub = new(self.m).subscription
        other, _ = make_manager(new_sid=lambda: "uuid:11111111-1111-4111-8111-111111111111")
        foreign = new(other).subscription.sid  # same tunnel layout, another manager
        for sid in ["", "uuid:", sub.sid.upper(), sub.sid + "x", sub.sid[5:], "uuid:" + "0" * 5000,
                    sub.sid.replace("uuid:", "UUID:"), foreign, "../../etc", sub.sid + "\x00"]:
            self.assertStatus(412, self.m.subscribe, CP, {"sid": sid})
            self.assertStatus(412, self.m.unsubscribe, CP, {"sid": sid})
        self.assertStatus(412, self.m.unsubscribe, CP, {})

    def test_412_sid_from_another_host(self):
        sub = new(self.m).subscription
        self.assertStatus(412, self.m.subscribe, OTHER, {"sid": sub.sid})
        self.assertStatus(412, self.m.unsubscribe, OTHER, {"sid": sub.sid})
        self.assertIsNotNone(self.m.get(sub.sid))

    def test_expiry(self):
        sub = new(self.m, timeout="Second-300").subscription
        self.clock.advance(299)
        self.assertIsNotNone(self.m.get(sub.sid))
        self.clock.advance(1)
        self.assertIsNone(self.m.get(sub.sid))
        self.assertStatus(412, self.m.subscribe, CP, {"sid": sub.sid})
        self.assertEqual(self.m.change_events({"ConnectionStatus": "Connected"}), [])

    def test_renew_keeps_alive(self):
        sub = new(self.m, timeout="Second-300").subscription
        self.clock.advance(200)
        self.m.subscribe(CP, {"sid": sub.sid, "timeout": "Second-300"})
        self.clock.advance(200)
        self.assertIsNotNone(self.m.get(sub.sid))

    def test_unsubscribe(self):
        sub = new(self.m).subscription
        self.assertIs(self.m.unsubscribe(CP, {"sid": sub.sid}), sub)
        self.assertStatus(412, self.m.unsubscribe, CP, {"sid": sub.sid})
        self.assertEqual(self.m.subscriptions(), [])

    def test_limit(self):
        m, clock = make_manager(max_subscriptions=3)
        subs = [new(m).subscription for _ in range(3)]
        self.assertStatus(503, new, m)
        m.unsubscribe(CP, {"sid": subs[0].sid})
        new(m)
        clock.advance(1800)  # all expire, the slots free up
        for _ in range(3):
            new(m)
        self.assertEqual(gena.MAX_SUBSCRIPTIONS, gena.SubscriptionManager(services()[0], clock).max_subscriptions)


# -- events and SEQ --------------------------------------------------------------

class EventTests(SynchronousTestCase):
    def test_evented_tables(self):
        ip2, common = services(2)
        ip1, _ = services(1)
        self.assertEqual(gena.evented_variables(ip2), tuple(STATE_V2))
        self.assertNotIn("SystemUpdateID", gena.evented_variables(ip1))
        self.assertEqual(gena.evented_variables(common), ("PhysicalLinkStatus",))

    def test_explicit_evented_set(self):
        m = gena.SubscriptionManager(services()[0], task.Clock(), evented=("ConnectionStatus",))
        sub = new(m).subscription
        self.assertEqual(props(m.initial_event(sub, {"ConnectionStatus": "Connected"}).body),
                         [("ConnectionStatus", "Connected")])
        self.assertEqual(m.change_events({"ExternalIPAddress": "203.0.113.8"}), [])

    def test_initial_event_all_variables_seq_0(self):
        m, _ = make_manager()
        sub = new(m).subscription
        ev = m.initial_event(sub, {**STATE_V2, "Uptime": 5})
        self.assertEqual((ev.sid, ev.seq, ev.callbacks), (sub.sid, 0, (CB,)))
        self.assertEqual(props(ev.body), [(k, str(v)) for k, v in STATE_V2.items()])
        with self.assertRaises(KeyError):
            m.initial_event(sub, {"ConnectionStatus": "Connected"})

    def test_change_events_seq_and_filter(self):
        m, _ = make_manager()
        a, b = new(m).subscription, new(m).subscription
        m.initial_event(a, STATE_V2)
        self.assertEqual(m.change_events({"Uptime": 3, "PhysicalLinkStatus": "Up"}), [])
        evs = m.change_events({"PortMappingNumberOfEntries": 1, "SystemUpdateID": 2, "Uptime": 3})
        self.assertEqual([(e.sid, e.seq) for e in evs], [(a.sid, 1), (b.sid, 0)])
        self.assertEqual(props(evs[0].body),
                         [("PortMappingNumberOfEntries", "1"), ("SystemUpdateID", "2")])
        evs = m.change_events({"ExternalIPAddress": None})
        self.assertEqual([e.seq for e in evs], [2, 1])
        self.assertEqual(props(evs[0].body), [("ExternalIPAddress", "")])

    def test_wancommon(self):
        _, common = services()
        m = gena.SubscriptionManager(common, task.Clock())
        sub = new(m).subscription
        self.assertEqual(props(m.initial_event(sub, {"PhysicalLinkStatus": "Up"}).body),
                         [("PhysicalLinkStatus", "Up")])
        self.assertEqual(len(m.change_events({"PhysicalLinkStatus": "Down", "ConnectionStatus": "x"})), 1)

    def test_seq_wraps_to_1(self):
        sub = gena.Subscription("uuid:x", CP, (CB,), 0, seq=gena.SEQ_MAX - 1)
        self.assertEqual([sub.take_seq() for _ in range(4)], [2**32 - 2, 2**32 - 1, 1, 2])

    def test_values_escaped(self):
        body = gena.propertyset({"ExternalIPAddress": "<a href='x'>&amp;</a>\"", "B": True, "C": False})
        self.assertEqual(props(body), [("ExternalIPAddress", "<a href='x'>&amp;</a>\""),
                                       ("B", "1"), ("C", "0")])
        self.assertTrue(body.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n'
                                        b'<e:propertyset xmlns:e="urn:schemas-upnp-org:event-1-0">'))


# -- the HTTP resource -------------------------------------------------------------

class FakeSender:
    def __init__(self):
        self.sent = []
        self.forgotten = []

    def send(self, manager, event, after=None):
        self.sent.append((event, after))
        return defer.succeed(True)

    def forget(self, sid):
        self.forgotten.append(sid)


class ResourceTests(SynchronousTestCase):
    def setUp(self):
        self.m, self.clock = make_manager()
        self.sender = FakeSender()
        self.subscriber = Subscriber("tun1", b"id-1")
        self.caller = Caller(self.subscriber, CP)
        self.res = EventSubResource(self.m, lambda request: self.caller, lambda: dict(STATE_V2),
                                    self.sender)

    def request(self, method, **headers):
        req = DummyRequest([b""])
        req.method = method
        for name, value in headers.items():
            req.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
        body = self.res.render(req)
        self.assertEqual(body, b"")
        self.assertEqual(req.responseHeaders.getRawHeaders(b"content-length"), [b"0"])
        self.assertEqual(req.responseHeaders.getRawHeaders(b"server"), [SERVER.encode()])
        return req

    def header(self, req, name):
        values = req.responseHeaders.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    def test_subscribe_then_initial_event_after_answer(self):
        req = self.request(b"SUBSCRIBE", NT="upnp:event", CALLBACK=f"<{CB}>", TIMEOUT="Second-1800")
        self.assertEqual(req.responseCode, 200)
        sid = self.header(req, "sid")
        self.assertEqual(self.header(req, "timeout"), "Second-1800")
        [(event, after)] = self.sender.sent
        self.assertEqual((event.sid, event.seq), (sid, 0))
        self.assertEqual(len(props(event.body)), 5)
        fired = []
        after.addCallback(fired.append)
        self.assertEqual(fired, [])  # held until the answer is written
        req.finish()
        self.assertEqual(fired, [None])

    def test_renew_and_unsubscribe(self):
        sid = self.header(self.request(b"SUBSCRIBE", NT="upnp:event", CALLBACK=f"<{CB}>"), "sid")
        req = self.request(b"SUBSCRIBE", SID=sid, TIMEOUT="Second-900")
        self.assertEqual((req.responseCode, self.header(req, "sid"), self.header(req, "timeout")),
                         (200, sid, "Second-900"))
        self.assertEqual(len(self.sender.sent), 1)  # no initial event on renewal
        req = self.request(b"UNSUBSCRIBE", SID=sid)
        self.assertEqual(req.responseCode, 200)
        self.assertEqual(self.sender.forgotten, [sid])
        self.assertEqual(self.request(b"UNSUBSCRIBE", SID=sid).responseCode, 412)

    def test_errors(self):
        sid = self.header(self.request(b"SUBSCRIBE", NT="upnp:event", CALLBACK=f"<{CB}>"), "sid")
        cases = [
            (400, b"SUBSCRIBE", dict(SID=sid, NT="upnp:event")),
            (400, b"SUBSCRIBE", dict(SID=sid, CALLBACK=f"<{CB}>")),
            (400, b"UNSUBSCRIBE", dict(SID=sid, NT="upnp:event")),
            (412, b"SUBSCRIBE", dict(NT="upnp:event")),
            (412, b"SUBSCRIBE", dict(NT="upnp:event", CALLBACK="<http://192.168.1.99/>")),
            (412, b"SUBSCRIBE", dict(NT="upnp:propchange", CALLBACK=f"<{CB}>")),
            (412, b"SUBSCRIBE", dict(SID="uuid:" + "f" * 36)),
            (412, b"UNSUBSCRIBE", {}),
        ]
        for status, method, headers in cases:
            req = self.request(method, **headers)
            self.assertEqual(req.responseCode, status, (method, headers))
            self.assertIsNone(self.header(req, "sid"))
        self.assertEqual(len(self.sender.sent), 1)

    def test_duplicate_gena_headers_400(self):
        req = DummyRequest([b""])
        req.method = b"SUBSCRIBE"
        req.requestHeaders.setRawHeaders(b"callback", [f"<{CB}>".encode(), b"<http://192.168.1.99/>"])
        req.requestHeaders.setRawHeaders(b"nt", [b"upnp:event"])
        self.res.render(req)
        self.assertEqual(req.responseCode, 400)

    def test_other_methods_405(self):
        for method in (b"GET", b"POST", b"NOTIFY", b"HEAD"):
            req = self.request(method)
            self.assertEqual(req.responseCode, 405)
            self.assertEqual(self.header(req, "allow"), "SUBSCRIBE, UNSUBSCRIBE")

    def test_not_from_a_tunnel_403(self):
        self.caller = None
        self.assertEqual(self.request(b"SUBSCRIBE", NT="upnp:event", CALLBACK=f"<{CB}>").responseCode, 403)

    def test_state_failure_500_and_no_subscription(self):
        def broken():
            raise RuntimeError("no state")

        self.res.state = broken
        req = self.request(b"SUBSCRIBE", NT="upnp:event", CALLBACK=f"<{CB}>")
        self.assertEqual(req.responseCode, 500)
        self.assertEqual(self.m.subscriptions(), [])
        self.flushLoggedErrors(RuntimeError)


# -- the NOTIFY sender ---------------------------------------------------------------

class ConnectionLost(Exception):
    pass


class FakeResponse:
    def __init__(self, code):
        self.code = code
        self.phrase = b"OK"
        self.length = 0

    def deliverBody(self, protocol):
        from twisted.web.client import ResponseDone

        protocol.makeConnection(None)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    def __init__(self):
        self.requests = []  # (method, url, headers, body bytes, deferred)

    def request(self, method, uri, headers=None, bodyProducer=None):
        chunks = []

        class Consumer:
            def write(self, data):
                chunks.append(data)

        bodyProducer.startProducing(Consumer())
        d = defer.Deferred()
        self.requests.append((method, uri.decode(), headers, b"".join(chunks), d))
        return d

    def answer(self, code=200, index=0):
        *_, d = self.requests.pop(index)
        d.callback(FakeResponse(code))

    def fail(self, index=0):
        *_, d = self.requests.pop(index)
        d.errback(ConnectionRefusedError())


class SenderTests(SynchronousTestCase):
    def setUp(self):
        self.m, self.clock = make_manager()
        self.agent = FakeAgent()
        self.sender = NotifySender(self.clock, self.agent, timeout=30)

    def test_headers_and_body(self):
        sub = new(self.m).subscription
        event = self.m.initial_event(sub, STATE_V2)
        done = self.sender.send(self.m, event)
        [(method, url, headers, body, _)] = self.agent.requests
        self.assertEqual((method, url), (b"NOTIFY", CB))
        h = {k.decode().lower(): [x.decode() for x in v] for k, v in headers.getAllRawHeaders()}
        self.assertEqual(h, {"content-type": ['text/xml; charset="utf-8"'], "nt": ["upnp:event"],
                             "nts": ["upnp:propchange"], "sid": [sub.sid], "seq": ["0"]})
        self.assertEqual(body, event.body)
        self.agent.answer(200)
        self.assertEqual(self.successResultOf(done), True)
        self.assertEqual(self.sender.counters["notify_ok"], 1)

    def test_one_in_flight_in_order(self):
        sub = new(self.m).subscription
        d0 = self.sender.send(self.m, self.m.initial_event(sub, STATE_V2))
        publish(self.m, self.sender, {"PortMappingNumberOfEntries": 1})
        publish(self.m, self.sender, {"PortMappingNumberOfEntries": 2})
        self.assertEqual(len(self.agent.requests), 1)
        seqs = []
        for _ in range(3):
            [(_, _, headers, _, _)] = self.agent.requests
            seqs.append(int(headers.getRawHeaders(b"seq")[0]))
            self.agent.answer(200)
        self.assertEqual(seqs, [0, 1, 2])
        self.assertTrue(self.successResultOf(d0))

    def test_initial_event_waits_for_gate(self):
        sub = new(self.m).subscription
        gate = defer.Deferred()
        self.sender.send(self.m, self.m.initial_event(sub, STATE_V2), after=gate)
        publish(self.m, self.sender, {"ConnectionStatus": "Connected"})
        self.assertEqual(self.agent.requests, [])
        gate.errback(ConnectionLost())  # the answer was lost: send anyway
        self.assertEqual(self.agent.requests[0][2].getRawHeaders(b"seq"), [b"0"])

    def test_next_url_on_failure(self):
        r = new(self.m, callback="<http://192.168.1.10:1/a><http://192.168.1.10:2/b>")
        done = self.sender.send(self.m, self.m.initial_event(r.subscription, STATE_V2))
        self.assertEqual(self.agent.requests[0][1], "http://192.168.1.10:1/a")
        self.agent.fail()
        self.assertEqual(self.agent.requests[0][1], "http://192.168.1.10:2/b")
        self.agent.answer(200)
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(r.subscription.failures, 0)

    def test_non_2xx_and_timeout_are_failures(self):
        r = new(self.m, callback="<http://192.168.1.10:1/a><http://192.168.1.10:2/b>")
        done = self.sender.send(self.m, self.m.initial_event(r.subscription, STATE_V2))
        self.agent.answer(412)
        self.clock.advance(30)  # the second URL never answers
        self.assertFalse(self.successResultOf(done))
        self.assertEqual(r.subscription.failures, 1)
        self.assertEqual(self.sender.counters["notify_url_failed"], 2)

    def test_dropped_after_repeated_failures(self):
        sub = new(self.m).subscription
        results = [self.sender.send(self.m, self.m.initial_event(sub, STATE_V2))]
        for n in range(4):
            results += publish(self.m, self.sender, {"SystemUpdateID": n})
        for _ in range(3):
            self.agent.fail()
        self.assertIsNone(self.m.get(sub.sid))
        self.assertEqual(self.agent.requests, [])
        self.assertEqual([self.successResultOf(d) for d in results], [False] * 5)
        self.assertEqual(self.sender.counters["dropped_subscription"], 1)
        self.assertEqual(publish(self.m, self.sender, {"SystemUpdateID": 9}), [])

    def test_success_resets_failures(self):
        sub = new(self.m).subscription
        self.sender.send(self.m, self.m.initial_event(sub, STATE_V2))
        self.agent.fail()
        self.assertEqual(sub.failures, 1)
        publish(self.m, self.sender, {"SystemUpdateID": 1})
        self.agent.answer(200)
        self.assertEqual(sub.failures, 0)

    def test_queue_bound(self):
        sender = NotifySender(self.clock, self.agent, max_queue=2)
        sub = new(self.m).subscription
        results = [sender.send(self.m, self.m.initial_event(sub, STATE_V2))]
        results += publish(self.m, sender, {"SystemUpdateID": 1})
        results += publish(self.m, sender, {"SystemUpdateID": 2})
        self.assertFalse(self.successResultOf(results[2]))
        self.assertEqual(sender.counters["dropped_queue_full"], 1)

    def test_unsubscribed_events_not_sent(self):
        sub = new(self.m).subscription
        self.sender.send(self.m, self.m.initial_event(sub, STATE_V2))
        later = publish(self.m, self.sender, {"SystemUpdateID": 1})
        self.m.unsubscribe(CP, {"sid": sub.sid})
        self.sender.forget(sub.sid)
        self.assertFalse(self.successResultOf(later[0]))
        self.agent.answer(200)
        self.assertEqual(self.agent.requests, [])

    def test_default_agent_binds(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import Agent

        sender = NotifySender(MemoryReactorClock(), bind_address="192.168.1.1")
        self.assertIsInstance(sender.agent, Agent)


# -- end to end over loopback ---------------------------------------------------------

class _Collector(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []
        self.received = []

    def render_NOTIFY(self, request):
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((request.path.decode(), headers, request.content.read()))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        return b""

    def next(self, n):
        d = defer.Deferred()
        self.waiting.append(d)
        return d if len(self.received) < n else defer.succeed(None)


class _RawClient(Protocol):
    def __init__(self, data):
        self.data = data
        self.chunks = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


class EndToEndTests(TestCase):
    """SUBSCRIBE with raw bytes; a tiny twisted.web server gets SEQ 0 then SEQ 1."""

    timeout = 20

    @defer.inlineCallbacks
    def raw(self, reactor, port, data):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        proto = _RawClient(data)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
        response = yield proto.done
        head = response.decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return head[0], headers

    @defer.inlineCallbacks
    def test_subscribe_notify_unsubscribe(self):
        from twisted.internet import reactor

        collector = _Collector()
        cb_port = reactor.listenTCP(0, Site(collector), interface="127.0.0.1")
        self.addCleanup(cb_port.stopListening)

        service, _ = services(2)
        manager = gena.SubscriptionManager(service, reactor)
        sender = NotifySender(reactor, timeout=5)
        state = dict(STATE_V2)
        subscriber = Subscriber("tun1", b"id-1")

        def caller_for(request):
            return Caller(subscriber, ipaddress.ip_address(request.getClientAddress().host))

        root = Resource()
        root.putChild(b"evt", Resource())
        root.children[b"evt"].putChild(b"IPConn", EventSubResource(manager, caller_for, lambda: state, sender))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        http_port = port.getHost().port
        callback = f"http://127.0.0.1:{cb_port.getHost().port}/cb/ipconn"

        status, headers = yield self.raw(reactor, http_port, (
            f"SUBSCRIBE /evt/IPConn HTTP/1.1\r\nHOST: 127.0.0.1:{http_port}\r\n"
            f"CALLBACK: <{callback}>\r\nNT: upnp:event\r\nTIMEOUT: Second-1800\r\n"
            "Connection: close\r\n\r\n").encode())
        self.assertEqual(status, "HTTP/1.1 200 OK")
        sid = headers["sid"]
        self.assertTrue(sid.startswith("uuid:"))
        self.assertEqual(headers["timeout"], "Second-1800")
        self.assertEqual(headers["content-length"], "0")
        self.assertEqual(headers["server"], SERVER)

        yield collector.next(1)
        path, h, body = collector.received[0]
        self.assertEqual(path, "/cb/ipconn")
        self.assertEqual((h["nt"], h["nts"], h["sid"], h["seq"]), ("upnp:event", "upnp:propchange", sid, "0"))
        self.assertEqual(h["content-type"], 'text/xml; charset="utf-8"')
        self.assertEqual(int(h["content-length"]), len(body))
        self.assertEqual(props(body), [(k, str(v)) for k, v in STATE_V2.items()])

        state.update(PortMappingNumberOfEntries=1, SystemUpdateID=2)
        delivered = publish(manager, sender, {"PortMappingNumberOfEntries": 1, "SystemUpdateID": 2})
        yield collector.next(2)
        self.assertEqual(collector.received[1][1]["seq"], "1")
        self.assertEqual(props(collector.received[1][2]),
                         [("PortMappingNumberOfEntries", "1"), ("SystemUpdateID", "2")])
        self.assertEqual((yield defer.gatherResults(delivered)), [True])

        status, _ = yield self.raw(reactor, http_port, (
            "GET /evt/IPConn HTTP/1.1\r\nHOST: 127.0.0.1\r\nConnection: close\r\n\r\n").encode())
        self.assertEqual(status, "HTTP/1.1 405 Method Not Allowed")
        status, _ = yield self.raw(reactor, http_port, (
            f"UNSUBSCRIBE /evt/IPConn HTTP/1.1\r\nHOST: 127.0.0.1\r\nSID: {sid}\r\n"
            "Connection: close\r\n\r\n").encode())
        self.assertEqual(status, "HTTP/1.1 200 OK")
        self.assertEqual(publish(manager, sender, {"ConnectionStatus": "Disconnected"}), [])
