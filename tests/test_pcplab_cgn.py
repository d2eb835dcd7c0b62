"""The lab CGN's core: every result code it can send, the table, time, and fuzz.

Requests are built with the codec and answers decoded with it, so these tests
read as PCP exchanges (RFC 6887, RFC 7843 section 5.2).
"""

import random
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.pcp import tpid
from igdpcp.pcp.codec import (
    ANY_IPV4,
    Description,
    Filter,
    MapBody,
    PCPDecodeError,
    PeerBody,
    PreferFailure,
    Request,
    ThirdParty,
    ThirdPartyId,
    UnknownOption,
    decode_request,
    decode_response,
    encode_request,
)
from igdpcp.pcp.constants import Opcode, ResultCode
from igdpcp.pcplab.cgn import LabCGN, Mapping
from igdpcp.pcplab.config import CGNConfig

R = ResultCode
CLIENT = "10.200.0.2"
HOST = IPv4Address("192.168.1.10")
NONCE = bytes(range(1, 13))
OTHER_NONCE = bytes(range(21, 33))
VNI1 = tpid.vxlan_vni(1001)
VNI2 = tpid.vxlan_vni(1002)
SUB1 = (ThirdParty(HOST), ThirdPartyId(VNI1))
SUB2 = (ThirdParty(HOST), ThirdPartyId(VNI2))
ONE_ADDRESS = (IPv4Network("5.5.5.5/32"),)


def map_request(lifetime=3600, internal_port=8080, external_port=0, external_address=ANY_IPV4,
                protocol=6, nonce=NONCE, options=SUB1, client=CLIENT):
    return encode_request(Request(
        Opcode.MAP, lifetime, IPv4Address(client),
        MapBody(nonce, protocol, internal_port, external_port, external_address), tuple(options),
    ))


def peer_request(lifetime=600, internal_port=5000, remote=("198.51.100.2", 443), options=SUB1,
                 nonce=NONCE, external_port=0):
    return encode_request(Request(
        Opcode.PEER, lifetime, IPv4Address(CLIENT),
        PeerBody(nonce, 17, internal_port, external_port, ANY_IPV4, remote[1], IPv4Address(remote[0])),
        tuple(options),
    ))


class CGNTestCase(SynchronousTestCase):
    settings = {}

    def setUp(self):
        self.now = 1000.0
        self.cgn = LabCGN(CGNConfig(**self.settings), self.now, random.Random(7))

    def raw(self, data, source=CLIENT, port=40000):
        return self.cgn.handle(data, source, port, self.now)

    def ask(self, data, source=CLIENT, port=40000):
        answer = self.raw(data, source, port)
        self.assertIsNotNone(answer)
        return decode_response(answer)

    def assertResult(self, data, result, lifetime=None, **kw):
        response = self.ask(data, **kw)
        self.assertEqual(ResultCode(response.result), result)
        if lifetime is not None:
            self.assertEqual(response.lifetime, lifetime)
        return response

    def configure(self, **settings):
        self.cgn = LabCGN(CGNConfig(**settings), self.now, random.Random(7))


