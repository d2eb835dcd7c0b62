"""THIRD_PARTY_ID from a static table and from the link itself.

VLAN, GRE and L2TP links cannot be created here (no modules): their netlink
messages are built byte by byte as the kernel lays them out (struct ifinfomsg,
nested IFLA_LINKINFO, big-endian GRE flags and keys, l2tp genetlink replies)
and decoded by pyroute2, as a live message would be.  VXLAN is real: a link in
a private netns, read through pyroute2.
"""

import struct

from pyroute2.netlink.generic.l2tp import l2tpmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from igdpcp.config import ConfigError
from igdpcp.interfaces import IThirdPartyIdSource
from igdpcp.iwf.errors import ServerFailure
from igdpcp.pcp import tpid
from igdpcp.subscriber import pseudonym
from igdpcp.tunnels import idsource
from igdpcp.tunnels.idsource import (
    IdUnavailable, LinkIds, StaticIds, TunnelInfo, UnknownTunnel, id_from_link, l2tp_sessions,
    link_info, make_source, tunnel_info_from_msg)

from . import netlab


# -- netlink messages as the kernel writes them ------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def newlink(index: int, name: str, kind: str | None = None, data: bytes = b"", link: int | None = None):
    """An RTM_NEWLINK: nlmsghdr, struct ifinfomsg, IFLA_IFNAME (3), IFLA_LINK (5),
    IFLA_LINKINFO (18) { IFLA_INFO_KIND (1), IFLA_INFO_DATA (2) }."""
    attrs = nla(3, name.encode() + b"\0")
    if link is not None:
        attrs += nla(5, struct.pack("=I", link))
    if kind is not None:
        attrs += nla(18, nla(1, kind.encode() + b"\0") + (nla(2, data) if data else b""))
    body = struct.pack("=BxHiII", 0, 1, index, 0x11043, 0) + attrs  # ARPHRD_ETHER, UP|RUNNING...
    msg = ifinfmsg(struct.pack("=IHHII", 16 + len(body), 16, 0, 0, 0) + body)
    msg.decode()
    return msg


def vxlan_data(vni: int, external: bool = False) -> bytes:
    # IFLA_VXLAN_ID (1) u32, IFLA_VXLAN_PORT (15) be16, IFLA_VXLAN_COLLECT_METADATA (25) u8
    return nla(1, struct.pack("=I", vni)) + nla(15, struct.pack(">H", 4789)) + nla(25, bytes([external]))


def vlan_data(vid: int) -> bytes:
    return nla(1, struct.pack("=H", vid)) + nla(5, struct.pack(">H", 0x8100))  # ID, PROTOCOL


def gre_data(ikey: int, okey: int, iflags: int = 0x2000, oflags: int = 0x2000) -> bytes:
    # IFLA_GRE_LINK 1, IFLAGS 2 (be16), OFLAGS 3 (be16), IKEY 4 (be32), OKEY 5 (be32); same enum for ip6gre
    return (nla(1, struct.pack("=I", 2)) + nla(2, struct.pack(">H", iflags)) + nla(3, struct.pack(">H", oflags))
            + nla(4, struct.pack(">I", ikey)) + nla(5, struct.pack(">I", okey)))


def l2tp_session_reply(ifname: str | None, session: int, peer: int):
    """An L2TP_CMD_SESSION_GET reply: nlmsghdr, genlmsghdr, L2TP_ATTR_*."""
    attrs = (nla(9, struct.pack("=I", 10)) + nla(10, struct.pack("=I", 11)) + nla(11, struct.pack("=I", session))
             + nla(12, struct.pack("=I", peer)) + nla(1, struct.pack("=H", 5)))
    if ifname:
        attrs += nla(8, ifname.encode() + b"\0")
    body = struct.pack("=BBH", 8, 1, 0) + attrs
    msg = l2tpmsg(struct.pack("=IHHII", 16 + len(body), 0x1d, 0, 0, 0) + body)
    msg.decode()
    return msg


def value(d):
    out = []
    d.addBoth(out.append)
    return out[0]


