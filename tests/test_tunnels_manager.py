"""TunnelManager's decisions on a Clock: which links get a front end, re-binding, grace time."""

import re

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.config import TunnelConfig
from igdpcp.subscriber import Subscriber
from igdpcp.tunnels.frontend import FrontEndSettings
from igdpcp.tunnels.idsource import StaticIds, TunnelInfo
from igdpcp.tunnels.manager import DynamicTunnels, TunnelManager
from igdpcp.tunnels.netlink import LinkState


class FakeFrontEnd(Service):
    started = []
    failing = {"vxlan66"}  # as if out of file descriptors

    def __init__(self, reactor, iwf, tunnel, interface, address, settings, *, server,
                 third_party_id, announce_after):
        self.tunnel, self.interface, self.address, self.server = tunnel, interface, address, server
        self.subscriber = Subscriber(tunnel, b"", server)
        self.third_party_id = third_party_id
        self.announce_after = announce_after
        self.fail = interface in self.failing

    def startService(self):
        if self.fail:
            raise OSError(24, "Too many open files")
        super().startService()
        FakeFrontEnd.started.append(self)


class FakeIWF:
    def __init__(self):
        self.released = []

    def release_subscriber(self, subscriber):
        self.released.append(subscriber.tunnel)
        return 1


def link(name, index, up=True, addresses=("192.168.1.1",)):
    """A link as the netlink watcher reports it."""
    return LinkState(name, index, up, TunnelInfo(name, index, "vxlan", {"IFLA_VXLAN_ID": 1001}),
                     tuple(addresses))


class ManagerTests(SynchronousTestCase):
    def setUp(self):
        FakeFrontEnd.started = []
        self.clock = Clock()
        self.iwf = FakeIWF()
        ids = StaticIds({"vxlan7": b"\x00\x00\x07"})
        static = {"tun1": TunnelConfig("subscriber-1", "tun1", "192.168.1.1", b"\x00\x03\xe9", "cgn")}
        self.manager = TunnelManager(
            self.clock, self.iwf, FrontEndSettings(), ids, static=static, front_end=FakeFrontEnd,
            dynamic=DynamicTunnels(re.compile(r"vxlan\d+"), "192.168.1.1", "cgn", grace=30))
        self.manager.startService()

    def changed(self, state):
        self.manager.link_changed(state)
        self.clock.advance(0)  # front ends start on the next reactor turn

    def ids_of(self, front):
        out = []
        front.third_party_id().addCallback(out.append)
        return out[0]

    def test_a_worker_serves_only_its_shard(self):
        """With [process] workers, a link of another worker's tunnel gets no front end here
        (static tunnels are matched by tunnel name, dynamic ones by interface name)."""
        self.manager.owns = lambda name: name in ("vxlan7", "subscriber-1")
        for i, name in enumerate(("vxlan7", "vxlan8", "tun1"), start=3):
            self.changed(link(name, i))
        self.assertEqual(sorted(f.interface for f in FakeFrontEnd.started), ["tun1", "vxlan7"])
        self.manager.owns = lambda name: False
        self.changed(link("vxlan9", 9))
        self.manager.link_removed("vxlan8", 4)  # not ours: no grace timer either
        self.assertEqual(len(FakeFrontEnd.started), 2)
        self.assertEqual(self.manager.grace, {})

    def test_only_matching_links_with_the_address(self):
        self.changed(link("eth0", 2))
        self.changed(link("vxlan7", 3, addresses=()))  # no address yet
        self.changed(link("vxlan8", 4, up=False))
        self.assertEqual(FakeFrontEnd.started, [])
        self.changed(link("vxlan7", 3))
        (front,) = FakeFrontEnd.started
        self.assertEqual((front.tunnel, front.interface, front.address), ("vxlan7", "vxlan7", "192.168.1.1"))
        self.assertEqual(self.ids_of(front), b"\x00\x00\x07")

    def test_static_tunnel_uses_its_configured_id_and_name(self):
        self.changed(link("tun1", 5))
        (front,) = FakeFrontEnd.started
        self.assertEqual(front.tunnel, "subscriber-1")
        self.assertEqual(self.ids_of(front), b"\x00\x03\xe9")

    def test_unchanged_link_is_left_alone_and_new_ifindex_rebinds(self):
        self.changed(link("vxlan7", 3))
        self.changed(link("vxlan7", 3))
        self.assertEqual(len(FakeFrontEnd.started), 1)
        self.changed(link("vxlan7", 9))  # deleted and re-created
        self.assertEqual(len(FakeFrontEnd.started), 2)
        self.assertFalse(FakeFrontEnd.started[0].running)
        self.assertEqual(self.manager.counters["rebound"], 1)

    def test_grace_time_keeps_then_releases(self):
        self.changed(link("vxlan7", 3))
        self.manager.link_removed("vxlan7", 3)
        self.assertFalse(FakeFrontEnd.started[0].running)
        self.clock.advance(29)
        self.changed(link("vxlan7", 11))  # back within the grace time
        self.clock.advance(60)
        self.assertEqual(self.iwf.released, [])
        self.assertEqual(self.manager.counters["returned"], 1)
        self.manager.link_removed("vxlan7", 11)
        self.clock.advance(29)
        self.assertEqual(self.iwf.released, [])
        self.clock.advance(2)
        self.assertEqual(self.iwf.released, ["vxlan7"])

    def test_removal_of_a_stale_ifindex_is_ignored(self):
        self.changed(link("vxlan7", 3))
        self.changed(link("vxlan7", 9))
        self.manager.link_removed("vxlan7", 3)  # the old interface's late event
        self.assertTrue(FakeFrontEnd.started[-1].running)

    def test_failed_front_end_is_not_kept(self):
        self.changed(link("vxlan66", 3))
        self.assertEqual(self.manager.counters["failed"], 1)
        self.assertNotIn("vxlan66", self.manager.fronts)
        self.assertEqual(list(self.manager), [])

    def test_announcements_spread_with_the_number_of_tunnels(self):
        for i in range(5000):
            self.manager.link_changed(link(f"vxlan{10000 + i}", 100 + i))
        self.assertEqual(FakeFrontEnd.started, [])
        self.manager.pump.func()  # one reactor turn starts one batch and schedules the next
        self.assertEqual(len(FakeFrontEnd.started), 100)
        self.clock.advance(0)
        self.assertEqual(len(FakeFrontEnd.started), 5000)
        slots = [f.announce_after for f in FakeFrontEnd.started]
        self.assertAlmostEqual(slots[0], 0.001)  # 1,000 tunnels a second, evenly
        self.assertAlmostEqual(slots[-1], 5.0)
        self.assertTrue(all(b - a > 0.0009 for a, b in zip(slots, slots[1:])))
        self.clock.advance(10)
        self.manager.link_changed(link("vxlan9", 9))  # later, alone: announces at once
        self.clock.advance(0)
        self.assertAlmostEqual(FakeFrontEnd.started[-1].announce_after, 0.001)

    def test_link_gone_before_its_turn_never_starts(self):
        self.manager.link_changed(link("vxlan7", 3))
        self.manager.link_removed("vxlan7", 3)
        self.clock.advance(0)
        self.assertEqual(FakeFrontEnd.started, [])
        self.clock.advance(31)
        self.assertEqual(self.iwf.released, ["vxlan7"])

    def test_stop_cancels_grace_timers(self):
        self.changed(link("vxlan7", 3))
        self.manager.link_removed("vxlan7", 3)
        d = defer.maybeDeferred(self.manager.stopService)
        self.clock.advance(100)
        self.assertEqual(self.iwf.released, [])
        self.successResultOf(d)
