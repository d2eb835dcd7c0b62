"""Where a tunnel's THIRD_PARTY_ID comes from (RFC 7843 sections 3.1 and 4).

A provider (:class:`~igdpcp.interfaces.IThirdPartyIdSource`) is asked for the
ID of the tunnel a UPnP request arrived on, given a :class:`TunnelInfo`, and
fires with the ID's octets or fails with an :class:`IdUnavailable`.  It never
guesses: a request with a wrong or missing ID would act on another
subscriber's mappings, so the IWF answers 501 instead (``IdUnavailable`` is an
``iwf.errors.ServerFailure``).

- :class:`StaticIds`: interface name -> ID, from the config.
- :class:`LinkIds`: the ID the kernel holds for the link itself (VXLAN VNI,
  VLAN ID, GRE input key, L2TPv3 session ID), read with :func:`link_info`;
  MPLS labels (and anything else) from the interface name or a fallback.
- :class:`~igdpcp.tunnels.radius.RadiusIds`: ask AAA (RFC 7843 section 3.1).

IDs are operator data (RFC 7843 section 7): nothing here logs or puts into
an exception message an ID or a tunnel name in clear, only pseudonyms.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.internet import defer
from zope.interface import implementer

from ..config import ConfigError
from ..interfaces import IThirdPartyIdSource
from ..iwf.errors import ServerFailure
from ..logs import logger
from ..pcp import tpid
from ..subscriber import pseudonym

log = logger(__name__)


# -- errors --------------------------------------------------------------------------------


class IdUnavailable(ServerFailure):
    """No THIRD_PARTY_ID for this tunnel now: send no PCP request (UPnP 501)."""


class UnknownTunnel(IdUnavailable):
    """The source knows no ID for this tunnel (not in the table, no ID attribute, no such link)."""


class AaaRejected(UnknownTunnel):
    """The AAA server answered Access-Reject for the tunnel."""


class AaaUnreachable(IdUnavailable):
    """The AAA server did not answer (timeout after all retransmissions, or stopped)."""


class BadId(IdUnavailable):
    """The source answered, but not with one valid ID (attribute missing, repeated, malformed)."""


# -- the tunnel, as netlink describes it ---------------------------------------------------


@dataclass(frozen=True)
class TunnelInfo:
    """A tunnel interface and the link attributes an ID can come from.

    ``kind`` is ``IFLA_INFO_KIND`` ("vxlan", "vlan", "gre", "gretap", "ip6gre",
    "ip6gretap", ...; "l2tp" for an L2TPv3 session netdev found through the l2tp
    genetlink family, None for links without IFLA_LINKINFO).  ``attrs`` holds
    integer attributes under their kernel/pyroute2 names (``IFLA_VXLAN_ID``,
    ``IFLA_VLAN_ID``, ``IFLA_GRE_IKEY``, ``IFLA_GRE_IFLAGS`` (host order),
    ``L2TP_ATTR_SESSION_ID``, ``IFLA_LINK``, ...).  ``repr`` hides both name and
    attributes: a VNI is an ID.
    """

    name: str
    ifindex: int = 0
    kind: str | None = None
    attrs: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    def __repr__(self) -> str:
        return f"TunnelInfo({pseudonym(self.name)}, ifindex={self.ifindex}, kind={self.kind})"

    __str__ = __repr__


# Which IFLA_INFO_DATA attributes matter per link kind; everything else is dropped.
_WANTED = {
    "vxlan": ("IFLA_VXLAN_ID", "IFLA_VXLAN_COLLECT_METADATA"),
    "vlan": ("IFLA_VLAN_ID", "IFLA_VLAN_PROTOCOL"),
    "gre": ("IFLA_GRE_IKEY", "IFLA_GRE_OKEY", "IFLA_GRE_IFLAGS", "IFLA_GRE_OFLAGS"),
}
_GRE_KINDS = ("gre", "gretap", "ip6gre", "ip6gretap")
_L2TP_KINDS = ("l2tp", "l2tpeth")
_L2TP_WANTED = ("L2TP_ATTR_SESSION_ID", "L2TP_ATTR_PEER_SESSION_ID",
                "L2TP_ATTR_CONN_ID", "L2TP_ATTR_PEER_CONN_ID")
GRE_KEY = 0x2000  # the K bit of the GRE flags word, RFC 2890 section 2 (linux/if_tunnel.h)


def _ip6gre_flags_native() -> bool:
    """pyroute2 decodes IFLA_IP6GRE_IFLAGS as a host-order uint16 although the kernel
    sends it big-endian (it does gre/gretap right); only then must we swap."""
    try:
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        types = {entry[0]: entry[1] for entry in ifinfmsg.ifinfo.ip6gre_data.nla_map}
    except Exception:  # pragma: no cover - other pyroute2 layouts
        return False
    return types.get("IFLA_IP6GRE_IFLAGS") == "uint16"


_SWAP_IP6GRE_FLAGS = _ip6gre_flags_native() and sys.byteorder == "little"


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def tunnel_info_from_msg(msg) -> TunnelInfo:
    """A :class:`TunnelInfo` from an RTM_NEWLINK message as pyroute2 decodes it
    (``IPRoute().link('get', ...)[0]`` or a monitor event).

    VXLAN: IFLA_INFO_DATA/IFLA_VXLAN_ID (RFC 7348 VNI, 24 bits).  VLAN:
    IFLA_VLAN_ID.  GRE kinds: IFLA_GRE_IKEY/OKEY with IFLA_GRE_IFLAGS/OFLAGS
    (pyroute2 names the ip6gre ones IFLA_IP6GRE_*; stored here under the
    IFLA_GRE_* names, flags in host order).  Mainline l2tp_eth netdevs carry no
    IFLA_LINKINFO: their session comes from :func:`l2tp_sessions`.
    """
    name = msg.get_attr("IFLA_IFNAME") or ""
    attrs: dict[str, int] = {}
    link = msg.get_attr("IFLA_LINK")
    if link is not None:
        attrs["IFLA_LINK"] = int(link)
    kind = None
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND")
        data = linkinfo.get_attr("IFLA_INFO_DATA")
        ip6gre = kind in ("ip6gre", "ip6gretap")
        wanted = _WANTED["gre"] if kind in _GRE_KINDS else _WANTED.get(kind, ())
        if data is not None and hasattr(data, "get_attr"):  # unknown kinds decode as hex
            for key in wanted:
                value = data.get_attr(key.replace("IFLA_GRE_", "IFLA_IP6GRE_") if ip6gre else key)
                if value is None:
                    continue
                if ip6gre and key.endswith("FLAGS") and _SWAP_IP6GRE_FLAGS:
                    value = _swap16(value)
                attrs[key] = int(value)
    return TunnelInfo(name=name, ifindex=int(msg.get("index", 0) or 0), kind=kind, attrs=attrs)


def l2tp_sessions(messages) -> dict[str, dict[str, int]]:
    """Interface name -> session attributes, from L2TP_CMD_SESSION_GET replies
    (``pyroute2.L2tp().dump_sessions()``).  L2TP_ATTR_SESSION_ID is the session
    ID *we* assigned, i.e. the one in the session header of packets arriving from
    the peer (RFC 3931 section 4.1); L2TP_ATTR_PEER_SESSION_ID is the one we send."""
    out: dict[str, dict[str, int]] = {}
    for msg in messages:
        ifname = msg.get_attr("L2TP_ATTR_IFNAME")
        if not ifname:
            continue  # a PPP session: no netdev of its own
        out[ifname] = {k: int(v) for k in _L2TP_WANTED if (v := msg.get_attr(k)) is not None}
    return out


def dump_l2tp_sessions() -> dict[str, dict[str, int]]:
    """:func:`l2tp_sessions` of this namespace; empty where the kernel has no l2tp
    genetlink family (no l2tp_netlink module, as on the build machines)."""
    try:
        from pyroute2 import L2tp
        sock = L2tp()
    except Exception as e:  # NetlinkError: family "l2tp" not found
        log.debug("no l2tp genetlink family: {error}", error=e)
        return {}
    try:
        return l2tp_sessions(sock.dump_sessions())
    finally:
        sock.close()


def link_info(ipr, ifname_or_index: str | int, l2tp: Mapping[str, Mapping[str, int]] | None = None) -> TunnelInfo:
    """Read a link with pyroute2 (``ipr`` an ``IPRoute`` or ``NetNS``) into a TunnelInfo.

    ``l2tp`` (from :func:`l2tp_sessions`) supplies the session of an l2tp_eth
    netdev, whose rtnetlink message has no ID.  A blocking netlink round trip to
    the local kernel (microseconds); raises :class:`UnknownTunnel` for no such link.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    key = {"index": ifname_or_index} if isinstance(ifname_or_index, int) else {"ifname": ifname_or_index}
    try:
        msgs = ipr.link("get", **key)
    except NetlinkError as e:
        raise UnknownTunnel(f"no link {pseudonym(str(ifname_or_index))}: {e.code}") from None
    info = tunnel_info_from_msg(msgs[0])
    if l2tp and info.name in l2tp and info.kind in (None, *_L2TP_KINDS):
        info = TunnelInfo(info.name, info.ifindex, "l2tp", {**info.attrs, **l2tp[info.name]})
    return info


