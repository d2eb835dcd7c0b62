"""End-to-end topology for tests on real sockets, namespaces and real UPnP clients.

One :class:`Topology` is a netns ``iwf`` holding the lab CGN (``twistd pcplab``)
and igdpcp (``twistd igdpcp``), plus N subscriber netns ``s1``..``sN``, each
joined to ``iwf`` by a veth pair with IDENTICAL addressing (notes/lab.md 2)::

    netns s<i>                         netns iwf
    eth0 192.168.1.10/24  <--veth-->   tun<i> 192.168.1.1/24  igdpcp (IGD on every tun<i>)
    default via 192.168.1.1                                   pcplab PCP 127.0.0.1:5351,
                                                              admin JSON 127.0.0.1:5380

Tunnel ``tun<i>`` carries THIRD_PARTY_ID ``vxlan:<1000+i>``.  With ``link="vxlan"`` the
tunnels are real VXLAN instead (notes/lab.md 2): an underlay netns ``acc`` with bridge
``br0``, a veth ``ul0`` from ``iwf`` (10.99.0.1) and from each ``s<i>`` (10.99.0.<10+i>)
into it, and on top ``vxlan<1000+i>`` in ``iwf`` / ``eth0`` in ``s<i>`` with VNI 1000+i and
the same overlay addressing.  With ``dynamic`` the tunnels are not listed in igdpcp's
config: igdpcp finds them by name pattern over netlink, and ``ids`` (TOML text, the
``[ids]`` table) says where their THIRD_PARTY_IDs come from.  The configs are
written per topology into the lab's work directory from the templates below,
with a fresh mapping store, so topologies never share state.  ``teardown`` (also
run at exit) kills only the processes this topology started and deletes only
its namespaces (tests/netlab.py).

Helpers run things *inside* a namespace (``ip netns exec``): :meth:`cgn_mappings`
fetches the CGN table with curl inside ``iwf``; :meth:`upnpc`, :meth:`http` and
:meth:`python` run a client inside a subscriber's namespace.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

from . import netlab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IWF_ADDRESS = "192.168.1.1"
SUBSCRIBER_ADDRESS = "192.168.1.10"
HTTP_PORT = 5000
ADMIN = "127.0.0.1:5380"
ROOT_DESC = f"http://{IWF_ADDRESS}:{HTTP_PORT}/rootDesc.xml"
SSDP_GROUP = ("239.255.255.250", 1900)
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
TCP, UDP = 6, 17  # PCP protocol numbers, as the CGN's view shows them
# twistd in this interpreter, so the PID we record is the daemon's own
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]

IGDPCP_TEMPLATE = """\
[igd]
version = {igd_version}
http_port = {http_port}
ssdp_socket = "{ssdp_socket}"

[pcp]
soap_deadline = {soap_deadline}

[pcp.servers.cgn]
address = "127.0.0.1"
port = 5351

[leases]
min = 120
max = 604800
infinite = true
pcp_lifetime = {pcp_lifetime}

[policy]
quota = 64
rules = ["allow 1024-65535 0.0.0.0/0 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"]

[store]
path = "{store}"