class SuccessTests(CGNTestCase):
    def test_map_success_echoes_processed_options(self):
        options = SUB1 + (Description("game"), UnknownOption(200, b"abcd"))
        r = self.assertResult(map_request(external_port=18080, options=options), R.SUCCESS, 3600)
        self.assertEqual(r.opcode, Opcode.MAP)
        self.assertEqual(r.epoch, 0)
        self.assertEqual((r.body.nonce, r.body.protocol, r.body.internal_port), (NONCE, 6, 8080))
        self.assertEqual(r.body.external_port, 18080)  # suggestion honoured when free
        self.assertIn(r.body.external_address, CGNConfig().pool_addresses())
        # Processed options come back; the unknown optional one was ignored (section 7.3).
        self.assertEqual(r.options, SUB1 + (Description("game"),))
        [row] = self.cgn.snapshot(self.now)
        self.assertEqual(row["third_party_id"], "0003e9")
        self.assertEqual(row["internal_address"], "192.168.1.10")
        self.assertEqual((row["internal_port"], row["protocol"], row["external_port"]), (8080, 6, 18080))
        self.assertEqual((row["lifetime"], row["nonce"], row["description"]), (3600, NONCE.hex(), "game"))

    def test_lifetime_clamped(self):
        self.assertResult(map_request(lifetime=10), R.SUCCESS, 120)
        self.assertResult(map_request(lifetime=10**9), R.SUCCESS, 3600)

    def test_plain_map_uses_source_address(self):
        self.assertResult(map_request(options=()), R.SUCCESS)
        self.assertEqual(self.cgn.snapshot(self.now)[0]["internal_address"], CLIENT)
        self.assertEqual(self.cgn.snapshot(self.now)[0]["third_party_id"], "")

    def test_suggested_pool_address_honoured(self):
        r = self.assertResult(map_request(external_address=IPv4Address("5.5.5.3"), external_port=2000),
                              R.SUCCESS)
        self.assertEqual((r.body.external_address, r.body.external_port), (IPv4Address("5.5.5.3"), 2000))

    def test_subscriber_keeps_one_external_address(self):
        # Paired pooling: all of one THIRD_PARTY_ID's mappings share an address.
        addresses = {self.ask(map_request(internal_port=p)).body.external_address for p in range(1, 30)}
        self.assertEqual(len(addresses), 1)

    def test_announce(self):
        data = encode_request(Request(Opcode.ANNOUNCE, 0, IPv4Address(CLIENT)))
        self.now += 42
        r = self.assertResult(data, R.SUCCESS, 0)
        self.assertEqual((r.opcode, r.epoch, r.body, r.options), (Opcode.ANNOUNCE, 42, None, ()))

    def test_peer(self):
        r = self.assertResult(peer_request(options=SUB1 + (Description("x"),)), R.SUCCESS, 600)
        self.assertEqual(r.opcode, Opcode.PEER)
        self.assertNotEqual(r.body.external_port, 0)
        self.assertEqual((r.body.remote_port, r.body.remote_address), (443, IPv4Address("198.51.100.2")))
        self.assertEqual(r.options, SUB1 + (Description("x"),))

    def test_peer_shares_the_map_mapping(self):
        m = self.ask(map_request(internal_port=5000, protocol=17, lifetime=3600))
        p = self.assertResult(peer_request(lifetime=200), R.SUCCESS)
        self.assertEqual((p.body.external_address, p.body.external_port),
                         (m.body.external_address, m.body.external_port))
        self.assertEqual(p.lifetime, 3600)  # a PEER never shortens the mapping

    def test_udp_never_5350_5351(self):
        self.configure(pool=ONE_ADDRESS, port_range=(5350, 5352))
        r = self.assertResult(map_request(protocol=17, external_port=5351), R.SUCCESS)
        self.assertEqual(r.body.external_port, 5352)
        self.assertResult(map_request(protocol=17, internal_port=1), R.NO_RESOURCES)
        r = self.assertResult(map_request(protocol=6, external_port=5351), R.SUCCESS)
        self.assertEqual(r.body.external_port, 5351)  # TCP may have it


class OverlappingSubscriberTests(CGNTestCase):
    """RFC 7843 section 5.2: mappings are looked up by (THIRD_PARTY, THIRD_PARTY_ID)."""

    def test_same_internal_tuple_two_subscribers(self):
        self.configure(pool=ONE_ADDRESS)
        a = self.assertResult(map_request(external_port=18080, options=SUB1), R.SUCCESS)
        b = self.assertResult(map_request(external_port=18080, options=SUB2), R.SUCCESS)
        self.assertEqual(a.body.external_port, 18080)
        self.assertNotEqual(b.body.external_port, 18080)
        rows = self.cgn.snapshot(self.now)
        self.assertEqual(sorted(r["third_party_id"] for r in rows), ["0003e9", "0003ea"])
        self.assertEqual({r["internal_address"] for r in rows}, {"192.168.1.10"})

    def test_distinct_external_tuples_with_default_pool(self):
        a = self.ask(map_request(external_port=18080, options=SUB1))
        b = self.ask(map_request(external_port=18080, options=SUB2))
        self.assertNotEqual((a.body.external_address, a.body.external_port),
                            (b.body.external_address, b.body.external_port))

    def test_nonce_is_per_subscriber(self):
        self.assertResult(map_request(options=SUB1), R.SUCCESS)
        self.assertResult(map_request(options=SUB2, nonce=OTHER_NONCE), R.SUCCESS)
        self.assertResult(map_request(lifetime=0, options=(ThirdParty(HOST), ThirdPartyId(VNI2)),
                                      nonce=OTHER_NONCE), R.SUCCESS, 0)
        self.assertEqual(len(self.cgn), 1)


