"""The lab CGN's adapters: UDP protocol, operator view, config, twistd.

In-memory tests use a Clock and a fake transport; one test runs the server
and the operator view on real loopback sockets; one runs ``twistd``.
"""

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from ipaddress import IPv4Address, IPv4Network

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from igdpcp.pcp import tpid
from igdpcp.pcp.codec import (
    MapBody,
    Request,
    ThirdParty,
    ThirdPartyId,
    decode_response,
    encode_request,
)
from igdpcp.pcp.constants import Opcode, ResultCode
from igdpcp.pcplab import config as cfg
from igdpcp.pcplab.admin import AdminRoot, make_site
from igdpcp.pcplab.cgn import LabCGN
from igdpcp.pcplab.server import PCPLabServer, announce_delays
from igdpcp.pcplab.tap import Options, makeService

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = ("10.200.0.2", 40000)
VNI = tpid.vxlan_vni(1001)


def map_request(client=CLIENT[0], lifetime=3600, internal_port=8080, nonce=b"n" * 12):
    return encode_request(Request(
        Opcode.MAP, lifetime, IPv4Address(client),
        MapBody(nonce, 6, internal_port, 0, IPv4Address("0.0.0.0")),
        (ThirdParty(IPv4Address("192.168.1.10")), ThirdPartyId(VNI)),
    ))


class FakeTransport:
    def __init__(self):
        self.written = []

    def write(self, data, addr):
        self.written.append((data, addr))


class AdapterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(5000)
        self.cgn = LabCGN(cfg.CGNConfig(), self.clock.seconds(), random.Random(1))
        self.server = PCPLabServer(self.cgn, self.clock, sweep_interval=10)
        self.transport = FakeTransport()
        self.server.makeConnection(self.transport)

    def tearDown(self):
        if self.server.numPorts:
            self.server.doStop()

    def test_answers_to_source(self):
        self.server.datagramReceived(map_request(), CLIENT)
        [(data, addr)] = self.transport.written
        self.assertEqual(addr, CLIENT)
        self.assertEqual(decode_response(data).result, ResultCode.SUCCESS)

    def test_silent_drops_everything(self):
        self.server.set_silent(True)
        self.server.datagramReceived(map_request(), CLIENT)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(self.cgn.counters["dropped.silent"], 1)
        self.server.set_silent(False)
        self.server.datagramReceived(map_request(), CLIENT)
        self.assertEqual(len(self.transport.written), 1)

    def test_announce_schedule_after_reboot(self):
        self.server.datagramReceived(map_request(), CLIENT)
        self.server.datagramReceived(map_request(), ("10.200.0.3", 41000))  # ADDRESS_MISMATCH, known
        self.transport.written.clear()
        self.clock.advance(100)
        self.assertEqual(self.server.reboot(), [0.0, 0.25, 0.75])
        self.assertEqual(len(self.cgn), 0)
        sent_at = []
        for step in [0, 0.2, 0.05, 0.5, 10]:
            before = len(self.transport.written)
            self.clock.advance(step)
            sent_at += [self.clock.seconds()] * ((len(self.transport.written) - before) // 2)
        reboot_at = 5100
        self.assertEqual([t - reboot_at for t in sent_at], [0, 0.25, 0.75])
        targets = {addr for _, addr in self.transport.written}
        self.assertEqual(targets, {CLIENT, ("10.200.0.3", 41000)})
        for data, _ in self.transport.written:
            r = decode_response(data)
            self.assertEqual((r.opcode, r.result, r.lifetime, r.epoch), (Opcode.ANNOUNCE, 0, 0, 0))

    def test_announce_delays_double(self):
        self.assertEqual(announce_delays(5), [0, 0.25, 0.75, 1.75, 3.75])
        self.assertEqual(announce_delays(0), [])

    def test_no_announce_while_silent_and_reboot_restarts_schedule(self):
        self.server.datagramReceived(map_request(), CLIENT)
        self.transport.written.clear()
        self.server.set_silent(True)
        self.server.reboot()
        self.clock.advance(1)
        self.assertEqual(self.transport.written, [])
        self.server.set_silent(False)
        self.server.reboot()
        self.server.reboot()  # the second cancels the first's pending sends
        self.clock.advance(5)
        self.assertEqual(len(self.transport.written), 3)

    def test_stop_cancels_announces(self):
        self.server.datagramReceived(map_request(), CLIENT)
        self.server.reboot()
        self.server.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_periodic_sweep(self):
        self.server.datagramReceived(map_request(lifetime=120), CLIENT)
        self.assertEqual(len(self.cgn), 1)
        self.clock.advance(125)  # the LoopingCall runs every 10 s
        self.assertEqual(len(self.cgn), 0)
        self.assertEqual(self.cgn.counters["expired"], 1)


class AdminResourceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.server = PCPLabServer(LabCGN(cfg.CGNConfig(), 0.0), self.clock)
        self.server.makeConnection(FakeTransport())
        self.root = AdminRoot(self.server)

    def call(self, method, path, args=None, body=b""):
        request = DummyRequest(path.strip("/").encode().split(b"/"))
        request.method = method.encode()
        request.args = args or {}
        request.content = io.BytesIO(body)
        resource = self.root.getChildWithDefault(request.postpath[0], request)
        result = resource.render(request)
        return request.responseCode or 200, json.loads(result)

    def test_silent_switch(self):
        self.assertEqual(self.call("POST", "/silent", {b"on": [b"1"]}), (200, {"silent": True}))
        self.assertEqual(self.call("POST", "/silent", body=b"on=0"), (200, {"silent": False}))
        self.assertEqual(self.call("POST", "/silent", body=b'{"on": true}'), (200, {"silent": True}))
        status, value = self.call("POST", "/silent", {b"on": [b"maybe"]})
        self.assertEqual(status, 400)
        self.assertIn("on must be", value["error"])
        self.assertEqual(self.call("POST", "/silent", body=b"{oops")[0], 400)

    def test_wrong_method_and_path(self):
        status, value = self.call("GET", "/reboot")
        self.assertEqual(status, 405)
        self.assertIn("POST", value["error"])
        self.assertEqual(self.call("GET", "/nothing")[0], 404)

    def test_stats(self):
        self.server.datagramReceived(map_request(), CLIENT)
        status, value = self.call("GET", "/stats")
        self.assertEqual(value["counters"]["result.SUCCESS"], 1)
        self.assertEqual((value["epoch"], value["mappings"], value["silent"]), (0, 1, False))


class RealSocketTests(TestCase):
    """The server and operator view on loopback; a client on a real UDP socket."""

    timeout = 20

    @defer.inlineCallbacks
    def test_map_then_view_then_reboot(self):
        cgn = LabCGN(cfg.CGNConfig(), reactor.seconds())
        server = PCPLabServer(cgn, reactor)
        udp = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        http = reactor.listenTCP(0, make_site(server), interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        base = f"http://127.0.0.1:{http.getHost().port}".encode()

        client = _Client()
        client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(client_port.stopListening)
        client.transport.write(map_request("127.0.0.1"), ("127.0.0.1", udp.getHost().port))
        answer = decode_response((yield client.next()))
        self.assertEqual(answer.result, ResultCode.SUCCESS)

        agent = Agent(reactor)
        self.addCleanup(_close_pool, agent)
        rows = yield _json(agent, b"GET", base + b"/mappings")
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["third_party_id"], VNI.hex())
        self.assertEqual(rows[0]["external_port"], answer.body.external_port)

        reply = yield _json(agent, b"POST", base + b"/reboot")
        self.assertEqual(reply["epoch"], 0)
        announce = decode_response((yield client.next()))
        self.assertEqual((announce.opcode, announce.result), (Opcode.ANNOUNCE, ResultCode.SUCCESS))
        self.assertEqual((yield _json(agent, b"GET", base + b"/mappings")), [])
        # The rest of the schedule (section 14.1.3): three in all, from the server port.
        for _ in range(2):
            self.assertEqual(decode_response((yield client.next())).opcode, Opcode.ANNOUNCE)
        self.assertEqual(client.sources, {("127.0.0.1", udp.getHost().port)})


class _Client(DatagramProtocol):
    def __init__(self):
        self.received = []
        self.waiting = []
        self.sources = set()

    def datagramReceived(self, data, addr):
        self.sources.add(addr)
        if self.waiting:
            self.waiting.pop(0).callback(data)
        else:
            self.received.append(data)

    def next(self):
        if self.received:
            return defer.succeed(self.received.pop(0))
        d = defer.Deferred()
        self.waiting.append(d)
        return d


@defer.inlineCallbacks
def _json(agent, method, url):
    response = yield agent.request(method, url, Headers({}))
    body = yield readBody(response)
    assert response.code == 200, (response.code, body)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return json.loads(body)


def _close_pool(agent):
    return agent._pool.closeCachedConnections()


def write_temp(case, text):
    """A file with ``text`` in a fresh directory outside the repo, removed after ``case``."""
    directory = tempfile.mkdtemp(prefix="pcplab-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "pcplab.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class ConfigTests(SynchronousTestCase):
    def write(self, text):
        return write_temp(self, text)

    def assertBad(self, text, key, *words):
        with self.assertRaises(cfg.ConfigError) as e:
            cfg.load(self.write(text))
        message = str(e.exception)
        self.assertTrue(message.startswith(key + ":"), message)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)

    def test_defaults(self):
        c = cfg.load(None)
        self.assertEqual((c.listen, c.port, c.admin), ("0.0.0.0", 5351, "127.0.0.1:5380"))
        self.assertEqual(c.pool, (IPv4Network("5.5.5.0/29"),))
        self.assertEqual(len(c.pool_addresses()), 6)
        self.assertEqual((c.port_range, c.min_lifetime, c.max_lifetime), ((1024, 65535), 120, 3600))
        self.assertEqual((c.quota, c.announce_count, c.max_filters), (0, 3, 4))
        self.assertEqual(c.warnings, ())

    def test_full_file(self):
        c = cfg.load(self.write("""
[cgn]
listen = "127.0.0.1"
port = 15351
admin = "127.0.0.1:15380"
pool = ["5.5.5.5", "6.6.6.0/30"]
port_range = "2000-2999"
min_lifetime = 60
max_lifetime = 7200
quota = 16
known_third_party_ids = ["vxlan:1001", "hex:0a0b", "text:sub-1"]
third_party_id_lengths = [3, 4]
require_third_party_id = true
third_party_id = "unsupported"
allow_third_party = false
announce_count = 5
announce_multicast = true
max_filters = 2
"""))
        self.assertEqual(c.known_third_party_ids, frozenset({VNI, b"\x0a\x0b", b"sub-1"}))
        self.assertEqual(c.port_range, (2000, 2999))
        self.assertEqual(len(c.pool_addresses()), 3)
        self.assertEqual(c.admin_endpoint, ("127.0.0.1", 15380))
        self.assertFalse(c.allow_third_party)

    def test_bad_values_name_the_key(self):
        self.assertBad('[cgn]\npool = ["5.5.5.0/29", "nonsense"]', "cgn.pool", "nonsense")
        self.assertBad("[cgn]\npool = []", "cgn.pool")
        self.assertBad('[cgn]\npool = ["10.0.0.0/8"]', "cgn.pool", "65536")
        self.assertBad("[cgn]\nport = 70000", "cgn.port", "0..65535")
        self.assertBad("[cgn]\nport = true", "cgn.port")
        self.assertBad('[cgn]\nlisten = "here"', "cgn.listen")
        self.assertBad('[cgn]\nadmin = "127.0.0.1"', "cgn.admin", "ADDR:PORT")
        self.assertBad("[cgn]\nport_range = [3000, 2000]", "cgn.port_range")
        self.assertBad("[cgn]\nmin_lifetime = 600\nmax_lifetime = 300", "cgn.min_lifetime")
        self.assertBad('[cgn]\nknown_third_party_ids = ["vxlan:1001", "vxlan:x"]',
                       "cgn.known_third_party_ids", "[1]")
        self.assertBad("[cgn]\nthird_party_id_lengths = [0]", "cgn.third_party_id_lengths")
        self.assertBad('[cgn]\nthird_party_id = "maybe"', "cgn.third_party_id", "supported")
        self.assertBad("[cgn]\nrequire_third_party_id = 1", "cgn.require_third_party_id")
        self.assertBad("[cgn]\nannounce_count = 11", "cgn.announce_count")
        self.assertBad("[cgn]\nquotas = 1", "cgn.quotas", "unknown key")
        self.assertBad("port = 1", "port", "[cgn]")

    def test_unreadable_and_invalid_toml(self):
        self.assertRaises(cfg.ConfigError, cfg.load, "/nonexistent/pcplab.toml")
        with self.assertRaises(cfg.ConfigError) as e:
            cfg.load(self.write("[cgn\n"))
        self.assertIn("not valid TOML", str(e.exception))

    def test_reserved_pool_only_warns(self):
        c = cfg.load(self.write('[cgn]\npool = ["192.168.0.0/30"]'))
        [warning] = c.warnings
        self.assertTrue(warning.startswith("cgn.pool: 192.168.0.0/30 is a reserved range"))

    def test_command_line_overrides(self):
        c = cfg.load(self.write("[cgn]\nport = 1000"), {"port": "2000", "pool": ["7.7.7.7"], "admin": "off"})
        self.assertEqual((c.port, c.pool, c.admin_endpoint), (2000, (IPv4Network("7.7.7.7/32"),), None))
        with self.assertRaises(cfg.ConfigError) as e:
            cfg.load(None, {"port": "x"})
        self.assertTrue(str(e.exception).startswith("--port:"))


class TapTests(SynchronousTestCase):
    def test_options_and_service(self):
        options = Options()
        options.parseOptions(["--port", "0", "--admin", "127.0.0.1:0", "--pool", "5.5.5.5",
                              "--pool", "6.6.6.6"])
        self.assertEqual(len(options.cgn_config.pool_addresses()), 2)
        names = [type(s).__name__ for s in makeService(options)]
        self.assertEqual(names, ["GCPolicyService", "UDPServer", "TCPServer"])
        options = Options()
        options.parseOptions(["--admin", "off"])
        self.assertEqual([type(s).__name__ for s in makeService(options)], ["GCPolicyService", "UDPServer"])

    def test_bad_config_is_one_line_exit(self):
        with self.assertRaises(SystemExit) as e:
            Options().parseOptions(["--port", "x"])
        self.assertEqual(str(e.exception.code), "pcplab: --port: expected an integer 0..65535, got 'x'")

    def test_twistd_bad_config(self):
        path = write_temp(self, "[cgn]\nmax_lifetime = -5\n")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "pcplab", "--config", path],
            capture_output=True, text=True, env=env, cwd=os.path.dirname(path),
            timeout=60,
        )
        self.assertNotEqual(proc.returncode, 0)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("cgn.max_lifetime", lines[0])
