"""``twistd igdpcp``: the IWF as a twistd plugin (shape of twisted/names/tap.py)."""

from __future__ import annotations

import os

from twisted.python import usage

from . import config as configuration
from .workers import Shard


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = ("Runs the UPnP IGD-PCP Interworking Function: an IGD on each subscriber "
                "tunnel, PCP (RFC 6887, RFC 7843) towards the CGN.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (see README.md)"],
        ["worker", None, None, "internal: run as worker I/N of a supervisor ([process] workers)"],
    ]

    def parseOptions(self, options=None):
        # A bad config is one line naming the key, not a usage dump.
        try:
            super().parseOptions(options)
        except configuration.ConfigError as e:
            raise SystemExit(f"igdpcp: {e}") from None

    def postOptions(self):
        if self["config"] is None:
            self.config = configuration.Config()
        else:
            self.config = configuration.load(self["config"])
        self.shard = None
        if self["worker"] is not None:
            try:
                self.shard = Shard.parse(self["worker"])
            except ValueError as e:
                raise SystemExit(f"igdpcp: {e}") from None


def makeService(options):
    """igdpcp itself; with ``[process] workers`` > 1, a supervisor of that many."""
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    from .service import make_service, make_supervisor, make_worker
    config = options.config
    try:
        if options.shard is not None:
            return make_worker(reactor, config, options.shard, globalLogPublisher)
        if config.workers > 1:
            return make_supervisor(reactor, config, os.path.abspath(options["config"]),
                                   globalLogPublisher)
        return make_service(reactor, config)
    except configuration.ConfigError as e:  # found only when opening it (store.path)
        raise SystemExit(f"igdpcp: {e}") from None
