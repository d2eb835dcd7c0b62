"""igdpcp's TOML configuration: one parser per key, one-line errors naming the key.

The embedded defaults run the demo: one PCP server at 127.0.0.1 and no
tunnels (tunnels come from the config).  Every value is checked at start-up;
a bad one raises :class:`ConfigError` whose message starts with the key, e.g.
``tunnels[1].third_party_id: vxlan: 'x' is not a number``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from ipaddress import ip_address

from twisted.python import usage

from .iwf.policy import DEFAULT_RULES, PermissionRule, Policy
from .pcp import tpid as tpids

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
MAX_WORKERS = 256


class ConfigError(usage.UsageError):
    """One line: the key, then what is wrong."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    address: str
    port: int = 5351


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    name: str
    interface: str
    address: str  # igdpcp's own address on the tunnel (LOCATION host)
    third_party_id: bytes = field(repr=False)
    server: str


@dataclass(frozen=True, slots=True)
class Config:
    igd_version: int = 1
    friendly_name: str = "igdpcp"
    http_port: int = 5000
    advertise_interval: float = 900.0
    ssdp_socket: str = "per-tunnel"  # or "shared" (tunnels/shared_ssdp.py)
    servers: tuple = (ServerConfig("cgn", "127.0.0.1"),)
    pcp_bind: str | None = None
    soap_deadline: float = 4.0
    policy: Policy = Policy()
    probe_specific: bool = True
    recovery_rate: float = 200.0
    store_path: str = "/var/lib/igdpcp/mappings.sqlite"
    store_sync: str = "normal"
    log_level: str = "info"
    privacy_key: bytes | None = field(default=None, repr=False)
    tunnels: tuple = ()
    dynamic: object = None  # tunnels.manager.DynamicTunnels, or None
    ids: dict = field(default_factory=dict, repr=False)  # the [ids] table, for idsource.make_source
    workers: int = 1  # worker processes, each owning a shard of the tunnels (igdpcp.workers)


