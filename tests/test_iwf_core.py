"""The IWF core against the lab CGN's sans-IO core, on a Clock with in-memory UDP.

Every test checks what the CGN holds afterwards, not only what the IWF says.
"""

import os
import tempfile
from ipaddress import IPv4Address, ip_network

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.iwf import errors
from igdpcp.iwf.core import InterworkingFunction
from igdpcp.iwf.model import MappingKey, MappingRequest
from igdpcp.iwf.policy import Policy
from igdpcp.iwf.store import MemoryStore, SQLiteStore, StoreError
from igdpcp.pcp.client import PCPClient, ServerAddress
from igdpcp.pcplab.cgn import LabCGN
from igdpcp.pcplab.config import CGNConfig
from igdpcp.subscriber import Caller, Subscriber

from .pcpfakes import CLIENT_IP, SERVER_IP, UDPClock

HOST = IPv4Address("192.168.1.10")
OTHER_HOST = IPv4Address("192.168.1.11")
SUB1 = Subscriber("tun1", b"\x00\x03\xe9", "cgn")
SUB2 = Subscriber("tun2", b"\x00\x03\xea", "cgn")


class CGNClock(UDPClock):
    """UDP to an in-memory lab CGN, with 5 ms of latency each way."""

    def __init__(self, cgn):
        super().__init__(CLIENT_IP)
        self.cgn = cgn
        self.silent = False

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        transport = super().listenUDP(port, protocol, interface, maxPacketSize)
        transport.write = lambda data, addr=None: self._to_cgn(transport, data)
        return transport

    def _to_cgn(self, transport, data):
        transport.written.append(data)
        if self.silent:
            return
        answer = self.cgn.handle(data, CLIENT_IP, 40000, self.seconds())
        if answer is not None:
            self.callLater(0.005, transport.protocol.datagramReceived, answer, (SERVER_IP, 5351))

    def announce(self):
        self.deliver(self.cgn.announce(self.seconds()))


def request(port=18080, host=None, internal_port=8080, protocol="TCP", lease=3600, **kw):
    return MappingRequest(port, protocol, internal_port, host, lease=lease, **kw)


class IWFTestCase(SynchronousTestCase):
    # One external address, so two subscribers really compete for a port.
    cgn_config = CGNConfig(max_lifetime=3600, pool=(ip_network("5.5.5.5/32"),))
    policy = Policy()

    def setUp(self):
        self.cgn = LabCGN(self.cgn_config, now=0)
        self.clock = CGNClock(self.cgn)
        self.store = MemoryStore()
        self.iwf = self.make_iwf()

    def make_iwf(self):
        client = PCPClient(self.clock, {"cgn": ServerAddress(SERVER_IP)})
        client.start()
        self.client = client
        iwf = InterworkingFunction(self.clock, client, self.store, self.policy)
        self.addCleanup(iwf.stop)
        return iwf

    def drive(self, d, seconds=10.0):
        """Drive the clock until ``d`` fires; return its result or raise its failure."""
        out = []
        d.addBoth(out.append)
        for _ in range(int(seconds / 0.005)):
            if out:
                break
            self.clock.advance(0.005)
        self.assertTrue(out, "no answer within the bound")
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def pump(self, seconds, step=0.5):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def held(self):
        return sorted((m["third_party_id"], m["internal_address"], m["internal_port"], m["external_port"])
                      for m in self.cgn.snapshot(self.clock.seconds()))

    def add(self, sub=SUB1, addr=HOST, any_port=False, **kw):
        return self.drive(self.iwf.add_mapping(Caller(sub, addr), request(**kw), any_port))


