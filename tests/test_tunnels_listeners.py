"""Device-bound sockets with identical addresses on two tunnels (real veth, root needed).

Two root-namespace veth ends both carry 10.77.0.1/24; behind each, a
subscriber namespace is 10.77.0.10.  A TCP listener bound to each device
must see only its own subscriber, SSDP multicast must arrive on the right
socket and be answered through the same tunnel, and an outgoing connection
bound to tunnel 2 must reach subscriber 2, although the main routing table
would send it by tunnel 1.
"""

import socket
import subprocess

from twisted.internet import defer, protocol, reactor, threads
from twisted.trial.unittest import TestCase

from igdpcp.tunnels.listeners import DeviceTCPClientEndpoint, DeviceUDPPort, listen_tcp
from igdpcp.tunnels.shared_ssdp import SharedSSDPPort

from . import netlab

SEARCH = (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\n"
          b"MX: 1\r\nST: ssdp:all\r\n\r\n")


class Tagger(protocol.Protocol):
    """Answers every connection with its tunnel's tag and the peer address."""

    def connectionMade(self):
        peer = self.transport.getPeer().host
        self.transport.write(f"{self.factory.tag} {peer}\n".encode())
        self.transport.loseConnection()


class SSDPEcho(protocol.DatagramProtocol):
    def __init__(self, tag):
        self.tag = tag
        self.seen = []

    def datagramReceived(self, data, addr):
        self.seen.append(addr)
        self.transport.write(f"HTTP/1.1 200 OK\r\nX-TUNNEL: {self.tag}\r\n\r\n".encode(), addr)


class Collect(protocol.Protocol):
    def connectionMade(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.factory.done.callback(self.data)


class TwoTunnels(TestCase):
    """Two root-namespace tunnels with the same address, a subscriber behind each."""

    prefix = "ltn"

    @classmethod
    def setUpClass(cls):
        netlab.skip_unless_netns("python3")
        cls.lab = lab = netlab.Lab(cls.prefix)
        try:
            cls.devices, cls.subs = [], []
            for i in (1, 2):
                ns = lab.netns(f"s{i}")
                dev = lab.root_ifname(f"t{i}")
                lab.veth((None, dev, "10.77.0.1/24"), (ns, "eth0", "10.77.0.10/24"))
                lab.ip("route", "add", "default", "via", "10.77.0.1", ns=ns)
                cls.devices.append(dev)
                cls.subs.append(ns)
        except BaseException:
            lab.teardown()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.lab.teardown()

    def in_ns(self, ns, code):
        return subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code],
                              capture_output=True, text=True, timeout=20)


class OverlappingTunnelTests(TwoTunnels):

    def test_tcp_listeners_see_only_their_tunnel(self):
        ports = []
        for i, dev in enumerate(self.devices, 1):
            factory = protocol.Factory.forProtocol(Tagger)
            factory.tag = f"tunnel{i}"
            ports.append(listen_tcp(reactor, 0 if not ports else ports[0].getHost().port,
                                    factory, device=dev, interface="10.77.0.1"))
        for p in ports:
            self.addCleanup(p.stopListening)
        port = ports[0].getHost().port
        code = (f"import socket; s=socket.create_connection(('10.77.0.1', {port}), 3); "
                "print(s.recv(100).decode().strip())")

        def both():
            return [self.in_ns(ns, code).stdout.strip() for ns in self.subs]

        d = threads.deferToThread(both)

        def check(answers):
            self.assertEqual(answers, ["tunnel1 10.77.0.10", "tunnel2 10.77.0.10"])
        return d.addCallback(check)

    def test_ssdp_multicast_answered_through_its_tunnel(self):
        echoes = []
        for i, dev in enumerate(self.devices, 1):
            echo = SSDPEcho(f"tunnel{i}")
            port = DeviceUDPPort(1900, echo, device=dev, group="239.255.255.250", reactor=reactor)
            port.startListening()
            self.addCleanup(port.stopListening)
            echoes.append(echo)
        code = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
                "s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2); "
                f"s.sendto({SEARCH!r}, ('239.255.255.250', 1900)); print(s.recv(200).decode())")

        def search():
            return [self.in_ns(ns, code).stdout for ns in self.subs]

        d = threads.deferToThread(search)

        def check(answers):
            self.assertIn("X-TUNNEL: tunnel1", answers[0])
            self.assertIn("X-TUNNEL: tunnel2", answers[1])
            self.assertEqual([len(e.seen) for e in echoes], [1, 1])
        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_outgoing_connection_leaves_by_its_tunnel(self):
        # A listener in subscriber 2 only; the main table would route 10.77.0.10 via tunnel 1.
        server = self.lab.spawn(self.subs[1], ["python3", "-c", (
            "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('10.77.0.10', 18765)); s.listen(); c, a = s.accept(); c.sendall(b'subscriber2'); c.close()")],
            name="listener")
        self.lab.wait_listening(self.subs[1], 18765, "tcp", proc=server)
        factory = protocol.Factory.forProtocol(Collect)
        factory.done = defer.Deferred()
        endpoint = DeviceTCPClientEndpoint(reactor, "10.77.0.10", 18765, self.devices[1], timeout=3)
        yield endpoint.connect(factory)
        data = yield factory.done
        self.assertEqual(data, b"subscriber2")
        # Bound to tunnel 1, the same address is subscriber 1, where nothing listens.
        endpoint = DeviceTCPClientEndpoint(reactor, "10.77.0.10", 18765, self.devices[0], timeout=3)
        with self.assertRaises(Exception):
            yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))