# -- providers -----------------------------------------------------------------------------


@implementer(IThirdPartyIdSource)
class StaticIds:
    """Interface name -> THIRD_PARTY_ID, fixed by the operator."""

    def __init__(self, table: Mapping[str, bytes]):
        self.table = {name: tpid.opaque(value) for name, value in table.items()}

    def third_party_id(self, tunnel: TunnelInfo) -> defer.Deferred:
        value = self.table.get(tunnel.name)
        if value is None:
            return defer.fail(UnknownTunnel(f"{pseudonym(tunnel.name)} is not in the static table"))
        return defer.succeed(value)

    def forget(self, tunnel: TunnelInfo) -> None:
        pass


# Link kinds per technology (tpid.TECHNOLOGIES).  MPLS has none: a label is an
# attribute of routes (lwtunnel encap), not of a netdev.
TECHNOLOGY_KINDS = {
    "vxlan": ("vxlan",),
    "vlan": ("vlan",),
    "gre": _GRE_KINDS,
    "l2tpv3": _L2TP_KINDS,
    "mpls": (),
}


def id_from_link(tunnel: TunnelInfo) -> tuple[str, bytes]:
    """(technology, ID) from the link's own attributes, encoded per RFC 7843 section 4
    (:mod:`igdpcp.pcp.tpid`); raises :class:`UnknownTunnel` saying why not."""
    a, kind, who = tunnel.attrs, tunnel.kind, pseudonym(tunnel.name)
    try:
        if kind == "vxlan":
            if a.get("IFLA_VXLAN_COLLECT_METADATA"):
                raise UnknownTunnel(f"{who}: external (collect_metadata) VXLAN has a VNI per packet")
            if "IFLA_VXLAN_ID" not in a:
                raise UnknownTunnel(f"{who}: VXLAN link without IFLA_VXLAN_ID")
            return "vxlan", tpid.vxlan_vni(a["IFLA_VXLAN_ID"])
        if kind == "vlan":
            if "IFLA_VLAN_ID" not in a:
                raise UnknownTunnel(f"{who}: VLAN link without IFLA_VLAN_ID")
            return "vlan", tpid.vlan_id(a["IFLA_VLAN_ID"])
        if kind in _GRE_KINDS:
            # The input key: the one on packets arriving from the BRAS (ip link ... ikey),
            # which is what identifies the BRAS side of the tunnel (RFC 2890 section 2.1).
            if not a.get("IFLA_GRE_IFLAGS", 0) & GRE_KEY or "IFLA_GRE_IKEY" not in a:
                raise UnknownTunnel(f"{who}: GRE link without an input key")
            return "gre", tpid.gre_key(a["IFLA_GRE_IKEY"])
        if kind in _L2TP_KINDS:
            session = a.get("L2TP_ATTR_SESSION_ID")
            if not session:  # absent, or 0 which RFC 3931 section 4.1 reserves
                raise UnknownTunnel(f"{who}: L2TP link without its session (l2tp genetlink)")
            return "l2tpv3", tpid.l2tpv3_session(session)
    except ValueError as e:  # out of range for the technology
        raise UnknownTunnel(f"{who}: {e}") from None
    raise UnknownTunnel(f"{who}: link kind {kind} carries no tunnel ID")