class NonceRenewDeleteTests(CGNTestCase):
    def test_other_nonce_not_authorized(self):
        self.ask(map_request(lifetime=600))
        self.now += 100
        self.assertResult(map_request(nonce=OTHER_NONCE), R.NOT_AUTHORIZED, 500)

    def test_renewal_keeps_external_port(self):
        first = self.ask(map_request(lifetime=600))
        self.now += 300
        again = self.assertResult(map_request(lifetime=600, external_port=first.body.external_port + 1),
                                  R.SUCCESS, 600)
        self.assertEqual(again.body.external_port, first.body.external_port)
        self.assertEqual(self.cgn.snapshot(self.now)[0]["lifetime"], 600)

    def test_renewal_with_prefer_failure(self):
        first = self.ask(map_request(external_port=18080, options=SUB1 + (PreferFailure(),)))
        self.assertEqual(first.body.external_port, 18080)
        self.assertResult(map_request(external_port=18080, options=SUB1 + (PreferFailure(),)), R.SUCCESS)
        # Section 11.3 item 1: the same internal tuple, another external port.
        self.assertResult(map_request(external_port=18081, options=SUB1 + (PreferFailure(),)),
                          R.CANNOT_PROVIDE_EXTERNAL, 3600)
        other = IPv4Address("5.5.5.6") if first.body.external_address != IPv4Address("5.5.5.6") \
            else IPv4Address("5.5.5.1")
        self.assertResult(map_request(external_port=18080, external_address=other,
                                      options=SUB1 + (PreferFailure(),)), R.CANNOT_PROVIDE_EXTERNAL)

    def test_delete(self):
        self.ask(map_request())
        r = self.assertResult(map_request(lifetime=0), R.SUCCESS, 0)
        self.assertEqual(len(self.cgn), 0)
        self.assertNotEqual(r.body.external_port, 0)  # names what was deleted
        # Idempotent: the mapping is gone, the answer is the same (section 15).
        self.assertResult(map_request(lifetime=0), R.SUCCESS, 0)

    def test_delete_with_other_nonce(self):
        self.ask(map_request(lifetime=600))
        self.now += 10
        self.assertResult(map_request(lifetime=0, nonce=OTHER_NONCE), R.NOT_AUTHORIZED, 590)
        self.assertEqual(len(self.cgn), 1)

    def test_all_ports_mapping_not_offered(self):
        self.assertResult(map_request(internal_port=0), R.NOT_AUTHORIZED)
        self.assertResult(map_request(internal_port=0, lifetime=0), R.SUCCESS, 0)


