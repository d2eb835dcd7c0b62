"""Host setup that keeps kernel-generated replies in their own tunnel.

Every tunnel may carry the same addresses (igdpcp 192.168.1.1/24, the
subscriber 192.168.1.10), so the main routing table has one
``192.168.1.0/24`` route per tunnel and uses the first.  igdpcp's own sockets
are bound to their interface and are not affected, but what the *kernel*
answers by itself -- a TCP RST for a closed port, ICMP echo replies and
errors -- follows the main table and leaves by the first tunnel, i.e. one
subscriber receives another's packets (notes/lab.md section 3).  The fix,
per tunnel interface ``X`` with mark ``N``:

* nftables marks what arrives on ``X`` with ``N`` (table ``inet igdpcp``:
  one prerouting chain at mangle priority with the single rule
  ``meta mark set iifname map @tunnel_marks``; the map holds one
  ``"X" : N`` element per tunnel, so the per-packet cost is one hash lookup
  whatever the number of tunnels, and a miss leaves the mark alone);
* ``net.ipv4.fwmark_reflect=1`` gives kernel replies (RST, ICMP) the mark of
  the packet they answer, ``net.ipv4.tcp_fwmark_accept=1`` gives accepted
  TCP sockets the mark of their SYN;
* ``ip rule add fwmark N lookup N priority P`` and, for each IPv4 subnet on
  ``X``, ``ip route add SUBNET dev X table N``: marked traffic is routed back
  into its own tunnel; a miss in table ``N`` falls through to the next rules;
* reverse-path filtering must not be strict: the effective value is
  max(conf.all, conf.X), and strict (1) drops what arrives on every tunnel but
  the first; where it is 1, ``conf.X.rp_filter`` is set to 2 (loose), which
  makes the maximum 2 without touching ``conf.all`` (other interfaces).

``net.ipv4.igmp_max_memberships`` (20 per *socket*) is not needed: igdpcp
has one SSDP socket per tunnel, each with one membership.

**Mark and table numbers.**  ``N = mark_base + ifindex`` (default base
``0x49470000``, ASCII "IG" in the upper half; configurable).  The ifindex is
unique in the network namespace, known for dynamic tunnels without a
configuration entry, and readable from the live system, so ``--check`` needs
no saved state and a start-up check computes the same numbers as
``--apply``.  Config-order numbering would renumber every tunnel when one is
added or removed.  The ifindex grows with every new interface (it is
allocated cyclically up to 2**31), so the marks span ``[base, base + 2**31)``;
igdpcp recognises its own rules by their priority (default 10000, below the
main table's 32766) with ``fwmark == table >= base``, not by range alone.
An interface that is deleted and re-created gets a new ifindex, and so a new
mark: the stale rule is removed and the map element updated on the next apply.
The nft rule *replaces* the mark of packets from tunnel interfaces (only
those): an operator using marks on tunnel traffic must pick another scheme.

The planner (:func:`plan`, :func:`plan_remove`) is sans-IO: it compares a
:class:`HostState` snapshot with what the tunnels need and returns
:class:`Change` values; :func:`read_state` (rtnetlink dumps, ``/proc/sys``,
``nft -j``) and :func:`execute` (pyroute2 and one ``nft -f -`` transaction)
do the I/O.  Applying twice is a no-op; ``--check`` is a dry run of
``--apply`` (clean means apply would change nothing).

Command line (root, or CAP_NET_ADMIN, in the igdpcp network namespace)::

    python3 -m igdpcp.tunnels.hostsetup --check  [--netns NAME] IFACE...
    python3 -m igdpcp.tunnels.hostsetup --apply  [--netns NAME] [--prune] IFACE...
    python3 -m igdpcp.tunnels.hostsetup --remove [--netns NAME] [IFACE...]
    python3 -m igdpcp.tunnels.hostsetup --check --config igdpcp.toml

Exit status 0 when the setup is (now) in place, 1 otherwise, 2 on usage
errors.  ``--remove`` without interfaces removes all of igdpcp's rules,
routes and the nft table; sysctls are left as they are (their earlier values
are not known, and they are harmless).  Only IPv4 is handled.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field

DEFAULT_MARK_BASE = 0x49470000
DEFAULT_PRIORITY = 10000
MAX_IFINDEX_SPAN = 2**31  # ifindex values are positive 31-bit integers
NFT_FAMILY = "inet"
NFT_TABLE = "igdpcp"
NFT_MAP = "tunnel_marks"
NFT_CHAIN = "prerouting"
NFT_MANGLE_PRIO = -150

FWMARK_REFLECT = "net.ipv4.fwmark_reflect"
TCP_FWMARK_ACCEPT = "net.ipv4.tcp_fwmark_accept"
RP_FILTER_ALL = "net.ipv4.conf.all.rp_filter"
GLOBAL_SYSCTLS = (FWMARK_REFLECT, TCP_FWMARK_ACCEPT)
HOST = "host"  # subject of changes that belong to no tunnel
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTPROT_STATIC = 4


def rp_filter_key(ifname: str) -> str:
    return f"net.ipv4.conf.{ifname}.rp_filter"


@dataclass(frozen=True, slots=True)
class Settings:
    """How igdpcp numbers its marks and tables, and where its rules sit."""

    mark_base: int = DEFAULT_MARK_BASE
    priority: int = DEFAULT_PRIORITY

    def __post_init__(self):
        if not (0 < self.mark_base <= 0xFFFFFFFF - 1):
            raise ValueError("mark base must be between 1 and 0xfffffffe")
        if not (1 <= self.priority < 32766):
            raise ValueError("rule priority must be between 1 and 32765 (before the main table)")

    def mark(self, ifindex: int) -> int | None:
        """Mark and table number of the interface with ``ifindex`` (None: out of range)."""
        value = self.mark_base + ifindex
        return value if ifindex > 0 and value <= 0xFFFFFFFF else None

    def ifindex(self, mark: int) -> int | None:
        """The inverse of :meth:`mark` (None: not one of our numbers)."""
        index = mark - self.mark_base
        return index if 0 < index < MAX_IFINDEX_SPAN else None


# -- the snapshot -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Link:
    """One interface: ``subnets`` are (network "a.b.c.d/len", our local address)."""

    name: str
    index: int
    subnets: tuple[tuple[str, str], ...] = ()
    rp_filter: int | None = None


@dataclass(frozen=True, slots=True)
class NftState:
    """igdpcp's nft table as found: ``skeleton_ok`` when the map, the chain and
    its one rule are exactly as :func:`nft_table_script` makes them."""

    skeleton_ok: bool
    elements: dict = field(default_factory=dict)  # ifname -> mark


@dataclass(frozen=True, slots=True)
class HostState:
    """What the planner needs to know about the host (one network namespace).

    ``links`` holds every interface (name -> Link) so that marks of vanished
    ifindexes can be told from live ones; ``rules`` the marks of igdpcp's
    rules; ``routes`` (table, network, oif) in igdpcp's tables; ``nft`` None
    when the table is absent; ``errors`` what could not be read.
    """

    sysctls: dict
    links: dict
    rules: frozenset = frozenset()
    routes: frozenset = frozenset()
    nft: NftState | None = None
    errors: tuple[str, ...] = ()
    nft_readable: bool = True  # False: nft missing or not permitted (no nft items planned)

    def by_index(self) -> dict:
        return {link.index: link for link in self.links.values()}


# -- the plan -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Change:
    """One thing to change.  ``problem`` is what ``--check`` reports, ``action``
    what ``--apply`` does; ``op`` is for :func:`execute`."""

    subject: str
    problem: str
    action: str
    op: tuple


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]
    errors: tuple[str, ...] = ()  # problems no change can fix (one line each)

    @property
    def clean(self) -> bool:
        return not self.changes and not self.errors


def _hexmark(mark: int) -> str:
    return f"0x{mark:08x}"


def _rule_text(mark: int) -> str:
    return f"ip rule fwmark {_hexmark(mark)} lookup {mark}"


def _nft_name_ok(name: str) -> bool:
    return name.isprintable() and '"' not in name and "\\" not in name and " " not in name


def plan(state: HostState, tunnels, settings: Settings = Settings(), *, prune: bool = False) -> Plan:
    """The changes that make ``tunnels`` (interface names) keep kernel replies
    in their own tunnel.  Stale entries (interfaces that no longer exist, old
    marks of re-created interfaces) are always removed; with ``prune`` also the
    entries of live interfaces that are not in ``tunnels``."""
    changes: list[Change] = []
    errors: list[str] = list(state.errors)
    wanted: dict[str, int] = {}  # ifname -> mark
    for name in dict.fromkeys(tunnels):
        link = state.links.get(name)
        if link is None:
            errors.append(f"{name}: no such interface")
            continue
        if not _nft_name_ok(name):
            errors.append(f"{name}: the interface name cannot be written in an nft rule")
            continue
        mark = settings.mark(link.index)
        if mark is None:
            errors.append(f"{name}: ifindex {link.index} + mark base {_hexmark(settings.mark_base)} "
                          "exceeds 32 bits; choose a lower --mark-base")
            continue
        wanted[name] = mark

    if wanted:
        for key in GLOBAL_SYSCTLS:
            value = state.sysctls.get(key)
            if value != 1:
                why = ("kernel replies (RST, ICMP) do not carry the mark of what they answer"
                       if key == FWMARK_REFLECT else "accepted TCP sockets do not take their SYN's mark")
                changes.append(Change(HOST, f"{key} is {value}, want 1: {why}",
                                      f"set {key}=1", ("sysctl", key, 1)))
    all_rp = state.sysctls.get(RP_FILTER_ALL) or 0
    for name in wanted:
        link = state.links[name]
        own = link.rp_filter or 0
        if max(all_rp, own) == 1:
            changes.append(Change(
                name, f"rp_filter is strict (all={all_rp}, {name}={own}): traffic from this tunnel "
                "is dropped unless it is the first one; want loose (2)",
                f"set {rp_filter_key(name)}=2", ("sysctl", rp_filter_key(name), 2)))

    changes += _plan_nft(state, wanted, prune)
    changes += _plan_rules_routes(state, wanted, settings, prune)
    return Plan(tuple(changes), tuple(errors))


def _plan_nft(state: HostState, wanted: dict, prune: bool) -> list[Change]:
    if not state.nft_readable:
        return []  # already in state.errors
    current = dict(state.nft.elements) if state.nft is not None else {}
    keep = {}
    dropped = []
    for name, mark in current.items():
        if name in wanted:
            continue
        if name in state.links and not prune:
            keep[name] = mark
        else:
            dropped.append(name)
    target = dict(keep)
    target.update(wanted)
    if not target and state.nft is None:
        return []
    out = []
    if state.nft is None or not state.nft.skeleton_ok:
        what = "missing" if state.nft is None else "not as igdpcp makes it"
        out.append(Change(HOST, f"nft table {NFT_FAMILY} {NFT_TABLE} is {what}",
                          f"create nft table {NFT_FAMILY} {NFT_TABLE} (prerouting mark map)",
                          ("nft-table", state.nft is not None)))
        current = {}
        dropped = []
    for name, mark in wanted.items():
        have = current.get(name)
        if have == mark:
            continue
        if have is None:
            out.append(Change(name, f"no nft mark (iifname \"{name}\" -> {_hexmark(mark)})",
                              f"nft mark iifname \"{name}\" -> {_hexmark(mark)}",
                              ("nft-add", name, mark)))
        else:
            out.append(Change(name, f"nft mark is {_hexmark(have)}, want {_hexmark(mark)} "
                              "(interface re-created)",
                              f"nft mark iifname \"{name}\" -> {_hexmark(mark)} (was {_hexmark(have)})",
                              ("nft-replace", name, mark)))
    for name in dropped:
        why = "not a tunnel any more" if name in state.links else "interface gone"
        out.append(Change(name, f"stale nft mark ({why})", f"remove nft mark for iifname \"{name}\"",
                          ("nft-del", name)))
    return out


def _plan_rules_routes(state: HostState, wanted: dict, settings: Settings, prune: bool) -> list[Change]:
    by_index = state.by_index()
    routes = _routes_by_table(state)
    want_marks = {mark: name for name, mark in wanted.items()}
    out = []
    # Rules and routes that must go: stale marks, and (prune) live non-tunnels.
    for mark in sorted(state.rules):
        if mark in want_marks:
            continue
        index = settings.ifindex(mark)
        link = by_index.get(index) if index is not None else None
        if link is not None and not prune:
            continue
        subject = link.name if link is not None else f"ifindex {index}"
        why = "not a tunnel any more" if link is not None else "interface gone"
        out.append(Change(subject, f"stale {_rule_text(mark)} ({why})", f"remove {_rule_text(mark)}",
                          ("rule-del", mark)))
        for net, oif in sorted(routes.get(mark, ())):
            out.append(Change(subject, f"stale route {net} in table {mark}",
                              f"remove route {net} table {mark}", ("route-del", mark, net, oif)))
    for name, mark in wanted.items():
        link = state.links[name]
        if mark not in state.rules:
            out.append(Change(name, f"no {_rule_text(mark)}", f"add {_rule_text(mark)} "
                              f"priority {settings.priority}", ("rule-add", mark)))
        have = routes.get(mark, set())
        want = {(net, link.index): src for net, src in link.subnets}
        for (net, oif), src in sorted(want.items()):
            if (net, oif) not in have:
                out.append(Change(name, f"no route {net} dev {name} in table {mark}",
                                  f"add route {net} dev {name} table {mark}",
                                  ("route-add", mark, net, oif, src)))
        for net, oif in sorted(have - set(want)):
            out.append(Change(name, f"stale route {net} in table {mark}",
                              f"remove route {net} table {mark}", ("route-del", mark, net, oif)))
    return out


def _routes_by_table(state: HostState) -> dict:
    out: dict[int, set] = {}
    for table, net, oif in state.routes:
        out.setdefault(table, set()).add((net, oif))
    return out


def plan_remove(state: HostState, tunnels=None, settings: Settings = Settings()) -> Plan:
    """Undo igdpcp's setup for ``tunnels`` (None: all of it, the nft table too).
    Sysctls are left alone."""
    changes = []
    if tunnels is None:
        if state.nft is not None:
            changes.append(Change(HOST, f"nft table {NFT_FAMILY} {NFT_TABLE} present",
                                  f"delete nft table {NFT_FAMILY} {NFT_TABLE}", ("nft-drop",)))
        marks = {mark: None for mark in state.rules}
        for table, _, _ in state.routes:
            marks.setdefault(table, None)
    else:
        marks = {}
        elements = state.nft.elements if state.nft is not None else {}
        for name in dict.fromkeys(tunnels):
            link = state.links.get(name)
            if link is not None and settings.mark(link.index) is not None:
                marks[settings.mark(link.index)] = name
            if name in elements:
                marks.setdefault(elements[name], name)
                changes.append(Change(name, "nft mark present", f"remove nft mark for iifname \"{name}\"",
                                      ("nft-del", name)))
    by_index = state.by_index()
    routes = _routes_by_table(state)
    for mark, name in sorted(marks.items()):
        if name is None:
            index = settings.ifindex(mark)
            link = by_index.get(index) if index is not None else None
            name = link.name if link is not None else f"ifindex {index}"
        if mark in state.rules:
            changes.append(Change(name, f"{_rule_text(mark)} present", f"remove {_rule_text(mark)}",
                                  ("rule-del", mark)))
        for net, oif in sorted(routes.get(mark, ())):
            changes.append(Change(name, f"route {net} in table {mark} present",
                                  f"remove route {net} table {mark}", ("route-del", mark, net, oif)))
    return Plan(tuple(changes))


# -- nft text -----------------------------------------------------------------

def _element(name: str, mark: int) -> str:
    return f'"{name}" : {_hexmark(mark)}'


def nft_table_script(elements: dict, *, replace: bool) -> list[str]:
    """Lines that (re)create igdpcp's table with ``elements`` in one transaction."""
    lines = []
    if replace:  # "table X {}" first makes the delete safe when it is absent
        lines += [f"table {NFT_FAMILY} {NFT_TABLE} {{}}", f"delete table {NFT_FAMILY} {NFT_TABLE}"]
    lines += [
        f"table {NFT_FAMILY} {NFT_TABLE} {{",
        f"  map {NFT_MAP} {{ type ifname : mark; }}",
        f"  chain {NFT_CHAIN} {{ type filter hook prerouting priority mangle; policy accept; "
        f"meta mark set iifname map @{NFT_MAP}; }}",
        "}",
    ]
    lines += _add_elements(elements)
    return lines