[log]
level = "debug"
"""

TUNNEL_TEMPLATE = """
[[tunnels]]
name = "subscriber-{i}"
interface = "tun{i}"
address = "{address}"
third_party_id = "vxlan:{vni}"
"""

PCPLAB_TEMPLATE = """\
[cgn]
listen = "127.0.0.1"
port = 5351
admin = "{admin}"
pool = {pool}
min_lifetime = 120
max_lifetime = {max_lifetime}
announce_count = 3
"""


def vni(i: int) -> int:
    """The VXLAN VNI of subscriber ``i`` (its THIRD_PARTY_ID)."""
    return 1000 + i


UNDERLAY = "10.99.0"  # VXLAN underlay /24: iwf .1, subscriber i .(10+i)
VXLAN_PORT = 4789

DYNAMIC_TEMPLATE = """
[dynamic]
pattern = {pattern}
address = "{address}"
grace = {grace}
"""


def third_party_id_hex(i: int) -> str:
    """Subscriber ``i``'s THIRD_PARTY_ID as the CGN's operator view shows it: the 24-bit VNI
    as VXLAN carries it (RFC 7348 section 5), in hex; written out here, not taken from igdpcp."""
    return vni(i).to_bytes(3, "big").hex()


class Topology:
    """Namespaces, the lab CGN and igdpcp for one test class.  Call :meth:`start`
    (it tears down what it built if it fails) and :meth:`teardown`."""

    def __init__(self, prefix: str, *, subscribers: int = 2, igd_version: int = 1,
                 soap_deadline: float = 4.0, pcp_lifetime: int = 3600,
                 pool=("5.5.5.5/32",), max_lifetime: int = 3600, link: str = "veth",
                 dynamic: dict | None = None, ids: str = "", third_party_ids: dict | None = None,
                 before_igdpcp=None, ssdp_socket: str = "per-tunnel", workers: int = 1):
        """``link``: "veth" (``tun<i>``) or "vxlan" (``vxlan<1000+i>``, see the module doc).
        ``dynamic``: None for static ``[[tunnels]]``, else the ``[dynamic]`` table's ``pattern``
        and ``grace`` (address: 192.168.1.1); ``ids``: TOML text appended to igdpcp's config
        (the ``[ids]`` table).  ``third_party_ids``: subscriber -> the ID in hex the CGN must
        show, where it is not :func:`third_party_id_hex`.  ``before_igdpcp(topology)`` runs
        once the namespaces and the CGN are up, before igdpcp starts.  ``ssdp_socket``: igdpcp's
        ``igd.ssdp_socket`` ("per-tunnel" or "shared"); ``workers``: ``[process] workers``."""
        if link not in ("veth", "vxlan"):
            raise ValueError(f"link must be 'veth' or 'vxlan', not {link!r}")
        self.prefix = prefix
        self.count = subscribers
        self.igd_version = igd_version
        self.soap_deadline = soap_deadline
        self.pcp_lifetime = pcp_lifetime
        self.pool = list(pool)
        self.max_lifetime = max_lifetime
        self.link = link
        self.dynamic = dynamic
        self.ids = ids
        self.third_party_ids = dict(third_party_ids or {})
        self.before_igdpcp = before_igdpcp
        self.ssdp_socket = ssdp_socket
        self.workers = workers
        self.lab: netlab.Lab | None = None
        self.iwf = ""
        self.acc = ""  # the VXLAN underlay netns
        self.subs: dict[int, str] = {}
        self.ifindexes: dict[int, int] = {}  # subscriber -> ifindex of its latest tunnel interface
        self.pcplab: netlab.Process | None = None
        self.igdpcp: netlab.Process | None = None
        self._igdpcp_runs = 0

    def ifname(self, i: int) -> str:
        """Subscriber ``i``'s tunnel interface in ``iwf``."""
        return f"vxlan{vni(i)}" if self.link == "vxlan" else f"tun{i}"

    def tpid_hex(self, i: int) -> str:
        """The THIRD_PARTY_ID (hex) the CGN must show for subscriber ``i``."""
        return self.third_party_ids.get(i) or third_party_id_hex(i)

    # ------------------------------------------------------------ life cycle
    def start(self) -> "Topology":
        netlab.skip_unless_netns("ss", "curl")
        self.lab = netlab.Lab(self.prefix)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self) -> None:
        lab = self.lab
        self.iwf = lab.netns("iwf")
        if self.link == "vxlan":
            self.acc = lab.netns("acc")
            lab.ip("link", "add", "br0", "type", "bridge", ns=self.acc)
            lab.ip("link", "set", "br0", "up", ns=self.acc)
            lab.veth((self.iwf, "ul0", f"{UNDERLAY}.1/24"), (self.acc, "p0", None))
            lab.ip("link", "set", "p0", "master", "br0", ns=self.acc)
        for i in range(1, self.count + 1):
            self.add_subscriber(i, tunnel=True)
        self.store = os.path.join(lab.workdir, "store", "mappings.sqlite")
        if self.dynamic is None:
            tunnels = "".join(TUNNEL_TEMPLATE.format(i=i, address=IWF_ADDRESS, vni=vni(i)) for i in self.subs)
        else:
            tunnels = DYNAMIC_TEMPLATE.format(pattern=json.dumps(self.dynamic["pattern"]), address=IWF_ADDRESS,
                                              grace=self.dynamic.get("grace", 300))
        self.igdpcp_conf = self._write("igdpcp.toml", IGDPCP_TEMPLATE.format(
            igd_version=self.igd_version, http_port=HTTP_PORT, ssdp_socket=self.ssdp_socket,
            soap_deadline=self.soap_deadline,
            pcp_lifetime=self.pcp_lifetime, store=self.store) + tunnels + self.ids
            + f"\n[process]\nworkers = {self.workers}\n")
        self.pcplab_conf = self._write("pcplab.toml", PCPLAB_TEMPLATE.format(
            admin=ADMIN, pool=json.dumps(self.pool), max_lifetime=self.max_lifetime))
        self.pcplab = lab.spawn(self.iwf, self._twistd("pcplab", self.pcplab_conf), name="pcplab")
        lab.wait_listening(self.iwf, 5351, "udp", proc=self.pcplab)
        lab.wait_listening(self.iwf, 5380, "tcp", proc=self.pcplab)
        if self.before_igdpcp is not None:
            self.before_igdpcp(self)
        self.start_igdpcp()

    # ------------------------------------------------------------ subscribers and their tunnels
    def add_subscriber(self, i: int, *, tunnel: bool = True) -> str:
        """Create subscriber ``i``'s namespace and its side of the link (also at run time);
        with ``tunnel`` also the ``iwf`` side (:meth:`add_tunnel`).  Returns the namespace."""
        lab = self.lab
        sub = self.subs[i] = lab.netns(f"s{i}")
        if self.link == "vxlan":
            lab.veth((sub, "ul0", f"{UNDERLAY}.{10 + i}/24"), (self.acc, f"p{i}", None))
            lab.ip("link", "set", f"p{i}", "master", "br0", ns=self.acc)
            lab.ip("link", "add", "eth0", "type", "vxlan", "id", str(vni(i)), "local", f"{UNDERLAY}.{10 + i}",
                   "remote", f"{UNDERLAY}.1", "dstport", str(VXLAN_PORT), "dev", "ul0", ns=sub)
            lab.ip("addr", "add", f"{SUBSCRIBER_ADDRESS}/24", "dev", "eth0", ns=sub)
            lab.ip("link", "set", "eth0", "up", ns=sub)
            lab.ip("route", "add", "default", "via", IWF_ADDRESS, ns=sub)
            if tunnel:
                self.add_tunnel(i)
        else:
            if not tunnel:
                raise ValueError("a veth subscriber's link is created with its tunnel")
            self.add_tunnel(i)
        return sub

    def add_tunnel(self, i: int) -> int:
        """Create (or re-create) subscriber ``i``'s tunnel interface in ``iwf``, up and addressed
        (a veth link re-creates the subscriber's ``eth0`` too).  Returns its ifindex."""
        lab, name, sub = self.lab, self.ifname(i), self.subs[i]
        if self.link == "vxlan":
            lab.ip("link", "add", name, "type", "vxlan", "id", str(vni(i)), "local", f"{UNDERLAY}.1",
                   "remote", f"{UNDERLAY}.{10 + i}", "dstport", str(VXLAN_PORT), "dev", "ul0", ns=self.iwf)
            lab.ip("link", "set", name, "up", ns=self.iwf)
            lab.ip("addr", "add", f"{IWF_ADDRESS}/24", "dev", name, ns=self.iwf)
        else:
            lab.veth((self.iwf, name, f"{IWF_ADDRESS}/24"), (sub, "eth0", f"{SUBSCRIBER_ADDRESS}/24"))
            lab.ip("route", "replace", "default", "via", IWF_ADDRESS, ns=sub)
        self.ifindexes[i] = self.ifindex(i)
        return self.ifindexes[i]

    def delete_tunnel(self, i: int) -> None:
        """Delete subscriber ``i``'s tunnel interface in ``iwf`` (the subscriber session ends)."""
        self.lab.ip("link", "del", "dev", self.ifname(i), ns=self.iwf)

    def ifindex(self, i: int) -> int:
        return json.loads(self.lab.ip("-j", "link", "show", "dev", self.ifname(i), ns=self.iwf))[0]["ifindex"]

    def link_details(self, i: int) -> dict:
        """``ip -j -d link show`` of subscriber ``i``'s tunnel interface in ``iwf``."""
        return json.loads(self.lab.ip("-j", "-d", "link", "show", "dev", self.ifname(i), ns=self.iwf))[0]

    def listening_on(self) -> set[str]:
        """The interfaces igdpcp has both its HTTP and its SSDP listener on: bound to them
        (``ss``; a socket still bound to a deleted interface shows as ``if<ifindex>``), or
        with a shared SSDP socket, the SSDP group joined there (``/proc/net/igmp``)."""
        tcp = self.lab.run(self.iwf, ["ss", "-Hltn", f"sport = :{HTTP_PORT}"], check=False).stdout
        bound = re.compile(r"%([^:\s]+):")
        if self.ssdp_socket == "shared":
            return set(bound.findall(tcp)) & self.ssdp_joined()
        udp = self.lab.run(self.iwf, ["ss", "-Hlun", "sport = :1900"], check=False).stdout
        return set(bound.findall(tcp)) & set(bound.findall(udp))

    def ssdp_joined(self) -> set[str]:
        """Interfaces in ``iwf`` where 239.255.255.250 is joined (FAFFFFEF, little-endian)."""
        joined, device = set(), None
        for line in self.lab.run(self.iwf, ["cat", "/proc/net/igmp"]).stdout.splitlines()[1:]:
            fields = line.split()
            if line[:1].isdigit():
                device = fields[1]
            elif fields and fields[0] == "FAFFFFEF":
                joined.add(device)
        return joined

    def tunnel_listening(self, i: int) -> bool:
        """Whether igdpcp listens on subscriber ``i``'s tunnel, or still on its last
        interface (a deleted interface's sockets show as ``%if<ifindex>`` in ``ss``)."""
        bound = self.listening_on()
        return self.ifname(i) in bound or f"if{self.ifindexes.get(i)}" in bound

    def wait_tunnel(self, i: int, up: bool = True, timeout: float = 10.0) -> float:
        """Poll until igdpcp listens (``up``) on subscriber ``i``'s tunnel, or (not ``up``) no
        longer listens on it nor on its deleted predecessor; returns the seconds it took.
        Raises RuntimeError on timeout."""
        start = time.monotonic()
        while self.tunnel_listening(i) != up:
            if self.igdpcp is not None and not self.igdpcp.running():
                raise RuntimeError(f"igdpcp exited ({self.igdpcp.popen.returncode}):\n{self.igdpcp_log()}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"igdpcp {'not listening' if up else 'still listening'} on "
                                   f"{self.ifname(i)} after {timeout} s:\n{self.igdpcp_log()[-4000:]}")
            time.sleep(0.05)
        return time.monotonic() - start

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.lab.workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def _twistd(self, plugin: str, conf: str, log_name: str | None = None) -> list[str]:
        log = os.path.join(self.lab.workdir, f"{log_name or plugin}.twistd.log")
        return (["env", f"PYTHONPATH={REPO}"] + TWISTD
                + ["-n", "--pidfile=", f"--logfile={log}", plugin, "--config", conf])

    def start_igdpcp(self, timeout: float = 10.0) -> netlab.Process:
        """(Re)start igdpcp with the same config and store; waits until every tunnel listens."""
        self._igdpcp_runs += 1
        name = f"igdpcp{self._igdpcp_runs}"
        self.igdpcp = self.lab.spawn(self.iwf, self._twistd("igdpcp", self.igdpcp_conf, name), name=name)
        end = time.monotonic() + timeout
        while True:
            if all(self.ifname(i) in self.listening_on() for i in self.subs):
                return self.igdpcp
            if not self.igdpcp.running():
                raise RuntimeError(f"igdpcp exited ({self.igdpcp.popen.returncode}):\n{self.igdpcp_log()}")
            if time.monotonic() > end:
                raise RuntimeError(f"igdpcp tunnels not listening after {timeout} s "
                                   f"(only {self.listening_on()}):\n{self.igdpcp_log()}")
            time.sleep(0.05)

    def kill_igdpcp(self, sig: int = signal.SIGKILL) -> None:
        proc = self.igdpcp
        if proc is not None and proc.running():
            proc.popen.send_signal(sig)
            proc.popen.wait(timeout=10)

    def igdpcp_log(self) -> str:
        """twistd's log of the current igdpcp run."""
        path = os.path.join(self.lab.workdir, f"igdpcp{self._igdpcp_runs}.twistd.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return self.igdpcp.log() if self.igdpcp else ""

    def teardown(self) -> None:
        if self.lab is not None:
            self.lab.teardown()
            self.lab = None

    # ------------------------------------------------------------ the CGN's view
    def admin(self, path: str, method: str = "GET") -> object:
        """JSON from the lab CGN's operator view, fetched with curl inside ``iwf``."""
        argv = ["curl", "-sS", "-f", "-m", "5", "-X", method, f"http://{ADMIN}{path}"]
        return json.loads(self.lab.run(self.iwf, argv).stdout)

    def cgn_mappings(self, i: int | None = None, **match) -> list[dict]:
        """The CGN's live mappings, optionally only subscriber ``i``'s and those whose fields
        equal ``match`` (e.g. ``internal_port=8080``).  The probe mappings igdpcp makes for
        GetExternalIPAddress (Discard, TCP 9) are left out."""
        out = []
        for m in self.admin("/mappings"):
            if m["internal_port"] == 9:
                continue
            if i is not None and m["third_party_id"] != self.tpid_hex(i):
                continue
            if all(m.get(k) == v for k, v in match.items()):
                out.append(m)
        return out

    def wait_cgn(self, predicate, timeout: float = 10.0, interval: float = 0.2):
        """Poll ``predicate(mappings)`` until it returns something true; returns that."""
        end = time.monotonic() + timeout
        while True:
            result = predicate(self.admin("/mappings"))
            if result or time.monotonic() > end:
                return result
            time.sleep(interval)

    # ------------------------------------------------------------ clients in a subscriber netns
    def run(self, i: int, argv: list[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv`` in subscriber ``i``'s namespace; no check, text output captured."""
        return self.lab.run(self.subs[i], argv, check=False, timeout=timeout)

    def upnpc(self, i: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """``upnpc ARGS`` in subscriber ``i``: discovery by SSDP (no ``-u``), no ``-i``."""
        return self.run(i, ["upnpc"] + list(args), timeout=timeout)

    def python(self, i: int, code: str, *args: str, timeout: float = 30.0):
        """Run a Python snippet in subscriber ``i``; returns (CompletedProcess, JSON of its last
        stdout line or None)."""
        proc = self.run(i, [sys.executable, "-c", code] + list(args), timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        try:
            value = json.loads(lines[-1]) if lines else None
        except ValueError:
            value = None
        return proc, value

    def http(self, i: int, request: bytes, *, timeout: float = 15.0) -> dict:
        """Send raw ``request`` bytes to igdpcp's HTTP port from subscriber ``i`` and read until
        the server closes.  Returns status (int or None), head, body (text), elapsed (s),
        closed (the server closed the connection), error."""
        proc, value = self.python(i, _HTTP_CLIENT, request.hex(), str(timeout), timeout=timeout + 10)
        if value is None:
            raise RuntimeError(f"http client failed: {proc.stdout}\n{proc.stderr}")
        return value

    def soap(self, i: int, action: str, args: list[tuple[str, str]] | None = None, *,
             service: str = WANIP1, control: str = "/ctl/IPConn", body: bytes | None = None,
             soapaction: str | None = None, timeout: float = 15.0) -> dict:
        """One SOAP call (or ``body`` as it is) as miniupnpc frames it; see :meth:`http`."""
        if body is None:
            body = soap_body(service, action, args or [])
        if soapaction is None:
            soapaction = f'"{service}#{action}"'
        head = (f"POST {control} HTTP/1.1\r\nHost: {IWF_ADDRESS}:{HTTP_PORT}\r\n"
                f"Content-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: {soapaction}\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        return self.http(i, head + body, timeout=timeout)

    def ssdp_search(self, i: int, junk: list[bytes] = (), st: str = "upnp:rootdevice",
                    wait: float = 3.0) -> list[str]:
        """Send the ``junk`` datagrams, then one valid M-SEARCH for ``st``, to the SSDP group
        from subscriber ``i``; returns the answers received within ``wait`` seconds."""
        _, value = self.python(i, _SSDP_CLIENT, json.dumps([j.hex() for j in junk]), st, str(wait),
                               timeout=wait + 10)
        return value or []


class TopologyCase(unittest.TestCase):
    """One topology per class, started lazily (trial's runner has no setUpClass; the
    Lab's atexit hook tears down there) and torn down in tearDownClass."""

    topology_args: dict = {}
    prefix = "e2e"
    requires: tuple = ("upnpc",)  # programs the tests run; skipped without them
    topo: Topology | None = None

    @classmethod
    def setUpClass(cls):
        cls._start()

    @classmethod
    def _start(cls):
        if cls.__dict__.get("topo") is None:
            netlab.skip_unless_netns(*cls.requires)
            cls.topo = Topology(cls.prefix, **cls.topology_args).start()

    @classmethod
    def tearDownClass(cls):
        if cls.__dict__.get("topo") is not None:
            cls.topo.teardown()
            cls.topo = None

    def setUp(self):
        self._start()
        self.addCleanup(self._check_alive)

    def _check_alive(self):
        topo = self.topo
        if topo.igdpcp is not None and not topo.igdpcp.running():
            self.fail(f"igdpcp died:\n{topo.igdpcp_log()[-4000:]}")

    def tearDown(self):
        # Captured by pytest and shown only when the test fails.
        if self.topo is not None:
            print(f"--- igdpcp log during {self.id()} (tail) ---\n{self.topo.igdpcp_log()[-6000:]}")

    # -- assertions on real clients and the CGN
    def upnpc_ok(self, i: int, *args: str) -> str:
        proc = self.topo.upnpc(i, *args)
        out = proc.stdout + proc.stderr
        self.assertNotIn("not connected", out, out)
        self.assertIn("Found valid IGD : http://192.168.1.1:5000/ctl/IPConn", out, out)
        self.assertEqual(proc.returncode, 0, out)
        return out

    def assertOnCGN(self, i: int, internal_port: int, protocol: int = TCP, **fields) -> dict:
        found = self.topo.cgn_mappings(i, internal_port=internal_port, protocol=protocol)
        self.assertEqual(len(found), 1, f"subscriber {i} {internal_port}/{protocol} on the CGN: "
                                        f"{json.dumps(self.topo.admin('/mappings'), indent=1)}")
        m = found[0]
        self.assertEqual(m["third_party_id"], self.topo.tpid_hex(i))
        self.assertEqual(m["internal_address"], SUBSCRIBER_ADDRESS)
        self.assertEqual(m["external_address"], "5.5.5.5")
        self.assertGreater(m["lifetime"], 0)
        for key, value in fields.items():
            self.assertEqual(m[key], value, f"{key} of {m}")
        return m

    @staticmethod
    def parallel(*calls):
        """Run the ``calls`` (no arguments) at once in threads; their results in order."""
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            return [f.result() for f in futures]

    def delete_soap(self, i: int, external: int, protocol: str = "TCP", service: str = WANIP1) -> None:
        reply = self.topo.soap(i, "DeletePortMapping", [("NewRemoteHost", ""), (
            "NewExternalPort", str(external)), ("NewProtocol", protocol)], service=service)
        self.assertEqual(reply["status"], 200, reply)


def listed(out: str) -> list[tuple]:
    """(protocol, external port, internal client, internal port, description, lease) from ``upnpc -l``."""
    rows = re.findall(r"^\s*\d+ (TCP|UDP)\s+(\d+)->([\d.]+):(\d+)\s+'([^']*)' '[^']*' (\d+)", out, re.M)
    return [(p, int(e), c, int(i), d, int(lease)) for p, e, c, i, d, lease in rows]


def soap_body(service: str, action: str, args: list[tuple[str, str]]) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in args)
    return (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            f's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body></s:Envelope>\r\n').encode()


def add_args(external: int, internal: int, protocol: str = "TCP", lease: int = 0,
             client: str = SUBSCRIBER_ADDRESS, description: str = "e2e") -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external)), ("NewProtocol", protocol),
            ("NewInternalPort", str(internal)), ("NewInternalClient", client), ("NewEnabled", "1"),
            ("NewPortMappingDescription", description), ("NewLeaseDuration", str(lease))]


def upnp_error(reply: dict) -> int | None:
    """The errorCode of a UPnPError fault in an :meth:`Topology.http` reply, or None."""
    body = reply.get("body") or ""
    start = body.find("<errorCode>")
    if start < 0:
        return None
    return int(body[start + len("<errorCode>"):body.index("</errorCode>", start)])


_HTTP_CLIENT = f"""
import json, socket, sys, time
request, timeout = bytes.fromhex(sys.argv[1]), float(sys.argv[2])
out = {{"status": None, "head": "", "body": "", "closed": False, "error": None}}
start = time.monotonic()
data = b""
try:
    s = socket.create_connection(("{IWF_ADDRESS}", {HTTP_PORT}), timeout=timeout)
    s.settimeout(timeout)
    try:
        s.sendall(request)
    except OSError as e:  # the server may refuse early (413) and close while we send
        out["error"] = "send: " + str(e)
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            out["error"] = "timeout"
            break
        except OSError as e:
            out["error"] = "recv: " + str(e)
            out["closed"] = True
            break
        if not chunk:
            out["closed"] = True
            break
        data += chunk
    s.close()
except OSError as e:
    out["error"] = "connect: " + str(e)
out["elapsed"] = time.monotonic() - start
head, _, body = data.partition(b"\\r\\n\\r\\n")
out["head"] = head.decode("latin-1")
out["body"] = body.decode("utf-8", "replace")
if head.startswith(b"HTTP/"):
    out["status"] = int(head.split()[1])
print(json.dumps(out))
"""

_SSDP_CLIENT = f"""
import json, socket, sys, time
junk, st, wait = [bytes.fromhex(j) for j in json.loads(sys.argv[1])], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{SUBSCRIBER_ADDRESS}", 0))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
group = {SSDP_GROUP!r}
for datagram in junk:
    s.sendto(datagram, group)
time.sleep(0.3)
search = ("M-SEARCH * HTTP/1.1\\r\\nHOST: 239.255.255.250:1900\\r\\nMAN: \\"ssdp:discover\\"\\r\\n"
          "MX: 1\\r\\nST: " + st + "\\r\\n\\r\\n").encode()
s.sendto(search, group)
answers, end = [], time.monotonic() + wait
while time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        data, addr = s.recvfrom(65536)
    except socket.timeout:
        break
    answers.append(data.decode("latin-1"))
print(json.dumps(answers))
"""