class TimeTests(CGNTestCase):
    def test_lazy_expiry(self):
        self.ask(map_request(lifetime=120))
        self.now += 121
        self.assertEqual(self.cgn.snapshot(self.now), [])
        self.assertResult(map_request(nonce=OTHER_NONCE), R.SUCCESS)  # old one expired
        self.assertEqual(len(self.cgn), 1)

    def test_sweep(self):
        for port in range(1, 6):
            self.ask(map_request(internal_port=port, lifetime=120 * port))
        self.assertEqual(self.cgn.expire(self.now + 250), 2)
        self.assertEqual(len(self.cgn), 3)
        self.assertEqual(self.cgn.counters["expired"], 2)

    def test_epoch_and_reboot(self):
        self.ask(map_request(), port=41000)
        self.now += 100
        self.assertEqual(self.ask(map_request()).epoch, 100)
        self.cgn.reboot(self.now)
        self.assertEqual(self.cgn.epoch(self.now), 0)
        self.assertEqual(len(self.cgn), 0)
        self.assertEqual(self.cgn.snapshot(self.now), [])
        self.assertEqual(set(self.cgn.announce_targets()), {(CLIENT, 40000), (CLIENT, 41000)})
        announce = decode_response(self.cgn.announce(self.now + 3))
        self.assertEqual((announce.opcode, announce.result, announce.lifetime, announce.epoch),
                         (Opcode.ANNOUNCE, R.SUCCESS, 0, 3))
        # A renewal after the reboot re-creates the mapping on the same address.
        self.assertResult(map_request(), R.SUCCESS)

    def test_multicast_announce_target(self):
        self.configure(announce_multicast=True)
        self.assertEqual(self.cgn.announce_targets(), [("224.0.0.1", 5350)])


