"""Wires the layers together (the only place besides the twistd plugins that does).

PCP client -> IWF (with its store) -> one front end per tunnel.  Start-up
order matters: the store is restored and its mappings queued for renewal
before any tunnel listens.
"""

from __future__ import annotations

import os
import resource
import time

from twisted.application.service import MultiService, Service
from twisted.internet import threads

from .config import Config, ConfigError
from .gcpolicy import GCPolicyService
from .iwf.core import InterworkingFunction
from .iwf.exchange import CallBound
from .iwf.store import SQLiteStore, StoreError
from .logs import logger, set_level
from .pcp.client import PCPClient, ServerAddress
from .subscriber import pseudonym, set_pseudonym_key
from .tunnels import hostsetup
from .tunnels.frontend import FrontEndSettings
from .tunnels.idsource import make_source
from .tunnels.manager import TunnelManager
from .tunnels.netlink import LinkWatcher
from .tunnels.shared_ssdp import SharedSSDPService
from .workers import Shard, SupervisorLink, WorkerPool, reshard, worker_argv


log = logger(__name__)

FDS_RESERVE = 64


def raise_file_limit(tunnels: int, fds_per_tunnel: int = 2) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (a common soft 1024 stops at
    about 500 tunnels) and warn when even that is too small; returns the limit.

    A tunnel takes two descriptors (HTTP and SSDP), or one with a shared SSDP socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    need = fds_per_tunnel * tunnels + FDS_RESERVE
    if need > soft:
        hint = " (igd.ssdp_socket = \"shared\" needs one per tunnel)" if fds_per_tunnel > 1 else ""
        log.warn("open-file limit {limit} is below the {need} that {n} tunnels need{hint}",
                 limit=soft, need=need, n=tunnels, hint=hint)
    return soft


def privacy_key(config: Config) -> bytes:
    """The key for UDNs and log pseudonyms: from the config, else kept beside the store
    (0600), so UDNs stay the same across restarts without being derivable from tunnel IDs."""
    if config.privacy_key is not None:
        return config.privacy_key
    path = config.store_path + ".key"
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key = os.urandom(32)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class CoreService(Service):
    """The PCP client, the store and the IWF, started and stopped in order."""

    name = "core"

    def __init__(self, reactor, config: Config, shard: Shard = Shard()):
        self.reactor = reactor
        self.config = config
        self.client = PCPClient(
            reactor, {s.name: ServerAddress(s.address, s.port) for s in config.servers},
            bind=config.pcp_bind)
        try:
            self.store = SQLiteStore(shard.store_path(config.store_path), config.store_sync)
        except StoreError as e:
            raise ConfigError(f"store.path: {e}") from None
        # pcp.recovery_rate is what the CGN sees from igdpcp as a whole: each worker takes its share.
        self.iwf = InterworkingFunction(
            reactor, self.client, self.store, config.policy,
            bound=CallBound(deadline=config.soap_deadline), probe_specific=config.probe_specific,
            recovery_rate=config.recovery_rate / shard.count)

    def startService(self):
        super().startService()
        self.client.start()
        self.iwf.restore()

    def stopService(self):
        super().stopService()
        self.iwf.stop()
        d = self.client.stop()
        d.addBoth(lambda r: self.store.close())
        return d


def make_service(reactor, config: Config, shard: Shard = Shard()) -> MultiService:
    """igdpcp in this process: all tunnels, or those of ``shard`` in a worker."""
    key = _log_setup(config)
    shared = config.ssdp_socket == "shared"
    raise_file_limit(len(config.tunnels) // shard.count + 1, 1 if shared else 2)
    if shard.count == 1:
        _store_rows_to_owners(config)  # from a run with more workers
    top = MultiService()
    # Front ends and mappings are long-lived: keep them out of the collector's passes.
    GCPolicyService(reactor).setServiceParent(top)
    core = CoreService(reactor, config, shard)
    core.setServiceParent(top)
    ssdp = None
    if shared:  # started before the tunnels, stopped after their byebyes
        ssdp = SharedSSDPService(reactor)
        ssdp.setServiceParent(top)
    settings = FrontEndSettings(
        igd_version=config.igd_version, http_port=config.http_port,
        friendly_name=config.friendly_name, udn_secret=key,
        advertise_interval=config.advertise_interval,
        boot_id=int(time.time()) & 0x7FFFFFFF,  # UDA 1.1: grows with every boot
        shared_ssdp=ssdp.port if ssdp is not None else None,
    )
    ids = make_source(config.ids, reactor) if config.ids else None
    manager = TunnelManager(reactor, core.iwf, settings, ids, dynamic=config.dynamic,
                            static={t.interface: t for t in config.tunnels}, owns=shard.owns)
    manager.setServiceParent(top)
    WatcherService(LinkWatcher(reactor, manager), ids,
                   [t.interface for t in config.tunnels if shard.owns(t.name)]).setServiceParent(top)
    return top


class WatcherService(Service):
    """Feeds netlink link events to the tunnel manager (static tunnels too, so a
    re-created interface is re-bound), and runs the ID source if it has a socket."""

    name = "links"

    def __init__(self, watcher: LinkWatcher, ids, static_interfaces=()):
        self.watcher = watcher
        self.ids = ids
        self.static_interfaces = list(static_interfaces)

    def startService(self):
        super().startService()
        if hasattr(self.ids, "start"):
            self.ids.start()
        self.watcher.start()
        if self.static_interfaces:
            d = threads.deferToThread(hostsetup.startup_warnings, self.static_interfaces)
            d.addCallback(self._warn_private)

    def _warn_private(self, lines) -> None:
        """Interface names can carry tunnel IDs (vxlan1001): the log gets pseudonyms."""
        for line in lines:
            for name in sorted(self.static_interfaces, key=len, reverse=True):
                line = line.replace(name, pseudonym(name))
            log.warn("{line}", line=line)

    def stopService(self):
        super().stopService()
        self.watcher.stop()
        if hasattr(self.ids, "stop"):
            return self.ids.stop()


def _log_setup(config: Config) -> bytes:
    """log.level, and the privacy key (made if missing) that log pseudonyms use; returns it."""
    set_level(config.log_level)
    key = privacy_key(config)
    set_pseudonym_key(key)
    return key


def _store_rows_to_owners(config: Config) -> None:
    """Move rows left by a run with another worker count to their tunnel's worker's file."""
    try:
        moved = reshard(config.store_path, config.workers, config.store_sync)
    except StoreError as e:
        raise ConfigError(f"store.path: {e}") from None
    if moved:
        log.info("{moved} stored mappings moved to the file of their tunnel's worker "
                 "({count} workers now)", moved=moved, count=config.workers)


def make_worker(reactor, config: Config, shard: Shard, publish) -> MultiService:
    """One worker: igdpcp for its shard, with a heartbeat to its supervisor, ending
    when the supervisor's pipe closes."""
    top = make_service(reactor, config, shard)
    SupervisorLink(reactor, publish).setServiceParent(top)
    return top


def make_supervisor(reactor, config: Config, config_path: str, publish) -> WorkerPool:
    """``config.workers`` workers.  The privacy key is made here, once, because every
    worker must derive the same UDNs; stored mappings move to their tunnel's worker."""
    _log_setup(config)
    _store_rows_to_owners(config)
    return WorkerPool(reactor, config.workers,
                      lambda shard: worker_argv(config_path, shard), publish)