@implementer(IThirdPartyIdSource)
class LinkIds:
    """The ID the link itself carries, then an interface-name pattern, then ``fallback``.

    ``kinds``: the technologies accepted (``vxlan``, ``vlan``, ``gre``, ``l2tpv3``,
    ``mpls``).  Their ID spaces overlap (a 4-octet GRE key and a 4-octet L2TPv3
    session look alike to the CGN, as do a VNI and a 3-octet MPLS label), so two
    technologies with the same ID length are refused unless ``allow_mixed`` (then
    use one PCP server per technology, RFC 7843 section 5.2).

    ``patterns``: technology -> regular expression over the interface name whose
    first group is the number, e.g. ``{"mpls": r"^pw(\\d+)$"}``.  This is how an
    MPLS label is configured: Linux has no MPLS pseudowire netdev, the label lives
    on routes, so the operator names the interface after it (or lists it in the
    ``fallback`` static table).  A pattern is used only for links whose own
    attributes give no ID.
    """

    def __init__(self, kinds=("vxlan",), patterns: Mapping[str, str] | None = None,
                 fallback=None, allow_mixed: bool = False):
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in TECHNOLOGY_KINDS:
                raise ValueError(f"unknown technology {kind!r} (one of {', '.join(TECHNOLOGY_KINDS)})")
        self.patterns = {}
        for kind, regex in (patterns or {}).items():
            if kind not in kinds:
                raise ValueError(f"pattern for {kind!r}, which is not in kinds")
            compiled = re.compile(regex)
            if compiled.groups < 1:
                raise ValueError(f"pattern for {kind!r} needs a group around the number")
            self.patterns[kind] = compiled
        if not allow_mixed:
            widths: dict[int, str] = {}
            for kind in kinds:
                octets = (tpid.TECHNOLOGIES[kind][0] + 7) // 8
                if octets in widths:
                    raise ValueError(f"{widths[octets]} and {kind} IDs are both {octets} octets and "
                                     "could collide at the CGN (RFC 7843 section 5.2); "
                                     "set allow_mixed with one PCP server per technology")
                widths[octets] = kind
        self.kinds = kinds
        self._link_kinds = {k for t in kinds for k in TECHNOLOGY_KINDS[t]}
        self.fallback = fallback

    def _from_name(self, tunnel: TunnelInfo) -> bytes | None:
        for kind, regex in self.patterns.items():
            m = regex.search(tunnel.name)
            if m:
                text = m.group(1)
                try:
                    number = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
                    return tpid.encode(kind, number)
                except ValueError as e:
                    raise UnknownTunnel(f"{pseudonym(tunnel.name)}: {kind} from name: {e}") from None
        return None

    def third_party_id(self, tunnel: TunnelInfo) -> defer.Deferred:
        reason = f"{pseudonym(tunnel.name)}: link kind {tunnel.kind} is not one of {', '.join(self.kinds)}"
        if tunnel.kind in self._link_kinds:
            try:
                return defer.succeed(id_from_link(tunnel)[1])
            except UnknownTunnel as e:
                reason = str(e)
        try:
            value = self._from_name(tunnel)
        except UnknownTunnel as e:
            return defer.fail(e)
        if value is not None:
            return defer.succeed(value)
        if self.fallback is not None:
            return self.fallback.third_party_id(tunnel)
        return defer.fail(UnknownTunnel(reason))

    def forget(self, tunnel: TunnelInfo) -> None:
        if self.fallback is not None:
            self.fallback.forget(tunnel)