def _err(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def _typed(table: dict, key: str, prefix: str, kind, default, check=None):
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _err(prefix + key, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
    if check is not None:
        problem = check(value)
        if problem:
            raise _err(prefix + key, problem)
    return value


def _range(low, high):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _address(value: str):
    try:
        ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def _unknown_keys(table: dict, allowed: set, prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise _err(prefix + key, "unknown key")


SSDP_SOCKETS = ("per-tunnel", "shared")


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    return parse(data)


def parse(data: dict) -> Config:
    _unknown_keys(data, {"igd", "pcp", "leases", "policy", "store", "log", "privacy", "tunnels",
                         "dynamic", "ids", "process"}, "")
    d = Config()
    igd = _table(data, "igd")
    _unknown_keys(igd, {"version", "friendly_name", "http_port", "advertise_interval", "ssdp_socket"},
                  "igd.")
    pcp = _table(data, "pcp")
    _unknown_keys(pcp, {"servers", "bind", "soap_deadline", "recovery_rate"}, "pcp.")
    leases = _table(data, "leases")
    _unknown_keys(leases, {"min", "max", "infinite", "pcp_lifetime"}, "leases.")
    pol = _table(data, "policy")
    _unknown_keys(pol, {"quota", "rules", "probe_specific"}, "policy.")
    store = _table(data, "store")
    _unknown_keys(store, {"path", "synchronous"}, "store.")
    logs = _table(data, "log")
    _unknown_keys(logs, {"level"}, "log.")
    privacy = _table(data, "privacy")
    _unknown_keys(privacy, {"key"}, "privacy.")
    process = _table(data, "process")
    _unknown_keys(process, {"workers"}, "process.")

    servers = _servers(pcp)
    policy = Policy(
        lease_min=_typed(leases, "min", "leases.", int, d.policy.lease_min, _range(1, 2**31)),
        lease_max=_typed(leases, "max", "leases.", int, d.policy.lease_max, _range(1, 2**31)),
        infinite_leases=_typed(leases, "infinite", "leases.", bool, d.policy.infinite_leases),
        pcp_lifetime=_typed(leases, "pcp_lifetime", "leases.", int, d.policy.pcp_lifetime,
                            _range(120, 86400)),
        quota=_typed(pol, "quota", "policy.", int, d.policy.quota, _range(1, 65535)),
        rules=_rules(pol),
    )
    if policy.lease_min > policy.lease_max:
        raise _err("leases.min", f"{policy.lease_min} is above leases.max ({policy.lease_max})")
    key = _typed(privacy, "key", "privacy.", str, None)
    if key is not None:
        try:
            key_bytes = bytes.fromhex(key)
        except ValueError:
            raise _err("privacy.key", "must be hex") from None
        if len(key_bytes) < 16:
            raise _err("privacy.key", "must be at least 16 octets (32 hex digits)")
    else:
        key_bytes = None
    workers = _workers(process)
    if workers > 1 and igd.get("ssdp_socket") == "shared":
        # Unicast M-SEARCHes to port 1900 would reach one worker's socket, maybe not the
        # tunnel's owner; per-tunnel sockets are bound to their interface.
        raise _err("process.workers", 'more than one worker needs igd.ssdp_socket = "per-tunnel"')
    if data.get("dynamic") and not data.get("ids"):
        raise _err("ids.source", "missing: [dynamic] tunnels need an ID source")
    return Config(
        igd_version=_typed(igd, "version", "igd.", int, d.igd_version,
                           lambda v: None if v in (1, 2) else "must be 1 or 2"),
        friendly_name=_typed(igd, "friendly_name", "igd.", str, d.friendly_name,
                             lambda v: None if 0 < len(v) <= 64 else "must be 1 to 64 characters"),
        http_port=_typed(igd, "http_port", "igd.", int, d.http_port, _range(1, 65535)),
        advertise_interval=_typed(igd, "advertise_interval", "igd.", float, d.advertise_interval,
                                  _range(60, 86400)),
        ssdp_socket=_typed(igd, "ssdp_socket", "igd.", str, d.ssdp_socket,
                           lambda v: None if v in SSDP_SOCKETS else "must be 'per-tunnel' or 'shared'"),
        servers=servers,
        pcp_bind=_typed(pcp, "bind", "pcp.", str, None, _address),
        soap_deadline=_typed(pcp, "soap_deadline", "pcp.", float, d.soap_deadline, _range(0.5, 30)),
        recovery_rate=_typed(pcp, "recovery_rate", "pcp.", float, d.recovery_rate, _range(1, 100000)),
        policy=policy,
        probe_specific=_typed(pol, "probe_specific", "policy.", bool, d.probe_specific),
        store_path=_typed(store, "path", "store.", str, d.store_path,
                          lambda v: None if v else "must not be empty"),
        store_sync=_typed(store, "synchronous", "store.", str, d.store_sync,
                          lambda v: None if v in ("normal", "full") else "must be 'normal' or 'full'"),
        log_level=_typed(logs, "level", "log.", str, d.log_level,
                         lambda v: None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"),
        privacy_key=key_bytes,
        tunnels=_tunnels(data, {s.name for s in servers}),
        dynamic=_dynamic(data, [s.name for s in servers]),
        ids=_ids(data),
        workers=workers,
    )


def _workers(process: dict) -> int:
    """An integer, or "auto": one per CPU this process may run on."""
    value = process.get("workers", 1)
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, str):
        raise _err("process.workers", f'expected an integer or "auto", got {value!r}')
    return _typed(process, "workers", "process.", int, 1, _range(1, MAX_WORKERS))


def _table(data: dict, key: str, prefix: str = "") -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _err(prefix + key, "must be a table")
    return value


def _servers(pcp: dict) -> tuple:
    servers = _table(pcp, "servers", "pcp.")
    if not servers:
        return Config().servers
    out = []
    for name, table in servers.items():
        prefix = f"pcp.servers.{name}."
        if not isinstance(table, dict):
            raise _err(prefix[:-1], "must be a table")
        _unknown_keys(table, {"address", "port"}, prefix)
        if "address" not in table:
            raise _err(prefix + "address", "missing")
        out.append(ServerConfig(
            name, _typed(table, "address", prefix, str, None, _address),
            _typed(table, "port", prefix, int, 5351, _range(1, 65535))))
    return tuple(out)


def _rules(pol: dict) -> tuple:
    if "rules" not in pol:
        return DEFAULT_RULES
    rules = pol["rules"]
    if not isinstance(rules, list) or not rules:
        raise _err("policy.rules", "must be a non-empty list of 'allow|deny EPORTS NETWORK IPORTS'")
    out = []
    for i, text in enumerate(rules):
        try:
            out.append(PermissionRule.parse(text))
        except (ValueError, AttributeError) as e:
            raise _err(f"policy.rules[{i}]", str(e)) from None
    return tuple(out)


def _tunnels(data: dict, server_names: set) -> tuple:
    tunnels = data.get("tunnels", [])
    if not isinstance(tunnels, list):
        raise _err("tunnels", "must be an array of tables ([[tunnels]])")
    out = []
    names, interfaces = set(), set()
    for i, table in enumerate(tunnels):
        prefix = f"tunnels[{i}]."
        if not isinstance(table, dict):
            raise _err(prefix[:-1], "must be a table")
        _unknown_keys(table, {"name", "interface", "address", "third_party_id", "server"}, prefix)
        for key in ("interface", "address", "third_party_id"):
            if key not in table:
                raise _err(prefix + key, "missing")
        interface = _typed(table, "interface", prefix, str, None,
                           lambda v: None if 0 < len(v) < 16 else "must be an interface name (1-15 characters)")
        name = _typed(table, "name", prefix, str, interface)
        spec = _typed(table, "third_party_id", prefix, str, None)
        try:
            value = tpids.parse(spec)
        except ValueError as e:
            raise _err(prefix + "third_party_id", str(e)) from None
        server = _typed(table, "server", prefix, str, next(iter(sorted(server_names))))
        if server not in server_names:
            raise _err(prefix + "server", f"no PCP server named {server!r} in [pcp.servers]")
        if name in names:
            raise _err(prefix + "name", f"duplicate tunnel name {name!r}")
        if interface in interfaces:
            raise _err(prefix + "interface", f"interface {interface!r} is used by another tunnel")
        names.add(name)
        interfaces.add(interface)
        out.append(TunnelConfig(name, interface, _typed(table, "address", prefix, str, None, _address),
                                value, server))
    return tuple(out)




def _dynamic(data: dict, server_names: list):
    """``[dynamic]``: interfaces matching ``pattern`` are tunnels, found at run time."""
    from .tunnels.manager import DynamicTunnels

    table = _table(data, "dynamic")
    if not table:
        return None
    _unknown_keys(table, {"pattern", "address", "server", "grace"}, "dynamic.")
    if "pattern" not in table:
        raise _err("dynamic.pattern", "missing")
    text = _typed(table, "pattern", "dynamic.", str, None)
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise _err("dynamic.pattern", f"not a regular expression: {e}") from None
    server = _typed(table, "server", "dynamic.", str, sorted(server_names)[0])
    if server not in server_names:
        raise _err("dynamic.server", f"no PCP server named {server!r} in [pcp.servers]")
    return DynamicTunnels(
        pattern=pattern,
        address=_typed(table, "address", "dynamic.", str, None, _address),
        server=server,
        grace=_typed(table, "grace", "dynamic.", float, 300.0, _range(0, 30 * 86400)),
    )


def _ids(data: dict) -> dict:
    """``[ids]``: where dynamic tunnels' THIRD_PARTY_IDs come from (checked by make_source)."""
    from .tunnels.idsource import make_source

    table = _table(data, "ids")
    if table and table.get("source") != "radius":
        try:
            make_source(table)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return table
