#!/usr/bin/env python3
"""Helper servers the benches run in child processes (not a benchmark itself).

    python3 bench/_servers.py echo-udp HOST PORT

Prints ``ready`` on stdout once listening; stops on SIGTERM.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol


class Echo(DatagramProtocol):
    """The bare Twisted UDP echo the PCP client is compared with."""

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


def main(argv) -> None:
    kind, host, port = argv[0], argv[1], int(argv[2])
    if kind != "echo-udp":
        raise SystemExit(f"unknown helper {kind!r}")
    reactor.listenUDP(port, Echo(), interface=host)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
