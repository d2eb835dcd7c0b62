"""The lab CGN on UDP: a thin Twisted adapter around :class:`~igdpcp.pcplab.cgn.LabCGN`.

It feeds datagrams and the clock's time to the core, writes the answers
back, sweeps expired mappings now and then, and after :meth:`reboot` sends
the unsolicited ANNOUNCEs of RFC 6887 section 14.1.3.  ``silent`` turns the
server into a black hole, for the client's fault tests.
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from igdpcp.pcp.client import grow_receive_buffer

from .cgn import LabCGN

ANNOUNCE_FIRST_GAP = 0.25  # section 14.1.3: at least 250 ms, then doubling
SWEEP_INTERVAL = 10.0  # seconds between expiry sweeps


def announce_delays(count: int, first_gap: float = ANNOUNCE_FIRST_GAP) -> list:
    """When the unsolicited ANNOUNCEs go, from the reboot: 0, 0.25, 0.75, 1.75, ..."""
    delays, at, gap = [], 0.0, first_gap
    for _ in range(count):
        delays.append(at)
        at, gap = at + gap, gap * 2
    return delays


class PCPLabServer(DatagramProtocol):
    """UDP face of the lab CGN.  ``clock`` is an IReactorTime (a Clock in tests)."""

    log = Logger()

    def __init__(self, cgn: LabCGN, clock, sweep_interval: float = SWEEP_INTERVAL):
        self.cgn = cgn
        self.clock = clock
        self.silent = False
        self._sweep = LoopingCall(self._expire)
        self._sweep.clock = clock
        self._sweep_interval = sweep_interval
        self._announces = []  # pending IDelayedCalls

    def startProtocol(self):
        grow_receive_buffer(getattr(self.transport, "socket", None))
        self._sweep.start(self._sweep_interval, now=False)

    def stopProtocol(self):
        if self._sweep.running:
            self._sweep.stop()
        self._cancel_announces()

    def datagramReceived(self, data, addr):
        if self.silent:
            self.cgn.counters["dropped.silent"] += 1
            return
        host, port = addr[0], addr[1]
        try:
            answer = self.cgn.handle(data, host, port, self.clock.seconds())
        except Exception:
            # A bug must not take the lab down; the fuzz tests keep this at zero.
            self.cgn.counters["dropped.internal_error"] += 1
            self.log.failure("lab CGN failed on a request from {host}", host=host)
            return
        if answer is not None:
            self._write(answer, (host, port))

    def set_silent(self, on: bool) -> None:
        self.silent = bool(on)
        self.log.info("lab CGN silent mode {state}", state="on" if self.silent else "off")

    def reboot(self) -> list:
        """Lose all state (epoch back to 0) and schedule the unsolicited
        ANNOUNCEs; returns the delays they are sent at."""
        self.cgn.reboot(self.clock.seconds())
        self._cancel_announces()
        delays = announce_delays(self.cgn.config.announce_count)
        self._announces = [self.clock.callLater(d, self._announce) for d in delays]
        self.log.info("lab CGN rebooted; {count} ANNOUNCEs to {targets} targets",
                      count=len(delays), targets=len(self.cgn.announce_targets()))
        return delays

    def _announce(self):
        self._announces = [c for c in self._announces if c.active()]
        if self.silent or self.transport is None:
            return
        message = self.cgn.announce(self.clock.seconds())
        for target in self.cgn.announce_targets():
            self._write(message, target)

    def _cancel_announces(self):
        for call in self._announces:
            if call.active():
                call.cancel()
        self._announces = []

    def _expire(self):
        self.cgn.expire(self.clock.seconds())

    def _write(self, data: bytes, addr) -> None:
        try:
            self.transport.write(data, addr)
        except OSError as e:  # e.g. an IPv6 client on an IPv4 socket, no route
            self.cgn.counters["send_failed"] += 1
            self.log.warn("lab CGN could not send to {addr}: {error}", addr=addr, error=e)