# -- configuration -------------------------------------------------------------------------


def make_source(config: Mapping, reactor=None):
    """The provider the ``[ids]`` table of the TOML config asks for.

    Proposed shape (every key optional but ``source``; errors are ConfigError
    lines naming the key, e.g. ``ids.radius.server: ...``)::

        [ids]
        source = "static"            # "static" | "link" | "radius"

        [ids.static]                 # interface name = ID (tpid.parse spelling)
        vxlan1001 = "vxlan:1001"
        tun2 = "hex:0a0b0c"

        [ids.link]
        kinds = ["vxlan"]            # vxlan, vlan, gre (input key), l2tpv3, mpls
        allow_mixed = false          # same-length ID spaces need one CGN each
        patterns = { mpls = "^pw(\\\\d+)$" }   # name -> number, e.g. MPLS labels
        fallback = "static"          # then look in [ids.static]

        [ids.radius]
        server = "127.0.0.1:1812"    # IP literal; "[::1]:1812" for IPv6
        secret_file = "/etc/igdpcp/radius.secret"   # or secret = "..."
        nas_identifier = "igdpcp"
        name_attributes = ["User-Name", "NAS-Port-Id"]   # carry the tunnel name
        password_file = "..."        # optional User-Password (or password = "...")
        attribute = "Class"          # reply attribute holding the ID
        format = "octets"            # "octets" | "spec" (text "gre:7") | a technology
        ttl = 300                    # seconds an answer is cached
        negative_ttl = 10            # seconds a reject / bad answer is cached
        timeout = 2.0                # per transmission
        retries = 2                  # retransmissions after the first
        require_message_authenticator = false   # true once the server signs replies
        dictionary = "/path/extra.dictionary"   # optional, replaces the shipped one

    ``reactor`` is needed for "radius" only.
    """

    def err(key, message):
        return ConfigError(f"ids.{key}: {message}")

    table = dict(config)
    source = table.get("source")
    unknown = set(table) - {"source", "static", "link", "radius"}
    if unknown:
        raise err(sorted(unknown)[0], "unknown key")

    def static():
        entries = table.get("static", {})
        if not isinstance(entries, Mapping):
            raise err("static", "expected a table of interface = ID")
        out = {}
        for name, spec in entries.items():
            if not isinstance(spec, str):
                raise err(f"static.{name}", f"expected an ID string like 'vxlan:1001', got {type(spec).__name__}")
            try:
                out[name] = tpid.parse(spec)
            except ValueError as e:
                raise err(f"static.{name}", str(e)) from None
        return StaticIds(out)

    if source == "static":
        return static()
    if source == "link":
        link = dict(table.get("link", {}))
        unknown = set(link) - {"kinds", "allow_mixed", "patterns", "fallback"}
        if unknown:
            raise err(f"link.{sorted(unknown)[0]}", "unknown key")
        fallback = link.get("fallback")
        if fallback not in (None, "static"):
            raise err("link.fallback", "only \"static\" is supported")
        try:
            return LinkIds(kinds=link.get("kinds", ("vxlan",)), patterns=link.get("patterns"),
                           fallback=static() if fallback else None,
                           allow_mixed=bool(link.get("allow_mixed", False)))
        except (ValueError, TypeError, re.error) as e:
            raise err("link", str(e)) from None
    if source == "radius":
        from .radius import radius_from_config  # imports pyrad only when asked for
        if reactor is None:
            raise TypeError("make_source needs the reactor for a radius source")
        return radius_from_config(dict(table.get("radius", {})), reactor, err)
    raise err("source", f"expected \"static\", \"link\" or \"radius\", got {source!r}")
