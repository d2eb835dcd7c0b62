"""Host setup that keeps kernel replies in their own tunnel (igdpcp.tunnels.hostsetup).

The planner is tested on hand-made snapshots.  The lab test builds the leak
of notes/lab.md section 3 for real -- an ``iwf`` namespace with two veth
tunnels that both carry 192.168.1.1/24, behind each a subscriber at
192.168.1.10 -- shows that subscriber 2's RST lands at subscriber 1, then
runs the command line and shows that it no longer does.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr, redirect_stdout
from unittest import TestCase

from igdpcp.tunnels import hostsetup as hs
from igdpcp.tunnels.hostsetup import (
    FWMARK_REFLECT, RP_FILTER_ALL, TCP_FWMARK_ACCEPT, HostState, Link, NftState, Settings,
)

from . import netlab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = hs.DEFAULT_MARK_BASE
GOOD_SYSCTLS = {FWMARK_REFLECT: 1, TCP_FWMARK_ACCEPT: 1, RP_FILTER_ALL: 0}
TUN1 = Link("tun1", 5, (("192.168.1.0/24", "192.168.1.1"),), 0)
TUN2 = Link("tun2", 7, (("192.168.1.0/24", "192.168.1.1"),), 0)
LO = Link("lo", 1)


def state(*, sysctls=GOOD_SYSCTLS, links=(LO, TUN1, TUN2), rules=(), routes=(), nft=None):
    return HostState(dict(sysctls), {l.name: l for l in links}, frozenset(rules), frozenset(routes), nft)


def complete(links=(LO, TUN1, TUN2), tunnels=("tun1", "tun2")):
    by_name = {l.name: l for l in links}
    marks = {n: BASE + by_name[n].index for n in tunnels}
    routes = {(marks[n], net, by_name[n].index) for n in tunnels for net, _ in by_name[n].subnets}
    return state(links=links, rules=marks.values(), routes=routes, nft=NftState(True, marks))


def ops(plan):
    return [c.op for c in plan.changes]


class SettingsTests(TestCase):
    def test_mark_is_base_plus_ifindex_and_back(self):
        s = Settings()
        self.assertEqual(s.mark(5), 0x49470005)
        self.assertEqual(s.ifindex(0x49470005), 5)
        self.assertIsNone(s.ifindex(5))  # below the base: not ours
        self.assertIsNone(Settings(mark_base=0xFFFFFF00).mark(0x100))  # over 32 bits
        self.assertEqual(Settings(mark_base=10000).mark(3), 10003)

    def test_bad_settings(self):
        self.assertRaises(ValueError, Settings, mark_base=0)
        self.assertRaises(ValueError, Settings, priority=32766)

    def test_sysctl_paths(self):
        self.assertEqual(hs._sysctl_path("net.ipv4.fwmark_reflect"), "/proc/sys/net/ipv4/fwmark_reflect")
        self.assertEqual(hs._sysctl_path(hs.rp_filter_key("eth0.100")),
                         "/proc/sys/net/ipv4/conf/eth0.100/rp_filter")


class PlanTests(TestCase):
    def test_bare_host_needs_everything(self):
        plan = hs.plan(state(sysctls={FWMARK_REFLECT: 0, TCP_FWMARK_ACCEPT: 0, RP_FILTER_ALL: 0}),
                       ["tun1", "tun2"])
        self.assertEqual(ops(plan), [
            ("sysctl", FWMARK_REFLECT, 1), ("sysctl", TCP_FWMARK_ACCEPT, 1),
            ("nft-table", False), ("nft-add", "tun1", BASE + 5), ("nft-add", "tun2", BASE + 7),
            ("rule-add", BASE + 5), ("route-add", BASE + 5, "192.168.1.0/24", 5, "192.168.1.1"),
            ("rule-add", BASE + 7), ("route-add", BASE + 7, "192.168.1.0/24", 7, "192.168.1.1"),
        ])
        self.assertFalse(plan.clean)
        # Every line names its interface (or "host"), nothing else identifying.
        self.assertEqual({c.subject for c in plan.changes}, {"host", "tun1", "tun2"})
        self.assertIn("no ip rule fwmark 0x49470007 lookup 1229389831",
                      [c.problem for c in plan.changes if c.subject == "tun2"])

    def test_complete_host_is_clean(self):
        self.assertTrue(hs.plan(complete(), ["tun1", "tun2"]).clean)

    def test_rp_filter_strict_anywhere_is_loosened_on_the_tunnel_only(self):
        cases = [((1, 0), True), ((0, 1), True), ((1, 2), False), ((2, 1), False), ((2, 0), False),
                 ((0, 0), False)]
        for (all_, own), fixed in cases:
            links = (LO, Link("tun1", 5, TUN1.subnets, own), TUN2)
            s = complete(links=links)
            s = HostState(dict(GOOD_SYSCTLS, **{RP_FILTER_ALL: all_}), s.links, s.rules, s.routes, s.nft)
            plan = hs.plan(s, ["tun1", "tun2"])
            want = [("sysctl", "net.ipv4.conf.tun1.rp_filter", 2)] if fixed else []
            if all_ == 1:  # tun2 (own 0) is strict too
                want.append(("sysctl", "net.ipv4.conf.tun2.rp_filter", 2))
            self.assertEqual(ops(plan), want, (all_, own))

    def test_missing_interface_and_overflow_are_errors(self):
        plan = hs.plan(complete(), ["tun1", "tun2", "tun9"])
        self.assertEqual(plan.changes, ())
        self.assertEqual(plan.errors, ("tun9: no such interface",))
        big = Link("tun3", 2**31 - 1)
        plan = hs.plan(state(links=(LO, big)), ["tun3"], Settings(mark_base=0xF0000000))
        self.assertIn("exceeds 32 bits", plan.errors[0])

    def test_recreated_interface_gets_its_new_mark(self):
        # tun2 was ifindex 7 when set up; now it is 9.  Old rule: interface gone.
        old = complete()
        new_tun2 = Link("tun2", 9, TUN2.subnets, 0)
        s = HostState(old.sysctls, dict(old.links, tun2=new_tun2), old.rules,
                      frozenset(r for r in old.routes if r[2] != 7), old.nft)
        self.assertEqual(ops(hs.plan(s, ["tun1", "tun2"])), [
            ("nft-replace", "tun2", BASE + 9), ("rule-del", BASE + 7),
            ("rule-add", BASE + 9), ("route-add", BASE + 9, "192.168.1.0/24", 9, "192.168.1.1"),
        ])

    def test_gone_and_unlisted_tunnels(self):
        s = complete()
        # tun2 still exists but is not listed: kept, unless prune.
        self.assertTrue(hs.plan(s, ["tun1"]).clean)
        self.assertEqual(ops(hs.plan(s, ["tun1"], prune=True)), [
            ("nft-del", "tun2"), ("rule-del", BASE + 7), ("route-del", BASE + 7, "192.168.1.0/24", 7)])
        # tun2 is gone (its routes went with it): stale, always removed.
        gone = HostState(s.sysctls, {"lo": LO, "tun1": TUN1}, s.rules,
                         frozenset(r for r in s.routes if r[2] != 7), s.nft)
        plan = hs.plan(gone, ["tun1"])
        self.assertEqual(ops(plan), [("nft-del", "tun2"), ("rule-del", BASE + 7)])
        self.assertEqual([c.subject for c in plan.changes], ["tun2", "ifindex 7"])

    def test_changed_subnet(self):
        moved = Link("tun1", 5, (("10.0.0.0/30", "10.0.0.1"),), 0)
        s = complete()
        s = HostState(s.sysctls, dict(s.links, tun1=moved), s.rules, s.routes, s.nft)
        self.assertEqual(ops(hs.plan(s, ["tun1", "tun2"])), [
            ("route-add", BASE + 5, "10.0.0.0/30", 5, "10.0.0.1"),
            ("route-del", BASE + 5, "192.168.1.0/24", 5)])

    def test_foreign_nft_table_contents_are_replaced_keeping_live_elements(self):
        s = complete()
        s = HostState(s.sysctls, s.links, s.rules, s.routes, NftState(False, dict(s.nft.elements)))
        plan = hs.plan(s, ["tun1"])
        self.assertEqual(ops(plan), [("nft-table", True), ("nft-add", "tun1", BASE + 5)])
        script = hs.nft_script(plan.changes, s)
        self.assertEqual(script[:2], ["table inet igdpcp {}", "delete table inet igdpcp"])
        self.assertIn('"tun2" : 0x49470007', script[-1])  # kept: tun2 is alive
        self.assertIn('"tun1" : 0x49470005', script[-1])

    def test_unreadable_nft_is_one_error_not_a_missing_table(self):
        s = complete()
        s = HostState(s.sysctls, s.links, s.rules, s.routes, None,
                      ("host: nft list failed: Operation not permitted",), nft_readable=False)
        plan = hs.plan(s, ["tun1", "tun2"])
        self.assertEqual(plan.changes, ())
        self.assertEqual(plan.errors, ("host: nft list failed: Operation not permitted",))

    def test_no_tunnels_no_table(self):
        self.assertTrue(hs.plan(state(sysctls={}), []).clean)

    def test_remove(self):
        s = complete()
        self.assertEqual(ops(hs.plan_remove(s, ["tun2"])), [
            ("nft-del", "tun2"), ("rule-del", BASE + 7), ("route-del", BASE + 7, "192.168.1.0/24", 7)])
        everything = ops(hs.plan_remove(s))
        self.assertEqual(everything[0], ("nft-drop",))
        self.assertEqual(sorted(o for o in everything if o[0] == "rule-del"),
                         [("rule-del", BASE + 5), ("rule-del", BASE + 7)])
        self.assertTrue(hs.plan_remove(state()).clean)


class NftTextTests(TestCase):
    LISTED = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "igdpcp", "handle": 1}},
        {"map": {"family": "inet", "name": "tunnel_marks", "table": "igdpcp", "type": "ifname",
                 "handle": 2, "map": "mark", "elem": [["tun1", BASE + 5], ["tun2", BASE + 7]]}},
        {"chain": {"family": "inet", "table": "igdpcp", "name": "prerouting", "handle": 1,
                   "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "igdpcp", "chain": "prerouting", "handle": 3,
                  "expr": hs._EXPECTED_RULE}},
    ]}

    def test_parse(self):
        got = hs.parse_nft_json(json.dumps(self.LISTED))
        self.assertEqual(got, NftState(True, {"tun1": BASE + 5, "tun2": BASE + 7}))
        extra = json.loads(json.dumps(self.LISTED))
        extra["nftables"].append(dict(extra["nftables"][-1]))
        self.assertFalse(hs.parse_nft_json(json.dumps(extra)).skeleton_ok)

    def test_element_changes_in_one_transaction(self):
        s = complete()
        changes = hs.plan(HostState(s.sysctls, dict(s.links, tun2=Link("tun2", 9)), s.rules, s.routes,
                                    s.nft), ["tun1", "tun2"]).changes
        script = hs.nft_script(changes, s)
        self.assertEqual(script, ['delete element inet igdpcp tunnel_marks { "tun2" }',
                                  'add element inet igdpcp tunnel_marks { "tun2" : 0x49470009 }'])

    def test_large_sets_are_chunked(self):
        lines = hs._add_elements({f"t{i}": BASE + i for i in range(2500)})
        self.assertEqual(len(lines), 3)

    def test_create_script(self):
        text = "\n".join(hs.nft_table_script({"tun1": BASE + 5}, replace=False))
        self.assertIn("meta mark set iifname map @tunnel_marks", text)
        self.assertIn("type filter hook prerouting priority mangle", text)


def nlmsg(kind, header, attrs):
    body = header
    for attr_type, value in attrs:
        length = 4 + len(value)
        body += struct.pack("=HH", length, attr_type) + value + b"\0" * (-length % 4)
    return struct.pack("=LHHLL", 16 + len(body), kind, 2, 1, 0) + body


def u32(value):
    return struct.pack("=L", value)


class NetlinkDumpTests(TestCase):
    """The rtnetlink dump reader, on messages laid out as the kernel sends them."""

    def test_rules(self):
        hdr = struct.pack("=BBBBBBBBL", 2, 0, 0, 0, 252, 0, 0, 1, 0)  # table 252: use FRA_TABLE
        ours = nlmsg(32, hdr, [(hs.FRA_PRIORITY, u32(10000)), (hs.FRA_FWMARK, u32(BASE + 5)),
                               (hs.FRA_TABLE, u32(BASE + 5))])
        other_prio = nlmsg(32, hdr, [(hs.FRA_PRIORITY, u32(100)), (hs.FRA_FWMARK, u32(BASE + 6)),
                                     (hs.FRA_TABLE, u32(BASE + 6))])
        masked = nlmsg(32, hdr, [(hs.FRA_PRIORITY, u32(10000)), (hs.FRA_FWMARK, u32(BASE + 7)),
                                 (hs.FRA_FWMASK, u32(0xFFFF0000)), (hs.FRA_TABLE, u32(BASE + 7))])
        main = nlmsg(32, struct.pack("=BBBBBBBBL", 2, 0, 0, 0, 254, 0, 0, 1, 0),
                     [(hs.FRA_PRIORITY, u32(32766))])
        done = struct.pack("=LHHLL", 20, hs.NLMSG_DONE, 2, 1, 0) + u32(0)
        dump = hs.parse_dump([ours + other_prio, masked + main + done, b"never read"], 12)
        self.assertEqual(len(dump), 4)
        self.assertEqual(hs.rules_from_dump(dump, Settings()), {BASE + 5})

    def test_routes_and_addresses(self):
        rt = struct.pack("=BBBBBBBBL", 2, 24, 0, 0, 252, 4, 253, 1, 0)
        ours = nlmsg(24, rt, [(hs.RTA_TABLE, u32(BASE + 5)), (hs.RTA_DST, bytes([192, 168, 1, 0])),
                              (hs.RTA_OIF, u32(5))])
        main = nlmsg(24, struct.pack("=BBBBBBBBL", 2, 24, 0, 0, 254, 2, 253, 1, 0),
                     [(hs.RTA_TABLE, u32(254)), (hs.RTA_DST, bytes([192, 168, 1, 0])), (hs.RTA_OIF, u32(5))])
        dump = hs.parse_dump([ours + main], 12)
        self.assertEqual(hs.routes_from_dump(dump, {BASE + 5}), {(BASE + 5, "192.168.1.0/24", 5)})
        ifa = struct.pack("=BBBBL", 2, 24, 0, 0, 5)
        lan = nlmsg(20, ifa, [(hs.IFA_ADDRESS, bytes([192, 168, 1, 1])),
                              (hs.IFA_LOCAL, bytes([192, 168, 1, 1]))])
        p2p = nlmsg(20, struct.pack("=BBBBL", 2, 32, 0, 0, 6),
                    [(hs.IFA_ADDRESS, bytes([10, 0, 0, 2])), (hs.IFA_LOCAL, bytes([10, 0, 0, 1]))])
        host = nlmsg(20, struct.pack("=BBBBL", 2, 32, 0, 0, 7),
                     [(hs.IFA_ADDRESS, bytes([10, 0, 0, 9])), (hs.IFA_LOCAL, bytes([10, 0, 0, 9]))])
        subnets = hs.subnets_from_addrs(hs.parse_dump([lan + p2p + host], 8))
        self.assertEqual(subnets, {5: [("192.168.1.0/24", "192.168.1.1")], 6: [("10.0.0.2/32", "10.0.0.1")]})

    def test_error_message_raises(self):
        error = struct.pack("=LHHLL", 36, hs.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
        with self.assertRaises(OSError) as caught:
            hs.parse_dump([error], 12)
        self.assertEqual(caught.exception.errno, 1)


class CommandLineUsageTests(TestCase):
    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = hs.main(list(argv))
            except SystemExit as e:
                code = e.code
        return code, out.getvalue() + err.getvalue()

    def test_needs_a_mode_and_interfaces(self):
        self.assertEqual(self.run_main("tun1")[0], 2)
        code, text = self.run_main("--check")
        self.assertEqual(code, 2)
        self.assertIn("name the tunnel interfaces", text)
        self.assertEqual(self.run_main("--check", "--priority", "40000", "tun1")[0], 2)


# -- on a real network ---------------------------------------------------------

SNIFFER = textwrap.dedent("""
    import socket, struct, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind(("eth0", 0))
    s.settimeout(0.1)
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        try:
            frame = s.recv(2048)
        except socket.timeout:
            continue
        ip = frame[14:]
        if len(ip) < 40 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
        if ip[ihl + 13] & 0x04:
            print("RST", socket.inet_ntoa(ip[12:16]), sport, "->", socket.inet_ntoa(ip[16:20]), dport,
                  flush=True)