class AddTests(IWFTestCase):
    def test_add_reaches_cgn_with_third_party_id(self):
        view = self.add()
        self.assertEqual(view.external_port, 18080)
        self.assertTrue(view.external_address.is_global)
        self.assertEqual(self.held(), [("0003e9", "192.168.1.10", 8080, 18080)])
        self.assertEqual(len(self.store.rows), 1)

    def assert_store_failure_is_501_and_leaves_nothing_on_the_cgn(self, store):
        self.store = self.iwf.store = store
        with self.assertRaises(errors.ServerFailure):
            self.add()
        self.pump(2)
        self.assertEqual(self.held(), [])  # the CGN's mapping was deleted, not orphaned
        self.assertEqual(self.iwf.mapping_count(SUB1), 0)  # nor listed without a record
        self.assertEqual(self.iwf.stats["store_failed"], 1)

    def test_failed_write_is_501_and_leaves_nothing_on_the_cgn(self):
        class FailingWrite(MemoryStore):  # as SQLiteStore fails: the write raises
            def put(self, row):
                raise StoreError("write failed: disk I/O error")
        self.assert_store_failure_is_501_and_leaves_nothing_on_the_cgn(FailingWrite())

    def test_failed_background_commit_is_501_and_leaves_nothing_on_the_cgn(self):
        class FailingCommit(MemoryStore):  # a store that commits later, and fails
            def durable(self):
                return defer.fail(StoreError("write failed: disk I/O error"))
        self.assert_store_failure_is_501_and_leaves_nothing_on_the_cgn(FailingCommit())

    def test_calls_on_one_mapping_take_turns(self):
        caller = Caller(SUB1, HOST)
        first = self.iwf.add_mapping(caller, request(lease=1000))
        delete = self.iwf.delete_mapping(caller, MappingKey(None, 18080, "TCP"))
        second = self.iwf.add_mapping(caller, request(lease=2000))
        other = self.iwf.add_mapping(caller, request(port=18081, internal_port=8081))
        self.assertEqual(len(self.client._server("cgn").pending), 2)  # the 1st add and the other port
        self.assertLessEqual(self.drive(first).lease, 1000)
        self.drive(delete)  # ran only after the add it follows, so it found the mapping
        self.assertGreater(self.drive(second).lease, 1000)  # and the re-add after it made it again
        self.drive(other)
        self.assertEqual(self.held(), [("0003e9", "192.168.1.10", 8080, 18080),
                                       ("0003e9", "192.168.1.10", 8081, 18081)])
        self.assertEqual(self.iwf.busy, {})

    def test_overlapping_subscribers_are_separate(self):
        self.add(SUB1)
        with self.assertRaises(errors.Conflict):  # PREFER_FAILURE: the CGN's port is taken
            self.add(SUB2)
        self.add(SUB2, port=18081)
        self.assertEqual(self.held(), [("0003e9", "192.168.1.10", 8080, 18080),
                                       ("0003ea", "192.168.1.10", 8080, 18081)])
        caller1, caller2 = Caller(SUB1, HOST), Caller(SUB2, HOST)
        self.assertEqual([v.external_port for v in self.iwf.list_mappings(caller1, 0, 65535, "TCP", 1, 0)],
                         [18080])
        self.assertEqual(self.iwf.get_generic(caller2, 0).external_port, 18081)
        self.assertRaises(errors.IndexOutOfRange, self.iwf.get_generic, caller2, 1)

    def test_readd_refreshes(self):
        first = self.add(lease=100)
        self.pump(50)
        second = self.add(lease=3600)
        self.assertEqual(first.external_port, second.external_port)
        self.assertTrue(3595 < second.lease_remaining <= 3600)
        self.assertEqual(len(self.held()), 1)
        self.assertEqual(self.iwf.mapping_count(SUB1), 1)

    def test_conflicts(self):
        self.add()
        with self.assertRaises(errors.Conflict):
            self.add(addr=OTHER_HOST, host=OTHER_HOST)  # same external port, other host
        with self.assertRaises(errors.Conflict):
            self.add(port=18099)  # same internal tuple, other external port (PCP keys it once)

    def test_own_address_rule(self):
        with self.assertRaises(errors.NotAuthorized):
            self.add(host=OTHER_HOST)
        self.assertEqual(self.held(), [])
        view = self.add(host=None)  # empty InternalClient means the caller
        self.assertEqual(view.internal_client, HOST)

    def test_permission_rules_and_wildcards(self):
        with self.assertRaises(errors.NotAuthorized):
            self.add(port=80, internal_port=80)
        with self.assertRaises(errors.WildcardNotPermitted):
            self.add(internal_port=0)
        with self.assertRaises(errors.WildcardNotPermitted):
            self.add(port=0)
        with self.assertRaises(errors.InvalidArgument):
            self.add(protocol="SCTP")
        self.assertEqual(self.held(), [])

    def test_any_port_takes_what_cgn_gives(self):
        self.add(SUB1)
        view = self.add(SUB2, any_port=True)
        self.assertNotEqual(view.external_port, 18080)
        caller2 = Caller(SUB2, HOST)
        self.assertEqual(self.iwf.get_generic(caller2, 0).external_port, view.external_port)

    def test_server_ignoring_prefer_failure_gets_conflict(self):
        # Like miniupnpd 2.3.1: SUCCESS on another port despite PREFER_FAILURE.
        real = self.cgn.handle

        def lax(data, ip, port, now):
            answer = real(data, ip, port, now)
            if answer is not None and data[4:8] != b"\0\0\0\0" and answer[3] == 11:
                data = bytearray(data)
                data[42:44] = (18099).to_bytes(2, "big")  # suggest a free port instead
                return real(bytes(data), ip, port, now)
            return answer

        self.cgn.handle = lax
        self.add(SUB1)
        with self.assertRaises(errors.Conflict):
            self.add(SUB2)
        self.pump(1, step=0.01)
        self.assertEqual([h[0] for h in self.held()], ["0003e9"])  # the stray one was deleted
        self.assertEqual(self.iwf.stats["prefer_failure_ignored"], 1)

    def test_quota(self):
        self.iwf.policy = Policy(quota=2)
        self.add(port=20001, internal_port=20001)
        self.add(port=20002, internal_port=20002)
        with self.assertRaises(errors.QuotaExceeded):
            self.add(port=20003, internal_port=20003)
        self.add(port=20002, internal_port=20002)  # a refresh is not a new mapping

    def test_silent_cgn_answers_within_bound(self):
        self.clock.silent = True
        start = self.clock.seconds()
        with self.assertRaises(errors.ServerUnreachable):
            self.add()
        self.assertLessEqual(self.clock.seconds() - start, 4.05)
        self.assertEqual(self.iwf.mapping_count(SUB1), 0)
        self.assertEqual(self.store.rows, {})

    def test_lease_zero_infinite_kept(self):
        view = self.add(lease=None)
        self.assertIsNone(view.lease)
        self.pump(5 * 3600, step=5)
        self.assertEqual(len(self.held()), 1)
        self.assertEqual(self.iwf.stats["renewals_late"], 0)

    def test_lease_clamped_never_refused(self):
        self.iwf.policy = Policy(lease_min=300, lease_max=7200)
        self.assertEqual(self.add(lease=1).lease, 300)
        self.assertEqual(self.add(port=18081, internal_port=8081, lease=10**9).lease, 7200)


