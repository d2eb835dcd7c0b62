"""``twistd igdpcp``: the IWF as a twistd plugin (shape of twisted/names/tap.py)."""

from __future__ import annotations

from twisted.python import usage

from . import config as configuration


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = ("Runs the UPnP IGD-PCP Interworking Function: an IGD on each subscriber "
                "tunnel, PCP (RFC 6887, RFC 7843) towards the CGN.")
    optParameters = [["config", "c", None, "TOML configuration file (see README.md)"]]

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


def makeService(options):
    from twisted.internet import reactor

    from .service import make_service
    try:
        return make_service(reactor, options.config)
    except configuration.ConfigError as e:  # found only when opening it (store.path)
        raise SystemExit(f"igdpcp: {e}") from None