# A subscriber that listens for SSDP NOTIFYs on its LAN for a while and prints what came.
_NOTIFY_LISTENER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 1900))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4si", socket.inet_aton("239.255.255.250"), bytes(4), socket.if_nametoindex("eth0")))
s.settimeout(0.2)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        print(s.recv(500).decode().split("\\r\\n")[1], flush=True)
    except socket.timeout:
        pass
"""


class SharedSSDPSocketTests(TwoTunnels):
    """igd.ssdp_socket = "shared": one socket, tunnels told apart by IP_PKTINFO."""

    prefix = "lsh"

    def setUp(self):
        self.shared = SharedSSDPPort(reactor)
        self.shared.startListening()
        self.addCleanup(self.shared.stopListening)
        self.echoes = []
        for i, dev in enumerate(self.devices, 1):
            echo = SSDPEcho(f"tunnel{i}")
            self.shared.attach(echo, socket.if_nametoindex(dev))
            self.echoes.append(echo)

    def search(self, host: str):
        code = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
                "s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2); "
                f"s.sendto({SEARCH!r}, ({host!r}, 1900)); print(s.recv(200).decode())")
        return threads.deferToThread(lambda: [self.in_ns(ns, code).stdout for ns in self.subs])

    def test_ssdp_multicast_answered_through_its_tunnel(self):
        def check(answers):
            self.assertIn("X-TUNNEL: tunnel1", answers[0])
            self.assertIn("X-TUNNEL: tunnel2", answers[1])
            self.assertEqual([len(e.seen) for e in self.echoes], [1, 1])
            self.assertEqual(self.shared.counters["no_tunnel"], 0)
        return self.search("239.255.255.250").addCallback(check)

    def test_unicast_search_answered_through_its_tunnel(self):
        def check(answers):
            self.assertIn("X-TUNNEL: tunnel1", answers[0])
            self.assertIn("X-TUNNEL: tunnel2", answers[1])
        return self.search("10.77.0.1").addCallback(check)

    @defer.inlineCallbacks
    def test_detached_tunnel_hears_nothing(self):
        tunnel2 = self.shared.tunnels[socket.if_nametoindex(self.devices[1])]
        tunnel2.transport.stopListening()
        answers = yield self.search("239.255.255.250")
        self.assertIn("X-TUNNEL: tunnel1", answers[0])
        self.assertEqual(answers[1], "")
        self.assertEqual([len(e.seen) for e in self.echoes], [1, 0])

    @defer.inlineCallbacks
    def test_notify_leaves_by_its_tunnel_only(self):
        listeners = [self.lab.spawn(ns, ["python3", "-c", _NOTIFY_LISTENER, "3"], name=f"notify-{ns}")
                     for ns in self.subs]
        for ns, proc in zip(self.subs, listeners):
            self.lab.wait_listening(ns, 1900, "udp", proc=proc)
        for i, echo in enumerate(self.echoes, 1):
            echo.transport.write(f"NOTIFY * HTTP/1.1\r\nX-FROM: tunnel{i}\r\n\r\n".encode(),
                                 ("239.255.255.250", 1900))
        yield threads.deferToThread(lambda: [p.popen.wait(10) for p in listeners])
        self.assertEqual([p.log().split() for p in listeners],
                         [["X-FROM:", "tunnel1"], ["X-FROM:", "tunnel2"]])
