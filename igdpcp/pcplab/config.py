"""The lab CGN's settings: one table of keys, read from a ``[cgn]`` TOML table.

Every key has one parser in :data:`KEYS`, used for the file and for the
command line alike, so a bad value stops start-up with one line naming the
key (``cgn.pool: ...`` or ``--port: ...``).  Reserved pool addresses are only
warned about: miniupnpc refuses an IGD whose external address is reserved
(notes/lab.md section 6), but a lab may want exactly that.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from twisted.python import usage

from igdpcp.pcp import tpid
from igdpcp.pcp.constants import MAX_THIRD_PARTY_ID_SIZE, SERVER_PORT

MAX_POOL_SIZE = 65536  # addresses kept in memory as a list
MAX_LIFETIME_FIELD = 2**32 - 1  # RFC 6887 section 7.1, 32-bit field
MAX_ANNOUNCES = 10  # RFC 6887 section 14.1.3: "up to ten times"

# Ranges miniupnpc treats as reserved for an external address (addr_is_reserved).
RESERVED_NETWORKS = tuple(ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))


class ConfigError(usage.UsageError):
    """A bad setting; the message is one line that starts with the key."""


@dataclass(frozen=True, slots=True)
class CGNConfig:
    """Validated settings; the defaults make a usable lab CGN."""

    listen: str = "0.0.0.0"
    port: int = SERVER_PORT
    admin: str = "127.0.0.1:5380"  # "" = no operator view
    pool: tuple = (IPv4Network("5.5.5.0/29"),)  # public-looking on purpose
    port_range: tuple = (1024, 65535)
    min_lifetime: int = 120  # RFC 6887 section 15: min SHOULD be 120 s
    max_lifetime: int = 3600
    quota: int = 0  # mappings per subscriber; 0 = no limit
    known_third_party_ids: frozenset | None = None  # None = accept any
    third_party_id_lengths: frozenset | None = None  # None = any 1..1016
    require_third_party_id: bool = False
    third_party_id: str = "supported"
    allow_third_party: bool = True
    announce_count: int = 3
    announce_multicast: bool = False
    max_filters: int = 4  # 0 = FILTER disabled (UNSUPP_OPTION)
    warnings: tuple = field(default=(), compare=False)

    def pool_addresses(self) -> list:
        """The external addresses, in order: hosts of each network (all of a /31, /32, /127, /128)."""
        out = []
        for net in self.pool:
            out.extend(net.hosts() if net.num_addresses > 2 else net)
        return list(dict.fromkeys(out))

    @property
    def admin_endpoint(self):
        """(host, port) of the operator view, or None when disabled."""
        return _split_endpoint(self.admin) if self.admin else None


# ------------------------------------------------------------ value parsers
# Each takes the raw value and returns the stored one, or raises ValueError
# with a reason; the caller puts the key in front.

def _int(lo, hi):
    def parse(value):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"expected an integer {lo}..{hi}, got {value!r}")
        return value
    return parse


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _address(value):
    try:
        return str(ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _split_endpoint(value):
    host, sep, port = str(value).rpartition(":")
    if not sep:
        raise ValueError(f"expected ADDR:PORT, got {value!r}")
    host = host.strip("[]")
    return _address(host), _int(0, 65535)(port)


def _admin(value):
    if value in ("", "off"):
        return ""
    host, port = _split_endpoint(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pool(value):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("expected a non-empty list of CIDRs or addresses")
    nets = []
    for item in items:
        try:
            nets.append(ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR or address") from None
    size = sum(n.num_addresses for n in nets)
    if size > MAX_POOL_SIZE:
        raise ValueError(f"{size} addresses is more than {MAX_POOL_SIZE}; use a smaller pool")
    return tuple(nets)


def _port_range(value):
    if isinstance(value, str) and "-" in value:
        value = value.split("-", 1)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected [LOW, HIGH] or \"LOW-HIGH\", got {value!r}")
    lo, hi = (_int(1, 65535)(v) for v in value)
    if lo > hi:
        raise ValueError(f"low end {lo} is above high end {hi}")
    return lo, hi


def _tpids(value):
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list like [\"vxlan:1001\", \"hex:0a0b\", \"text:sub-1\"]")
    out = set()
    for i, spec in enumerate(value):
        try:
            out.add(tpid.parse(str(spec)))
        except ValueError as e:
            raise ValueError(f"[{i}] {spec!r}: {e}") from None
    return frozenset(out)


def _lengths(value):
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("expected a non-empty list of octet counts")
    return frozenset(_int(1, MAX_THIRD_PARTY_ID_SIZE)(v) for v in value)


def _choice(*allowed):
    def parse(value):
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    return parse


KEYS = {
    "listen": _address,
    "port": _int(0, 65535),
    "admin": _admin,
    "pool": _pool,
    "port_range": _port_range,
    "min_lifetime": _int(1, MAX_LIFETIME_FIELD),
    "max_lifetime": _int(1, MAX_LIFETIME_FIELD),
    "quota": _int(0, 2**31),
    "known_third_party_ids": _tpids,
    "third_party_id_lengths": _lengths,
    "require_third_party_id": _bool,
    "third_party_id": _choice("supported", "unsupported"),
    "allow_third_party": _bool,
    "announce_count": _int(0, MAX_ANNOUNCES),
    "announce_multicast": _bool,
    "max_filters": _int(0, 64),
}
assert set(KEYS) == {f.name for f in fields(CGNConfig)} - {"warnings"}


def build(settings: dict, names: dict | None = None) -> CGNConfig:
    """A CGNConfig from raw values; ``names`` gives the spelling used in errors per key."""
    names = names or {}
    values = {}
    for key, raw in settings.items():
        label = names.get(key, f"cgn.{key}")
        if key not in KEYS:
            raise ConfigError(f"{label}: unknown key (known: {', '.join(KEYS)})")
        try:
            values[key] = KEYS[key](raw)
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
    config = CGNConfig(**values)
    if config.min_lifetime > config.max_lifetime:
        raise ConfigError(f"{names.get('min_lifetime', 'cgn.min_lifetime')}: "
                          f"{config.min_lifetime} is above max_lifetime {config.max_lifetime}")
    return replace(config, warnings=_warnings(config, names.get("pool", "cgn.pool")))


def _warnings(config: CGNConfig, label: str) -> tuple:
    out = []
    for net in config.pool:
        if isinstance(net, (IPv4Network, IPv6Network)) and any(
            net.overlaps(r) for r in RESERVED_NETWORKS if r.version == net.version
        ):
            out.append(f"{label}: {net} is a reserved range; miniupnpc and other UPnP clients "
                       "refuse a reserved external address (use e.g. 5.5.5.0/29)")
    return tuple(out)


def read_file(path: str) -> dict:
    """The ``[cgn]`` table of a TOML file, as raw values."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key in document:
        if key != "cgn":
            raise ConfigError(f"{key}: unknown table or key; settings go under [cgn]")
    table = document.get("cgn", {})
    if not isinstance(table, dict):
        raise ConfigError("cgn: expected a table [cgn]")
    return table


def load(path: str | None = None, overrides: dict | None = None) -> CGNConfig:
    """File settings (if any), then command-line ``overrides`` (named ``--key`` in errors)."""
    settings = read_file(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {k: f"--{k}" for k in overrides}
    settings.update(overrides)
    return build(settings, names)