def _add_elements(elements: dict, chunk: int = 1000) -> list[str]:
    items = list(elements.items())
    return [f"add element {NFT_FAMILY} {NFT_TABLE} {NFT_MAP} {{ "
            + ", ".join(_element(n, m) for n, m in items[i:i + chunk]) + " }"
            for i in range(0, len(items), chunk)]


def _delete_elements(names, chunk: int = 1000) -> list[str]:
    names = list(names)
    return [f"delete element {NFT_FAMILY} {NFT_TABLE} {NFT_MAP} {{ "
            + ", ".join(f'"{n}"' for n in names[i:i + chunk]) + " }"
            for i in range(0, len(names), chunk)]


def nft_script(changes, state: HostState) -> list[str]:
    """The ``nft -f`` lines for the nft changes among ``changes`` (one transaction)."""
    ops = [c.op for c in changes if c.op[0].startswith("nft-")]
    if not ops:
        return []
    if any(op[0] == "nft-drop" for op in ops):
        return [f"table {NFT_FAMILY} {NFT_TABLE} {{}}", f"delete table {NFT_FAMILY} {NFT_TABLE}"]
    current = dict(state.nft.elements) if state.nft is not None else {}
    table = next((op for op in ops if op[0] == "nft-table"), None)
    if table is not None:
        keep = {n: m for n, m in current.items()
                if not any(op[0] == "nft-del" and op[1] == n for op in ops)}
        for op in ops:
            if op[0] in ("nft-add", "nft-replace"):
                keep[op[1]] = op[2]
        return nft_table_script(keep, replace=table[1])
    gone = [op[1] for op in ops if op[0] in ("nft-del", "nft-replace")]
    added = {op[1]: op[2] for op in ops if op[0] in ("nft-add", "nft-replace")}
    return _delete_elements(gone) + _add_elements(added)