class RenewalTests(IWFTestCase):
    cgn_config = CGNConfig(min_lifetime=120, max_lifetime=120, pool=(ip_network("5.5.5.5/32"),))

    def test_renewed_under_short_cgn_lifetime(self):
        self.add(lease=3600)
        self.pump(1800, step=1)
        self.assertEqual(len(self.held()), 1)
        self.assertGreater(self.iwf.stats["renewals_ok"], 10)
        self.assertEqual(self.iwf.stats["renewals_late"], 0)

    def test_lease_end_deletes_on_cgn(self):
        self.add(lease=300)
        self.pump(299, step=1)
        self.assertEqual(len(self.held()), 1)
        self.pump(3, step=1)
        self.assertEqual(self.held(), [])
        self.assertEqual(self.iwf.mapping_count(SUB1), 0)
        self.assertEqual(self.store.rows, {})

    def test_lease_end_with_a_failing_store_still_deletes_on_cgn(self):
        self.add(lease=300)

        def failing(row):
            raise StoreError("write failed: disk I/O error")
        self.store.delete = failing
        self.pump(302, step=1)
        self.assertEqual(self.held(), [])  # the lease ended on the CGN all the same
        self.assertEqual(self.iwf.mapping_count(SUB1), 0)
        self.assertEqual(self.iwf.stats["store_failed"], 1)  # counted; the store logged it

    def test_silent_cgn_then_back(self):
        self.add(lease=3600)
        self.clock.silent = True
        self.pump(200, step=1)
        self.assertEqual(self.iwf.mapping_count(SUB1), 1)  # never dropped locally
        self.clock.silent = False
        self.cgn.expire(self.clock.seconds())
        self.pump(60, step=1)
        self.assertEqual(len(self.held()), 1)