""")

CONNECT = textwrap.dedent("""
    import socket, time
    s = socket.socket()
    s.settimeout(1.0)
    t = time.monotonic()
    try:
        s.connect(("192.168.1.1", 9))
        print("connected")
    except ConnectionRefusedError:
        print("refused %.3f" % (time.monotonic() - t))
    except socket.timeout:
        print("timeout %.3f" % (time.monotonic() - t))
""")


class LeakAndFixTests(TestCase):
    """Two tunnels with identical addresses; subscriber 2 connects to a closed port."""

    def setUp(self):
        netlab.skip_unless_netns("python3")
        if shutil.which("nft") is None:
            self.skipTest("needs nft")
        self.lab = lab = netlab.Lab("hst")
        self.addCleanup(lab.teardown)
        self.iwf = lab.netns("iwf")
        self.subs = [lab.netns(f"s{i}") for i in (1, 2)]
        for i, ns in enumerate(self.subs, 1):
            self.tunnel(i)

    def tunnel(self, i):
        self.lab.veth((self.iwf, f"tun{i}", "192.168.1.1/24"), (self.subs[i - 1], "eth0", "192.168.1.10/24"))

    def cli(self, *args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "igdpcp.tunnels.hostsetup", "--netns", self.iwf, *args],
                              capture_output=True, text=True, timeout=60, env=env)
        return proc.returncode, proc.stdout + proc.stderr

    def connect_from_s2(self):
        """(what subscriber 2 saw, the RSTs subscriber 1 received meanwhile)."""
        sniffer = self.lab.spawn(self.subs[0], [sys.executable, "-c", SNIFFER, "1.5"],
                                 name=f"sniff{time.monotonic_ns()}")
        deadline = time.monotonic() + 5
        while "ready" not in sniffer.log():
            self.assertTrue(sniffer.running(), sniffer.log())
            self.assertLess(time.monotonic(), deadline, "sniffer did not start")
            time.sleep(0.02)
        seen = self.lab.run(self.subs[1], [sys.executable, "-c", CONNECT], timeout=10).stdout.strip()
        sniffer.popen.wait(timeout=10)
        rsts = [line for line in sniffer.log().splitlines() if line.startswith("RST")]
        return seen, rsts

    def ping_from_s2(self):
        proc = self.lab.run(self.subs[1], ["ping", "-n", "-c", "1", "-W", "1", "192.168.1.1"], check=False)
        return proc.returncode == 0

    def test_leak_then_apply_check_remove(self):
        has_ping = shutil.which("ping") is not None
        # 1. The leak: subscriber 2's SYN is answered by a RST that goes to subscriber 1.
        code, text = self.cli("--check", "tun1", "tun2")
        self.assertEqual(code, 1, text)
        for line in ("MISSING host: net.ipv4.fwmark_reflect is 0",
                     'MISSING tun2: no nft mark (iifname "tun2"',
                     "MISSING tun2: no ip rule fwmark", "MISSING tun2: no route 192.168.1.0/24 dev tun2"):
            self.assertIn(line, text)
        seen, rsts = self.connect_from_s2()
        self.assertTrue(seen.startswith("timeout"), seen)
        self.assertTrue(rsts, "subscriber 1 received no RST")
        self.assertTrue(all(r.startswith("RST 192.168.1.1 9 -> 192.168.1.10") for r in rsts), rsts)
        if has_ping:
            self.assertFalse(self.ping_from_s2())

        # 2. Apply: the RST reaches subscriber 2, promptly, and nothing reaches subscriber 1.
        code, text = self.cli("--apply", "tun1", "tun2")
        self.assertEqual(code, 0, text)
        self.assertIn("DONE tun2: add ip rule fwmark", text)
        seen, rsts = self.connect_from_s2()
        self.assertTrue(seen.startswith("refused"), seen)
        self.assertLess(float(seen.split()[1]), 0.5)
        self.assertEqual(rsts, [])
        if has_ping:
            self.assertTrue(self.ping_from_s2())
        self.assertEqual(self.cli("--check", "tun1", "tun2"), (0, "OK host setup in place for 2 tunnel(s)\n"))
        code, text = self.cli("--apply", "tun1", "tun2")
        self.assertEqual((code, text.splitlines()), (0, ["OK nothing to do (2 tunnel(s))"]))

        # 3. tun2 is deleted and re-created (new ifindex): check sees it, apply fixes it.
        self.lab.ip("link", "del", "tun2", ns=self.iwf)
        self.tunnel(2)
        code, text = self.cli("--check", "tun1", "tun2")
        self.assertEqual(code, 1, text)
        self.assertIn("(interface re-created)", text)
        self.assertIn("(interface gone)", text)
        self.assertEqual(self.cli("--apply", "tun1", "tun2")[0], 0)
        self.assertTrue(self.connect_from_s2()[0].startswith("refused"))

        # 4. The same, from an igdpcp config file.
        config = os.path.join(self.lab.workdir, "igdpcp.toml")
        with open(config, "w") as f:
            for i in (1, 2):
                f.write(f'[[tunnels]]\ninterface = "tun{i}"\naddress = "192.168.1.1"\n'
                        f'third_party_id = "vxlan:{1000 + i}"\n')
        self.assertEqual(self.cli("--check", "--config", config)[0], 0)

        # 5. Remove one tunnel's setup, then everything.
        code, text = self.cli("--remove", "tun2")
        self.assertEqual(code, 0, text)
        self.assertEqual(self.cli("--check", "tun1")[0], 0)
        code, text = self.cli("--check", "tun2")
        self.assertEqual(code, 1)
        self.assertNotIn("host:", text)  # the sysctls stay
        self.assertTrue(self.connect_from_s2()[0].startswith("timeout"))  # leaking again
        self.assertEqual(self.cli("--remove")[0], 0)
        rules = self.lab.ip("rule", "show", ns=self.iwf)
        self.assertNotIn("fwmark", rules)
        tables = self.lab.run(self.iwf, ["nft", "list", "tables"]).stdout
        self.assertNotIn("igdpcp", tables)
        self.assertEqual(self.lab.ip("route", "show", "table", "all", "proto", "static", ns=self.iwf), "")
