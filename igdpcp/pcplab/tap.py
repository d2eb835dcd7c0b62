"""``twistd pcplab``: the lab CGN as a twistd service (as ``twisted/names/tap.py`` does).

A bad setting ends start-up with one line naming the key, not a usage dump.
"""

from __future__ import annotations

from twisted.application import internet, service
from twisted.logger import Logger
from twisted.python import usage

from ..gcpolicy import GCPolicyService
from . import config as cfg
from .admin import make_site
from .cgn import LabCGN
from .server import PCPLabServer

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE.toml] [--listen ADDR] [--port N] [--admin ADDR:PORT] [--pool CIDR]..."
    longdesc = ("A lab CGN: a PCP server (RFC 6887) with THIRD_PARTY_ID (RFC 7843) for tests, "
                "demos and operators' labs.  Settings go in a [cgn] table of a TOML file; "
                "the command line overrides them.")
    optParameters = [
        ["config", "c", None, "TOML file with a [cgn] table"],
        ["listen", None, None, "address to serve PCP on [0.0.0.0]"],
        ["port", "p", None, "UDP port to serve PCP on [5351]"],
        ["admin", None, None, "ADDR:PORT of the JSON operator view, or 'off' [127.0.0.1:5380]"],
    ]

    def __init__(self):
        super().__init__()
        self["pool"] = []

    def opt_pool(self, value):
        """External address pool, a CIDR or address; repeat for more [5.5.5.0/29]"""
        self["pool"].append(value)

    def postOptions(self):
        overrides = {k: self[k] for k in ("listen", "port", "admin")}
        overrides["pool"] = self["pool"] or None
        self.cgn_config = cfg.load(self["config"], overrides)

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except cfg.ConfigError as e:
            raise SystemExit(f"pcplab: {e}") from None


def makeService(options) -> service.MultiService:
    """The PCP server on UDP plus, unless disabled, the operator view on TCP."""
    from twisted.internet import reactor  # only the tap touches the global reactor

    config = options.cgn_config
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    pcp = PCPLabServer(LabCGN(config, reactor.seconds()), reactor)
    top = service.MultiService()
    GCPolicyService(reactor).setServiceParent(top)  # a lab CGN holds 100,000 mappings in benches
    internet.UDPServer(config.port, pcp, interface=config.listen).setServiceParent(top)
    if config.admin_endpoint:
        host, port = config.admin_endpoint
        internet.TCPServer(port, make_site(pcp), interface=host).setServiceParent(top)
    log.info("lab CGN: PCP on {listen}:{port}, pool {pool}, operator view {admin}",
             listen=config.listen, port=config.port, admin=config.admin or "off",
             pool=", ".join(map(str, config.pool)))
    return top