class NetlinkParsing(SynchronousTestCase):
    def test_vxlan(self):
        info = tunnel_info_from_msg(newlink(7, "vxlan1001", "vxlan", vxlan_data(1001)))
        self.assertEqual((info.name, info.ifindex, info.kind), ("vxlan1001", 7, "vxlan"))
        self.assertEqual(info.attrs["IFLA_VXLAN_ID"], 1001)
        self.assertEqual(id_from_link(info), ("vxlan", b"\x00\x03\xe9"))

    def test_vxlan_external_has_no_vni(self):
        info = tunnel_info_from_msg(newlink(8, "vxext", "vxlan", vxlan_data(0, external=True)))
        self.assertRaises(UnknownTunnel, id_from_link, info)

    def test_vlan(self):
        info = tunnel_info_from_msg(newlink(9, "eth0.42", "vlan", vlan_data(42), link=2))
        self.assertEqual(dict(info.attrs), {"IFLA_LINK": 2, "IFLA_VLAN_ID": 42, "IFLA_VLAN_PROTOCOL": 0x8100})
        self.assertEqual(id_from_link(info), ("vlan", b"\x02\xa0"))  # 12 bits + 4 zero bits
        self.assertEqual(tpid.decode("vlan", id_from_link(info)[1]), 42)

    def test_gre_uses_the_input_key(self):
        for kind in ("gre", "gretap", "ip6gre", "ip6gretap"):
            info = tunnel_info_from_msg(newlink(10, "gre1", kind, gre_data(0x01020304, 0x0A0B0C0D)))
            self.assertEqual(info.attrs["IFLA_GRE_IKEY"], 0x01020304, kind)
            self.assertEqual(info.attrs["IFLA_GRE_IFLAGS"], 0x2000, kind)  # host order, also for ip6gre
            self.assertEqual(id_from_link(info), ("gre", b"\x01\x02\x03\x04"), kind)

    def test_gre_without_key_flag(self):
        for kind in ("gre", "ip6gre"):
            info = tunnel_info_from_msg(newlink(11, "gre2", kind, gre_data(0, 7, iflags=0, oflags=0x2000)))
            self.assertRaises(UnknownTunnel, id_from_link, info)

    def test_l2tp_session_from_genetlink(self):
        sessions = l2tp_sessions([l2tp_session_reply("l2tpeth0", 0x12345678, 16),
                                  l2tp_session_reply(None, 99, 98)])  # a PPP session: no netdev
        self.assertEqual(sessions, {"l2tpeth0": {"L2TP_ATTR_SESSION_ID": 0x12345678,
                                                 "L2TP_ATTR_PEER_SESSION_ID": 16,
                                                 "L2TP_ATTR_CONN_ID": 10, "L2TP_ATTR_PEER_CONN_ID": 11}})
        ipr = FakeIPRoute(newlink(12, "l2tpeth0"))  # mainline l2tp_eth: no IFLA_LINKINFO
        self.assertIsNone(link_info(ipr, "l2tpeth0").kind)
        info = link_info(ipr, "l2tpeth0", l2tp=sessions)
        self.assertEqual(info.kind, "l2tp")
        self.assertEqual(id_from_link(info), ("l2tpv3", b"\x12\x34\x56\x78"))

    def test_l2tp_session_zero_is_reserved(self):
        info = TunnelInfo("l2tpeth1", 13, "l2tp", {"L2TP_ATTR_SESSION_ID": 0})
        self.assertRaises(UnknownTunnel, id_from_link, info)

    def test_veth_has_no_id(self):
        info = tunnel_info_from_msg(newlink(14, "tun1", "veth", link=3))
        self.assertRaises(UnknownTunnel, id_from_link, info)

    def test_link_info_no_such_link(self):
        self.assertRaises(UnknownTunnel, link_info, FakeIPRoute(None), "gone0")

    def test_repr_hides_name_and_ids(self):
        info = TunnelInfo("vxlan1001", 7, "vxlan", {"IFLA_VXLAN_ID": 1001})
        self.assertNotIn("vxlan1001", repr(info))
        self.assertNotIn("1001", repr(info).replace(pseudonym("vxlan1001"), ""))
        self.assertIn(pseudonym("vxlan1001"), repr(info))

    def test_attrs_are_read_only(self):
        info = TunnelInfo("x", 1, "vxlan", {"IFLA_VXLAN_ID": 1})
        with self.assertRaises(TypeError):
            info.attrs["IFLA_VXLAN_ID"] = 2


class FakeIPRoute:
    """``link('get', ...)`` answered with one prepared message (or ENODEV)."""

    def __init__(self, msg):
        self.msg = msg
        self.calls = []

    def link(self, command, **kw):
        from pyroute2.netlink.exceptions import NetlinkError
        self.calls.append((command, kw))
        if self.msg is None:
            raise NetlinkError(19, "No such device")
        return (self.msg,)