class RecoveryTests(IWFTestCase):
    def test_cgn_reboot_recreates(self):
        self.add()
        self.add(SUB2, port=18081)
        self.pump(100)
        self.cgn.reboot(self.clock.seconds())
        self.assertEqual(self.held(), [])
        self.clock.announce()
        self.pump(10, step=0.1)
        self.assertEqual(self.held(), [("0003e9", "192.168.1.10", 8080, 18080),
                                       ("0003ea", "192.168.1.10", 8080, 18081)])
        self.assertEqual(self.iwf.stats["state_loss_events"], 1)

    def test_restart_restores_renews_deletes(self):
        store = self.store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.sqlite"))
        self.iwf.store = store
        self.add()
        nonce = self.cgn.snapshot(self.clock.seconds())[0]["nonce"]
        self.iwf.stop()  # as if killed: nothing sent on the way out
        self.clock.transports.clear()
        restarted = self.make_iwf()
        self.assertEqual(restarted.restore(), 1)
        caller = Caller(SUB1, HOST)
        self.assertEqual(restarted.get_generic(caller, 0).external_port, 18080)
        self.pump(5, step=0.1)
        self.assertEqual(restarted.stats["renewals_ok"], 1)  # the persisted nonce was accepted
        self.assertEqual(self.cgn.snapshot(self.clock.seconds())[0]["nonce"], nonce)
        self.drive(restarted.delete_mapping(caller, MappingKey(None, 18080, "TCP")))
        self.assertEqual(self.held(), [])
        self.assertEqual(store.load_all(), [])