_EXPECTED_RULE = [{"mangle": {"key": {"meta": {"key": "mark"}},
                              "value": {"map": {"key": {"meta": {"key": "iifname"}},
                                                "data": f"@{NFT_MAP}"}}}}]


def parse_nft_json(text: str) -> NftState:
    """``nft -j list table inet igdpcp`` -> NftState."""
    items = json.loads(text).get("nftables", [])
    maps = [i["map"] for i in items if "map" in i]
    chains = [i["chain"] for i in items if "chain" in i]
    rules = [i["rule"] for i in items if "rule" in i]
    elements = {}
    the_map = next((m for m in maps if m.get("name") == NFT_MAP), None)
    if the_map is not None:
        for elem in the_map.get("elem", []):
            if isinstance(elem, list) and len(elem) == 2 and isinstance(elem[0], str):
                elements[elem[0]] = int(elem[1])
    ok = (len(maps) == 1 and the_map is not None and the_map.get("type") == "ifname"
          and the_map.get("map") == "mark"
          and len(chains) == 1 and chains[0].get("name") == NFT_CHAIN
          and chains[0].get("hook") == "prerouting" and chains[0].get("type") == "filter"
          and chains[0].get("prio") == NFT_MANGLE_PRIO and chains[0].get("policy", "accept") == "accept"
          and len(rules) == 1 and rules[0].get("expr") == _EXPECTED_RULE)
    return NftState(ok, elements)