class ErrorTests(CGNTestCase):
    """Every error result code, with the copied body and options (section 7.3)."""

    def test_error_copies_request(self):
        self.configure(known_third_party_ids=frozenset({VNI2}))
        options = SUB1 + (UnknownOption(200, b"abcd"), PreferFailure())
        r = self.assertResult(map_request(external_port=18080, options=options),
                              R.THIRD_PARTY_ID_UNKNOWN, 1800)
        self.assertEqual(r.options, options)
        self.assertEqual(r.body, MapBody(NONCE, 6, 8080, 18080, ANY_IPV4))
        self.assertEqual(len(self.cgn), 0)

    def test_not_authorized_2(self):
        self.ask(map_request())
        self.assertResult(map_request(nonce=OTHER_NONCE), R.NOT_AUTHORIZED)

    def test_malformed_request_3(self):
        self.assertResult(map_request(options=(ThirdParty(IPv4Address(CLIENT)),)), R.MALFORMED_REQUEST, 1800)
        self.assertResult(map_request(protocol=0, internal_port=80, options=()), R.MALFORMED_REQUEST)
        self.assertResult(peer_request(remote=("0.0.0.0", 443)), R.MALFORMED_REQUEST)

    def test_undecodable_copied_section_8_3(self):
        data = map_request() + b"\x01\x02"  # not a multiple of 4
        answer = self.raw(data)
        self.assertEqual(answer[:4], bytes([2, 0x81, 0, R.MALFORMED_REQUEST]))
        self.assertEqual(answer[12:24], data[12:24])  # last 96 bits of the client address
        self.assertEqual(answer[24:], data[24:len(data) - 2])
        self.assertEqual(decode_response(answer).body.nonce, NONCE)
        short = self.raw(bytes([2, 1, 0, 0, 0, 0, 0, 9]))
        self.assertEqual((len(short), short[3]), (24, R.MALFORMED_REQUEST))

    def test_unsupp_opcode_4(self):
        for opcode in (3, 9, 127):
            data = bytearray(encode_request(Request(Opcode.ANNOUNCE, 0, IPv4Address(CLIENT))))
            data[1] = opcode
            answer = self.raw(bytes(data))
            self.assertEqual(answer[:4], bytes([2, 0x80 | opcode, 0, R.UNSUPP_OPCODE]))
            self.assertEqual(answer[4:8], (1800).to_bytes(4, "big"))

    def test_unsupp_option_5(self):
        self.assertResult(map_request(options=SUB1 + (UnknownOption(99, b""),)), R.UNSUPP_OPTION, 1800)
        announce = encode_request(Request(Opcode.ANNOUNCE, 0, IPv4Address(CLIENT),
                                          options=(UnknownOption(99, b""),)))
        self.assertResult(announce, R.UNSUPP_OPTION)
        self.configure(allow_third_party=False)
        self.assertResult(map_request(options=(ThirdParty(HOST),)), R.UNSUPP_OPTION)
        self.configure(third_party_id="unsupported")  # as miniupnpd answers option 13
        self.assertResult(map_request(options=SUB1), R.UNSUPP_OPTION)
        self.assertResult(map_request(options=(ThirdParty(HOST),)), R.SUCCESS)
        self.configure(max_filters=0)
        self.assertResult(map_request(options=(Filter(128, 0, IPv4Address("198.51.100.2")),)),
                          R.UNSUPP_OPTION)

    def test_malformed_option_6(self):
        pf = SUB1 + (PreferFailure(),)
        self.assertResult(map_request(external_port=0, options=pf), R.MALFORMED_OPTION, 1800)
        self.assertResult(map_request(lifetime=0, external_port=80, options=pf), R.MALFORMED_OPTION)
        f = Filter(120, 0, IPv4Address("198.51.100.0"))
        self.assertResult(map_request(lifetime=0, options=SUB1 + (f,)), R.MALFORMED_OPTION)
        bad_prefix = Filter(64, 0, IPv4Address("198.51.100.0"))  # IPv4 needs 96..128
        self.assertResult(map_request(options=SUB1 + (bad_prefix,)), R.MALFORMED_OPTION)
        answer = self.raw(map_request(options=SUB1 + (PreferFailure(), PreferFailure()), external_port=1))
        self.assertEqual(answer[3], R.MALFORMED_OPTION)  # from the codec, copied

    def test_no_resources_8(self):
        self.configure(pool=ONE_ADDRESS, port_range=(20000, 20001), max_lifetime=3600)
        self.assertResult(map_request(internal_port=1, lifetime=120), R.SUCCESS)
        self.assertResult(map_request(internal_port=2), R.SUCCESS)
        self.assertResult(map_request(internal_port=3), R.NO_RESOURCES, 30)
        self.assertResult(map_request(internal_port=3, protocol=17), R.SUCCESS)  # UDP has its own ports
        self.now += 200
        self.cgn.expire(self.now)
        self.assertResult(map_request(internal_port=3), R.SUCCESS)

    def test_unsupp_protocol_9(self):
        self.assertResult(map_request(protocol=132), R.UNSUPP_PROTOCOL, 1800)
        self.assertResult(map_request(protocol=0, internal_port=0, options=()), R.UNSUPP_PROTOCOL)

    def test_user_ex_quota_10(self):
        self.configure(quota=2)
        self.assertResult(map_request(internal_port=1), R.SUCCESS)
        self.assertResult(map_request(internal_port=2, options=(ThirdParty(IPv4Address("192.168.1.11")),
                                                                ThirdPartyId(VNI1))), R.SUCCESS)
        # Per THIRD_PARTY_ID: the subscriber's second host counted too.
        self.assertResult(map_request(internal_port=3), R.USER_EX_QUOTA, 30)
        self.assertResult(map_request(internal_port=3, options=SUB2), R.SUCCESS)
        # Renewals do not count.
        self.assertResult(map_request(internal_port=1), R.SUCCESS)
        # Without an ID, per internal address.
        for port in (1, 2):
            self.assertResult(map_request(internal_port=port, options=()), R.SUCCESS)
        self.assertResult(map_request(internal_port=3, options=()), R.USER_EX_QUOTA)
        self.assertResult(map_request(internal_port=1, lifetime=0), R.SUCCESS, 0)
        self.assertResult(map_request(internal_port=3), R.SUCCESS)

    def test_cannot_provide_external_11(self):
        self.configure(pool=ONE_ADDRESS)
        self.ask(map_request(external_port=18080, lifetime=600, options=SUB1))
        self.now += 100
        pf = SUB2 + (PreferFailure(),)
        # Lifetime: what is left of the mapping in the way (section 13.2).
        r = self.assertResult(map_request(external_port=18080, options=pf), R.CANNOT_PROVIDE_EXTERNAL, 500)
        self.assertEqual(r.body.external_port, 18080)
        self.assertResult(map_request(external_port=18080, external_address=IPv4Address("5.5.5.9"),
                                      options=pf), R.CANNOT_PROVIDE_EXTERNAL)
        self.assertResult(map_request(protocol=17, external_port=5351, options=pf),
                          R.CANNOT_PROVIDE_EXTERNAL)
        self.assertResult(map_request(external_port=18081, options=pf), R.SUCCESS)

    def test_address_mismatch_12(self):
        self.assertResult(map_request(client="10.200.0.3"), R.ADDRESS_MISMATCH, 1800)
        # An IPv4-mapped source (dual-stack socket) is the same address.
        self.assertResult(map_request(), R.SUCCESS, source="::ffff:" + CLIENT)

    def test_excessive_remote_peers_13(self):
        filters = tuple(Filter(128, 0, IPv4Address(f"198.51.100.{i}")) for i in range(5))
        self.assertResult(map_request(options=SUB1 + filters), R.EXCESSIVE_REMOTE_PEERS, 1800)
        r = self.assertResult(map_request(options=SUB1 + filters[:4]), R.SUCCESS)
        self.assertEqual(r.options, SUB1 + filters[:4])
        self.assertResult(map_request(options=SUB1 + filters[4:]), R.EXCESSIVE_REMOTE_PEERS)
        # A prefix-0 FILTER removes the old ones first (section 13.3).
        clear = Filter(0, 0, ANY_IPV4)
        self.assertResult(map_request(options=SUB1 + (clear,) + filters[4:]), R.SUCCESS)
        self.assertEqual(self.cgn.snapshot(self.now)[0]["filters"], ["198.51.100.4/32 port 0"])

    def test_third_party_id_unknown_24(self):
        self.configure(known_third_party_ids=frozenset({VNI1}))
        self.assertResult(map_request(options=SUB1), R.SUCCESS)
        self.assertResult(map_request(options=SUB2), R.THIRD_PARTY_ID_UNKNOWN, 1800)

    def test_third_party_missing_option_25(self):
        self.assertResult(map_request(options=(ThirdPartyId(VNI1),)), R.THIRD_PARTY_MISSING_OPTION, 1800)
        self.assertResult(peer_request(options=(ThirdPartyId(VNI1),)), R.THIRD_PARTY_MISSING_OPTION)
        self.configure(require_third_party_id=True)
        self.assertResult(map_request(options=(ThirdParty(HOST),)), R.THIRD_PARTY_MISSING_OPTION)
        self.assertResult(map_request(options=SUB1), R.SUCCESS)

    def test_unsupp_third_party_id_length_26(self):
        self.configure(third_party_id_lengths=frozenset({3}))
        self.assertResult(map_request(options=SUB1), R.SUCCESS)
        self.assertResult(map_request(options=(ThirdParty(HOST), ThirdPartyId(tpid.gre_key(7)))),
                          R.UNSUPP_THIRD_PARTY_ID_LENGTH, 1800)

    def test_unsupp_version(self):
        data = bytearray(map_request())
        data[0] = 3
        answer = self.raw(bytes(data))
        self.assertEqual(len(answer), 24)  # header only
        self.assertEqual(answer[:4], bytes([2, 0x81, 0, R.UNSUPP_VERSION]))
        self.assertEqual(answer[12:24], data[12:24])
        r = decode_response(answer)
        self.assertEqual((r.lifetime, r.body), (1800, None))
        natpmp = self.raw(bytes([0, 1, 0, 0, 0x1F, 0x90, 0x1F, 0x90, 0, 0, 0x0E, 0x10]))
        self.assertEqual((len(natpmp), natpmp[0], natpmp[3]), (24, 2, R.UNSUPP_VERSION))

    def test_drops_and_counters(self):
        self.assertIsNone(self.raw(b"\x02\x01"))
        self.assertIsNone(self.raw(b""))
        response = bytearray(map_request())
        response[1] |= 0x80
        self.assertIsNone(self.raw(bytes(response)))
        self.ask(map_request())
        self.ask(map_request(protocol=132))
        self.ask(map_request(protocol=133))
        c = self.cgn.counters
        self.assertEqual((c["dropped.short"], c["dropped.response"]), (2, 1))
        self.assertEqual((c["result.SUCCESS"], c["result.UNSUPP_PROTOCOL"]), (1, 2))
        self.assertEqual(c["received"], 6)
        self.assertEqual(self.cgn.stats(self.now)["counters"]["result.SUCCESS"], 1)