class Providers(SynchronousTestCase):
    def test_interface(self):
        for source in (StaticIds({}), LinkIds()):
            verifyObject(IThirdPartyIdSource, source)

    def test_static(self):
        source = StaticIds({"tun1": b"\x00\x03\xe9"})
        self.assertEqual(value(source.third_party_id(TunnelInfo("tun1"))), b"\x00\x03\xe9")
        failure = value(source.third_party_id(TunnelInfo("tun2")))
        self.assertTrue(failure.check(UnknownTunnel))
        self.assertNotIn("tun2", str(failure.value))
        self.assertIsInstance(failure.value, ServerFailure)  # UPnP 501 via upnp/faults.py
        self.assertRaises(ValueError, StaticIds, {"tun3": b""})
        self.assertRaises(ValueError, StaticIds, {"tun3": b"x" * 1017})

    def test_link_kinds(self):
        vx = TunnelInfo("vxlan1001", 4, "vxlan", {"IFLA_VXLAN_ID": 1001})
        vlan = TunnelInfo("eth0.42", 5, "vlan", {"IFLA_VLAN_ID": 42})
        self.assertEqual(value(LinkIds().third_party_id(vx)), b"\x00\x03\xe9")
        self.assertTrue(value(LinkIds().third_party_id(vlan)).check(UnknownTunnel))  # vlan not enabled
        both = LinkIds(kinds=("vxlan", "vlan"))
        self.assertEqual(value(both.third_party_id(vlan)), b"\x02\xa0")

    def test_same_length_technologies_refused(self):
        self.assertRaises(ValueError, LinkIds, kinds=("gre", "l2tpv3"))
        self.assertRaises(ValueError, LinkIds, kinds=("vxlan", "mpls"))
        LinkIds(kinds=("gre", "l2tpv3"), allow_mixed=True)
        self.assertRaises(ValueError, LinkIds, kinds=("ipip",))

    def test_mpls_label_from_name(self):
        source = LinkIds(kinds=("mpls",), patterns={"mpls": r"^pw(\d+)$"})
        self.assertEqual(value(source.third_party_id(TunnelInfo("pw16", 3, "veth"))), b"\x00\x01\x00")
        self.assertTrue(value(source.third_party_id(TunnelInfo("pw1048576", 3, "veth"))).check(UnknownTunnel))
        self.assertTrue(value(source.third_party_id(TunnelInfo("eth7", 3, "veth"))).check(UnknownTunnel))
        self.assertRaises(ValueError, LinkIds, kinds=("mpls",), patterns={"mpls": "^pw"})  # no group
        self.assertRaises(ValueError, LinkIds, kinds=("vxlan",), patterns={"mpls": r"(\d+)"})

    def test_fallback_to_static(self):
        source = LinkIds(fallback=StaticIds({"tun1": b"sub-1"}))
        self.assertEqual(value(source.third_party_id(TunnelInfo("tun1", 3, "veth"))), b"sub-1")
        external = TunnelInfo("vxext", 5, "vxlan", {"IFLA_VXLAN_ID": 0, "IFLA_VXLAN_COLLECT_METADATA": 1})
        self.assertTrue(value(source.third_party_id(external)).check(UnknownTunnel))

    def test_link_attribute_wins_over_fallback(self):
        source = LinkIds(fallback=StaticIds({"vxlan1001": b"other"}))
        vx = TunnelInfo("vxlan1001", 4, "vxlan", {"IFLA_VXLAN_ID": 1001})
        self.assertEqual(value(source.third_party_id(vx)), b"\x00\x03\xe9")