# -- I/O: reading ---------------------------------------------------------------

def _sysctl_path(key: str) -> str:
    # net.ipv4.conf.<ifname>.rp_filter: the interface name may contain dots.
    if key.startswith("net.ipv4.conf."):
        rest = key[len("net.ipv4.conf."):]
        ifname, _, leaf = rest.rpartition(".")
        return f"/proc/sys/net/ipv4/conf/{ifname}/{leaf}"
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str) -> int | None:
    try:
        with open(_sysctl_path(key)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_sysctl(key: str, value: int) -> None:
    with open(_sysctl_path(key), "w") as f:
        f.write(f"{value}\n")


# Reading goes through a plain rtnetlink socket: decoding 10,000 links and
# 30,000 routes with pyroute2 takes ~10 s, this ~0.2 s (bench_tunnels.py).
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_GETADDR, RTM_GETROUTE, RTM_GETRULE = 22, 26, 34
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
FR_ACT_TO_TBL = 1
_NLMSG = struct.Struct("=LHHLL")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=L")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """rtattr TLVs (4-byte aligned) -> {type: value}; nested flag bits are dropped."""
    attrs, off = {}, 0
    while off + 4 <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return attrs


def parse_dump(chunks, header_len: int) -> list[tuple[bytes, dict[int, bytes]]]:
    """Netlink datagrams of one dump -> [(family header, attrs)]; stops at NLMSG_DONE."""
    out = []
    for data in chunks:
        off = 0
        while off + 16 <= len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
            if length < 16:
                raise OSError(errno.EPROTO, "bad netlink message")
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                code = struct.unpack_from("=i", data, off + 16)[0]
                if code:
                    raise OSError(-code, os.strerror(-code))
            else:
                body = data[off + 16:off + length]
                out.append((body[:header_len], parse_attrs(body[header_len:])))
            off += (length + 3) & ~3
    return out


def _dump(kind: int, header: bytes) -> list[tuple[bytes, dict[int, bytes]]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(_NLMSG.pack(16 + len(header), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + header)

        def chunks():
            while True:
                yield s.recv(1 << 20)
        return parse_dump(chunks(), len(header))


def _u32(attrs: dict, kind: int) -> int | None:
    value = attrs.get(kind)
    return _U32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else None


def _ipv4(attrs: dict, kind: int) -> str | None:
    value = attrs.get(kind)
    return socket.inet_ntoa(value) if value is not None and len(value) == 4 else None


def subnets_from_addrs(dump) -> dict[int, list]:
    """RTM_NEWADDR (ifaddrmsg, attrs) -> {ifindex: [(network, local address)]}."""
    out: dict[int, list] = {}
    for header, attrs in dump:
        prefixlen, index = header[1], _U32.unpack_from(header, 4)[0]
        local = _ipv4(attrs, IFA_LOCAL) or _ipv4(attrs, IFA_ADDRESS)
        peer = _ipv4(attrs, IFA_ADDRESS) or local
        if local is None:
            continue
        net = ipaddress.ip_interface(f"{peer}/{prefixlen}").network
        if net.prefixlen == 32 and peer == local:
            continue  # no subnet: nothing to route
        out.setdefault(index, []).append((str(net), local))
    return out


def rules_from_dump(dump, settings: Settings) -> set[int]:
    """igdpcp's rules among RTM_NEWRULE messages: their marks."""
    marks = set()
    for header, attrs in dump:
        mark = _u32(attrs, FRA_FWMARK)
        table = _u32(attrs, FRA_TABLE) or header[4]
        mask = _u32(attrs, FRA_FWMASK)
        if (_u32(attrs, FRA_PRIORITY) == settings.priority and mark is not None and mark == table
                and header[7] == FR_ACT_TO_TBL and mask in (None, 0xFFFFFFFF)
                and settings.ifindex(mark) is not None):
            marks.add(mark)
    return marks


def routes_from_dump(dump, tables: set) -> set[tuple]:
    """(table, "net/len", oif) of the RTM_NEWROUTE messages in ``tables``."""
    routes = set()
    for header, attrs in dump:
        table = _u32(attrs, RTA_TABLE) or header[4]
        if table in tables:
            routes.add((table, f"{_ipv4(attrs, RTA_DST) or '0.0.0.0'}/{header[1]}", _u32(attrs, RTA_OIF)))
    return routes


def read_state(tunnels=(), settings: Settings = Settings(), *, nft: str | None = None) -> HostState:
    """Snapshot of the current network namespace; ``tunnels`` get their rp_filter read."""
    errors = []
    rtmsg = struct.pack("=BBBBBBBBL", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    subnets = subnets_from_addrs(_dump(RTM_GETADDR, struct.pack("=BBBBL", socket.AF_INET, 0, 0, 0, 0)))
    links = {name: Link(name, index, tuple(sorted(subnets.get(index, ()))))
             for index, name in socket.if_nameindex()}
    rules = rules_from_dump(_dump(RTM_GETRULE, rtmsg), settings)
    tables = set(rules) | {settings.mark(l.index) for l in links.values()}
    tables.discard(None)
    routes = routes_from_dump(_dump(RTM_GETROUTE, rtmsg), tables)
    for name in tunnels:
        if name in links:
            links[name] = Link(name, links[name].index, links[name].subnets,
                               read_sysctl(rp_filter_key(name)))
    sysctls = {key: read_sysctl(key) for key in (*GLOBAL_SYSCTLS, RP_FILTER_ALL)}
    nft_state = None
    nft = nft or shutil.which("nft")
    if nft is None:
        errors.append(f"{HOST}: nft not found: cannot read or write the nftables marks")
    else:
        proc = subprocess.run([nft, "-j", "list", "table", NFT_FAMILY, NFT_TABLE],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            try:
                nft_state = parse_nft_json(proc.stdout)
            except (ValueError, KeyError, TypeError) as e:
                errors.append(f"{HOST}: cannot parse nft output: {e}")
        elif "No such file or directory" not in proc.stderr:
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
            errors.append(f"{HOST}: nft list failed: {why}")
    return HostState(sysctls, links, frozenset(rules), frozenset(routes), nft_state, tuple(errors),
                     nft_readable=not any("nft" in e for e in errors))


# -- I/O: applying ------------------------------------------------------------

def execute(plan_: Plan, state: HostState, settings: Settings = Settings(), *, ipr=None,
            nft: str | None = None) -> list[tuple[Change, str | None]]:
    """Carry out ``plan_``; returns (change, None or the error) for each change.
    Netlink "already exists" on add and "not found" on delete count as done."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    results: list[tuple[Change, str | None]] = []
    changes = plan_.changes
    for change in changes:
        if change.op[0] == "sysctl":
            try:
                write_sysctl(change.op[1], change.op[2])
                results.append((change, None))
            except OSError as e:
                results.append((change, e.strerror or str(e)))
    nft_changes = [c for c in changes if c.op[0].startswith("nft-")]
    if nft_changes:
        script = "\n".join(nft_script(nft_changes, state)) + "\n"
        nft = nft or shutil.which("nft")
        if nft is None:
            error = "nft not found"
        else:
            proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True,
                                  timeout=300)
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["nft failed"])[0]
        results += [(c, error) for c in nft_changes]
    own = ipr is None
    ipr = IPRoute() if own else ipr
    order = {"rule-del": 0, "route-del": 1, "rule-add": 2, "route-add": 3}
    try:
        for change in sorted((c for c in changes if c.op[0] in order), key=lambda c: order[c.op[0]]):
            op = change.op
            try:
                if op[0] == "rule-add":
                    ipr.rule("add", family=socket.AF_INET, priority=settings.priority,
                             fwmark=op[1], table=op[1])
                elif op[0] == "rule-del":
                    ipr.rule("del", family=socket.AF_INET, priority=settings.priority,
                             fwmark=op[1], table=op[1])
                elif op[0] == "route-add":
                    _, table, net, oif, src = op
                    ipr.route("add", dst=net, oif=oif, table=table, scope=RT_SCOPE_LINK,
                              proto=RTPROT_STATIC, prefsrc=src)
                else:
                    _, table, net, oif = op
                    # as "ip route del": any scope (RT_SCOPE_NOWHERE) and protocol
                    ipr.route("del", dst=net, oif=oif, table=table, scope=RT_SCOPE_NOWHERE, proto=0)
                results.append((change, None))
            except NetlinkError as e:
                done = (e.code == errno.EEXIST and op[0].endswith("-add")) or \
                       (e.code in (errno.ENOENT, errno.ESRCH) and op[0].endswith("-del"))
                results.append((change, None if done else f"{os.strerror(e.code)} ({e.code})"))
    finally:
        if own:
            ipr.close()
    return results


# -- for the daemon -----------------------------------------------------------

def startup_warnings(tunnels, settings: Settings = Settings()) -> list[str]:
    """One warning line per missing item, for igdpcp to log at start-up; never raises.
    Run in igdpcp's own network namespace (reading needs no privilege, except nft)."""
    try:
        state = read_state(tunnels, settings)
    except Exception as e:  # noqa: BLE001 - a check must not stop the daemon
        return [f"host setup not checked: {type(e).__name__}: {e}"]
    result = plan(state, tunnels, settings)
    lines = [f"host setup: {c.subject}: {c.problem}" for c in result.changes]
    lines += [f"host setup: {e}" for e in result.errors]
    if lines:
        lines.append("host setup: kernel replies (TCP RST, ICMP) may leave by another subscriber's "
                     "tunnel; fix with: python3 -m igdpcp.tunnels.hostsetup --apply IFACE...")
    return lines


def apply_tunnels(tunnels, settings: Settings = Settings()) -> list[str]:
    """Set up ``tunnels`` without pruning others (for dynamic tunnels); blocking.
    Returns the failure lines (empty: done)."""
    state = read_state(tunnels, settings)
    result = plan(state, tunnels, settings)
    failures = [f"{c.subject}: {c.action}: {err}" for c, err in execute(result, state, settings) if err]
    return list(result.errors) + failures


# -- command line -------------------------------------------------------------

def _int(text: str) -> int:
    return int(text, 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m igdpcp.tunnels.hostsetup",
        description="Keep kernel-generated replies (TCP RST, ICMP) in their own tunnel: "
                    "nft marks, ip rules and per-tunnel tables, sysctls.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report what is missing (exit 1 if anything)")
    mode.add_argument("--apply", action="store_true", help="make it so (idempotent)")
    mode.add_argument("--remove", action="store_true",
                      help="remove the setup of the named interfaces (all of it when none are named)")
    p.add_argument("--config", metavar="FILE", help="take the tunnel interfaces from an igdpcp config")
    p.add_argument("--netns", metavar="NAME", help="work in this named network namespace")
    p.add_argument("--prune", action="store_true",
                   help="with --apply: also remove igdpcp's entries for live interfaces not named")
    p.add_argument("--mark-base", type=_int, default=DEFAULT_MARK_BASE,
                   help="mark = table = BASE + ifindex (default 0x%(default)x)")
    p.add_argument("--priority", type=_int, default=DEFAULT_PRIORITY,
                   help="ip rule priority of igdpcp's rules (default %(default)s)")
    p.add_argument("interfaces", nargs="*", metavar="IFACE")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        settings = Settings(args.mark_base, args.priority)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tunnels = list(args.interfaces)
    if args.config:
        from ..config import ConfigError, load
        try:
            config = load(args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tunnels += [t.interface for t in config.tunnels]
    if not tunnels and not args.remove:
        print("error: name the tunnel interfaces (IFACE... or --config FILE)", file=sys.stderr)
        return 2
    if args.netns:
        from pyroute2 import netns
        try:
            netns.setns(args.netns, flags=0)
        except OSError as e:
            print(f"error: network namespace {args.netns}: {e.strerror or e}", file=sys.stderr)
            return 2
    state = read_state(tunnels, settings)
    if args.remove:
        result = plan_remove(state, tunnels or None, settings)
    else:
        result = plan(state, tunnels, settings, prune=args.prune)
    if args.check:
        for change in result.changes:
            print(f"MISSING {change.subject}: {change.problem}", file=out)
        for error in result.errors:
            print(f"ERROR {error}", file=out)
        if result.clean:
            print(f"OK host setup in place for {len(tunnels)} tunnel(s)", file=out)
            return 0
        print(f"FAIL {len(result.changes)} item(s) missing, {len(result.errors)} error(s); "
              "fix with --apply", file=out)
        return 1
    failed = 0
    for change, error in execute(result, state, settings):
        if error is None:
            print(f"DONE {change.subject}: {change.action}", file=out)
        else:
            failed += 1
            print(f"FAILED {change.subject}: {change.action}: {error}", file=out)
    for error in result.errors:
        print(f"ERROR {error}", file=out)
    verb = "removed" if args.remove else "applied"
    if not result.changes and not result.errors:
        print(f"OK nothing to do ({len(tunnels) if tunnels else 'all'} tunnel(s))", file=out)
        return 0
    # Read back: what the kernel says now, not what the calls returned.
    state = read_state(tunnels, settings)
    after = plan_remove(state, tunnels or None, settings) if args.remove else \
        plan(state, tunnels, settings, prune=args.prune)
    for change in after.changes:
        failed += 1
        print(f"FAILED {change.subject}: still {change.problem}", file=out)
    ok = not failed and not result.errors
    print(f"{'OK' if ok else 'FAIL'} {len(result.changes) - failed} change(s) {verb}, {failed} failed, "
          f"{len(result.errors)} error(s)", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