class MemoryTests(SynchronousTestCase):
    def test_mapping_has_slots(self):
        self.assertFalse(hasattr(Mapping(b"", b"", 0, 0.0), "__dict__"))


# --------------------------------------------------------------------- fuzz

_nonces = st.binary(min_size=12, max_size=12)
_addresses = st.sampled_from([IPv4Address(CLIENT), HOST, IPv4Address("5.5.5.3"), ANY_IPV4])
_options = st.lists(st.one_of(
    st.just(ThirdParty(HOST)), st.just(ThirdParty(IPv4Address(CLIENT))), st.just(PreferFailure()),
    st.builds(ThirdPartyId, st.binary(min_size=1, max_size=12)),
    st.builds(Filter, st.integers(0, 128), st.integers(0, 65535), _addresses),
    st.builds(Description, st.text(max_size=8)),
    st.builds(UnknownOption, st.sampled_from([99, 200, 0, 127, 255]), st.binary(max_size=8)),
), max_size=6).map(tuple)
_requests = st.one_of(
    st.builds(Request, st.just(Opcode.MAP), st.sampled_from([0, 1, 120, 3600, 2**32 - 1]), _addresses,
              st.builds(MapBody, _nonces, st.sampled_from([0, 6, 17, 132]), st.integers(0, 65535),
                        st.sampled_from([0, 5350, 5351, 18080, 65535]), _addresses), _options),
    st.builds(Request, st.just(Opcode.PEER), st.sampled_from([0, 600]), _addresses,
              st.builds(PeerBody, _nonces, st.sampled_from([0, 6, 17]), st.integers(0, 65535),
                        st.integers(0, 65535), _addresses, st.integers(0, 65535), _addresses),
              _options.map(lambda os: tuple(o for o in os if not isinstance(o, (PreferFailure, Filter))))),
    st.builds(Request, st.just(Opcode.ANNOUNCE), st.just(0), _addresses, st.none(), st.just(())),
)