class Config(SynchronousTestCase):
    def test_static(self):
        source = make_source({"source": "static", "static": {"tun1": "vxlan:1001", "tun2": "hex:0a0b"}})
        self.assertEqual(source.table, {"tun1": b"\x00\x03\xe9", "tun2": b"\x0a\x0b"})

    def test_link(self):
        source = make_source({"source": "link", "link": {"kinds": ["vxlan", "mpls"], "allow_mixed": True,
                                                         "patterns": {"mpls": r"^pw(\d+)$"},
                                                         "fallback": "static"},
                              "static": {"tun1": "text:s1"}})
        self.assertEqual(source.kinds, ("vxlan", "mpls"))
        self.assertEqual(source.fallback.table, {"tun1": b"s1"})

    def test_radius(self):
        from twisted.internet.task import Clock
        source = make_source({"source": "radius", "radius": {"server": "127.0.0.1:18120", "secret": "s",
                                                             "ttl": 60, "retries": 1}}, Clock())
        self.assertEqual((source.server, source.ttl, source.retries), (("127.0.0.1", 18120), 60.0, 1))
        self.assertNotIn("s", repr(source).replace("RadiusIds", ""))
        self.assertRaises(TypeError, make_source, {"source": "radius", "radius": {"server": "127.0.0.1",
                                                                                  "secret": "s"}})

    def test_errors_name_the_key(self):
        cases = [({"source": "ldap"}, "ids.source:"),
                 ({"source": "static", "static": {"tun1": "vxlan:x"}}, "ids.static.tun1:"),
                 ({"source": "static", "static": {"tun1": 5}}, "ids.static.tun1:"),
                 ({"source": "link", "link": {"kinds": ["gre", "l2tpv3"]}}, "ids.link:"),
                 ({"source": "link", "link": {"colour": 1}}, "ids.link.colour:"),
                 ({"source": "radius", "radius": {"secret": "s"}}, "ids.radius.server:"),
                 ({"source": "radius", "radius": {"server": "radius.example:1812", "secret": "s"}},
                  "ids.radius.server:"),
                 ({"source": "radius", "radius": {"server": "127.0.0.1"}}, "ids.radius.secret:"),
                 ({"source": "radius", "radius": {"server": "127.0.0.1", "secret": "s", "ttl": "x"}},
                  "ids.radius.ttl:"),
                 ({"source": "radius", "radius": {"server": "127.0.0.1", "secret": "s",
                                                  "attribute": "Filter-Id"}}, "ids.radius:"),
                 ({"source": "static", "extra": 1}, "ids.extra:")]
        from twisted.internet.task import Clock
        for config, prefix in cases:
            with self.assertRaises(ConfigError, msg=config) as caught:
                make_source(config, Clock())
            self.assertTrue(str(caught.exception).startswith(prefix), (config, str(caught.exception)))
            self.assertNotIn("secret = ", str(caught.exception))


class RealVxlan(SynchronousTestCase):
    """A VXLAN link in a netns of our own, read with pyroute2 inside that netns."""

    def setUp(self):
        netlab.skip_unless_netns()
        self.lab = netlab.Lab("tid")
        self.addCleanup(self.lab.teardown)
        self.ns = self.lab.netns("iwf")
        self.lab.veth((self.ns, "ul0", "10.99.0.1/24"), (self.ns, "ul1", None))
        self.lab.ip("link", "add", "vxlanT", "type", "vxlan", "id", "1001", "dstport", "4789",
                    "local", "10.99.0.1", "dev", "ul0", ns=self.ns)
        self.lab.ip("link", "add", "vxext", "type", "vxlan", "external", "dstport", "4790", ns=self.ns)

    def test_vni_from_the_kernel(self):
        from pyroute2 import IPRoute
        with IPRoute(netns=self.ns) as ipr:
            info = link_info(ipr, "vxlanT")
            by_index = link_info(ipr, info.ifindex)
            veth = link_info(ipr, "ul0")
            external = link_info(ipr, "vxext")
            self.assertRaises(UnknownTunnel, link_info, ipr, "nosuch0")
        self.assertEqual((info.kind, info.attrs["IFLA_VXLAN_ID"]), ("vxlan", 1001))
        self.assertEqual(by_index, info)
        self.assertEqual(value(LinkIds().third_party_id(info)), b"\x00\x03\xe9")
        self.assertTrue(value(LinkIds().third_party_id(veth)).check(UnknownTunnel))
        self.assertTrue(value(LinkIds().third_party_id(external)).check(IdUnavailable))
        # iproute2 agrees (lab.md section 2)
        import json
        shown = json.loads(self.lab.ip("-j", "-d", "link", "show", "vxlanT", ns=self.ns))
        self.assertEqual(shown[0]["linkinfo"]["info_data"]["id"], 1001)


class NoL2tpHere(SynchronousTestCase):
    def test_dump_without_the_family_is_empty(self):
        self.assertIsInstance(idsource.dump_l2tp_sessions(), dict)