class DeleteAndReadTests(IWFTestCase):
    def test_delete(self):
        self.add()
        caller = Caller(SUB1, HOST)
        key = MappingKey(None, 18080, "TCP")
        with self.assertRaises(errors.NotAuthorized):
            self.drive(self.iwf.delete_mapping(Caller(SUB1, OTHER_HOST), key))
        with self.assertRaises(errors.NoSuchEntry):
            self.drive(self.iwf.delete_mapping(Caller(SUB2, HOST), key))  # another subscriber's
        self.assertEqual(len(self.held()), 1)
        self.drive(self.iwf.delete_mapping(caller, key))
        self.assertEqual(self.held(), [])
        with self.assertRaises(errors.NoSuchEntry):
            self.drive(self.iwf.delete_mapping(caller, key))

    def test_delete_range(self):
        for port in (20001, 20002, 20003):
            self.add(port=port, internal_port=port)
        caller = Caller(SUB1, HOST)
        self.assertEqual(self.drive(self.iwf.delete_range(caller, 20001, 20002, "TCP", 0)), 2)
        self.assertEqual([h[3] for h in self.held()], [20003])
        with self.assertRaises(errors.NoSuchEntry):
            self.drive(self.iwf.delete_range(caller, 30000, 30001, "TCP", 0))
        with self.assertRaises(errors.InconsistentParameters):
            self.drive(self.iwf.delete_range(caller, 2, 1, "TCP", 0))

    def test_specific_probe_leaves_nothing(self):
        caller = Caller(SUB1, HOST)
        key = MappingKey(None, 18080, "TCP")
        with self.assertRaises(errors.NoSuchEntry):
            self.drive(self.iwf.get_specific(caller, key))
        self.pump(1, step=0.01)
        self.assertEqual(self.held(), [])
        self.assertEqual(self.iwf.stats["probes"], 1)
        self.add(internal_port=18080)  # the probe's internal tuple, right after
        self.assertEqual(self.drive(self.iwf.get_specific(caller, key)).internal_port, 18080)

    def test_specific_probe_with_undelivered_delete_does_not_block(self):
        caller = Caller(SUB1, HOST)
        with self.assertRaises(errors.NoSuchEntry):
            self.drive(self.iwf.get_specific(caller, MappingKey(None, 18080, "TCP")))
        self.clock.silent = True  # the probe's delete is lost: the probe mapping stays
        self.pump(0.02, step=0.005)
        self.clock.silent = False
        self.add(internal_port=18080)  # reuses the probe's nonce, so the CGN accepts it
        self.assertEqual(len(self.held()), 1)

    def test_external_address_probe(self):
        caller = Caller(SUB1, HOST)
        address = self.drive(self.iwf.external_address(caller))
        self.assertEqual(address, IPv4Address("5.5.5.5"))
        self.pump(1, step=0.01)
        self.assertEqual(self.held(), [])

    def test_external_address_never_reserved(self):
        self.cgn = LabCGN(CGNConfig(pool=(ip_network("100.64.0.1/32"),)), now=0)
        self.clock.cgn = self.cgn
        self.assertIsNone(self.drive(self.iwf.external_address(Caller(SUB1, HOST))))

    def test_connection_status(self):
        caller = Caller(SUB1, HOST)
        self.assertTrue(self.drive(self.iwf.connection_status(caller)))
        self.clock.silent = True
        self.pump(120)
        self.assertFalse(self.drive(self.iwf.connection_status(caller)))

    def test_release_subscriber_deletes_only_its_mappings(self):
        self.add(SUB1)
        self.add(SUB1, port=18082, internal_port=8082)
        self.add(SUB2, port=18081)
        self.assertEqual(self.iwf.release_subscriber(SUB1), 2)
        self.pump(1, step=0.01)
        self.assertEqual([h[0] for h in self.held()], ["0003ea"])
        self.assertEqual(self.iwf.mapping_count(SUB1), 0)
        self.assertEqual(len(self.store.rows), 1)

    def test_connection_status_is_evented(self):
        seen = []
        self.iwf.add_observer(SUB1, seen.append)
        self.assertTrue(self.iwf.state(SUB1)["connected"])
        self.clock.silent = True
        self.iwf.connection_status(Caller(SUB1, HOST))
        self.pump(120)
        self.assertIn({"connected": False}, seen)
        self.assertFalse(self.iwf.state(SUB1)["connected"])
        self.clock.silent = False
        self.assertTrue(self.drive(self.iwf.connection_status(Caller(SUB1, HOST))))
        self.assertEqual(seen[-1], {"connected": True})
        self.assertTrue(self.iwf.state(SUB1)["connected"])

    def test_observers(self):
        seen = []
        self.iwf.add_observer(SUB1, seen.append)
        self.add()
        self.drive(self.iwf.delete_mapping(Caller(SUB1, HOST), MappingKey(None, 18080, "TCP")))
        counts = [c["mappings"] for c in seen]
        self.assertEqual(counts[-2:], [1, 0])
        self.assertEqual(seen[0]["external_address"], IPv4Address("5.5.5.5"))
        self.assertEqual(self.iwf.state(SUB1)["mappings"], 0)