def _encodable(request):
    try:
        return encode_request(request)
    except ValueError:
        return None


class FuzzTests(SynchronousTestCase):
    """Nothing a peer sends makes ``handle`` raise, and every answer is a valid response."""

    def setUp(self):
        self.cgn = LabCGN(CGNConfig(pool=ONE_ADDRESS, port_range=(18000, 18063), quota=8,
                                    known_third_party_ids=None), 0.0, random.Random(3))

    def check(self, data, now=1.0):
        answer = self.cgn.handle(data, CLIENT, 40000, now)
        if answer is None:
            self.assertTrue(len(data) < 4 or data[1] & 0x80)
            return
        self.assertLessEqual(len(answer), 1100)
        self.assertEqual(len(answer) % 4, 0)
        self.assertEqual(answer[:2], bytes([2, 0x80 | data[1] & 0x7F]))
        try:
            decode_request(data)
        except PCPDecodeError:
            self.assertNotEqual(answer[3], 0)  # a copy of a bad request: an error header
        else:
            self.assertEqual(decode_response(answer).opcode, data[1] & 0x7F)

    @given(st.binary(max_size=1200))
    @settings(max_examples=1500)
    def test_random_bytes(self, data):
        self.check(data)

    @given(st.lists(st.tuples(_requests, st.floats(0, 5000)), min_size=1, max_size=20))
    @settings(max_examples=300)
    def test_request_sequences(self, steps):
        for request, now in steps:
            data = _encodable(request)
            if data is not None:
                self.check(data, now)

    @given(_requests, st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1,
                               max_size=6), st.integers(-8, 8))
    @settings(max_examples=1000)
    def test_mutated_requests(self, request, flips, resize):
        data = _encodable(request)
        if data is None:
            return
        data = bytearray(data)
        for pos, value in flips:
            data[pos % len(data)] = value
        if resize > 0:
            data += bytes(resize)
        elif resize < 0:
            del data[resize:]
        self.check(bytes(data))
