"""The per-tunnel SSDP listener: a thin Twisted adapter around :mod:`igdpcp.upnp.ssdp`.

One :class:`SSDPProtocol` per subscriber tunnel.  The tunnels layer builds
the socket (SO_BINDTODEVICE, multicast join by ifindex, TTL 2; lab.md
sections 4-5) and attaches this protocol to it; here we only decide what to
send and when, through ``self.transport.write(data, addr)``.  The reactor
(for ``callLater`` and ``seconds``) and the random source are passed in, so
tests drive everything with :class:`twisted.internet.task.Clock`.

:func:`listen_ssdp` is a plain ``listenMulticast`` helper for tests and the
demo; it cannot tell overlapping tunnels apart.
"""

from __future__ import annotations

import errno

import ipaddress
from collections import Counter
from dataclasses import dataclass

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from igdpcp.upnp import ssdp
from igdpcp.upnp.device import Device

# Bound on answers waiting for their MX delay, so a flood of ssdp:all
# searches cannot grow memory or turn us into an amplifier without limit.
MAX_PENDING_ANSWERS = 256


@dataclass(frozen=True, slots=True)
class AdvertiseSchedule:
    """When NOTIFY sets go out (UDA 1.1 section 1.2.2; miniupnpd's numbers).

    The first set after ``initial_delay`` plus a random 0..``initial_delay_max`` s, the whole set
    ``repeats`` times ``repeat_gap`` s apart, then again every ``interval``
    minus a random ``jitter`` s (so below max-age/2 with the defaults).
    ``byebye_first`` None means: only for IGD:2 (igd.md section 4.2).
    ``interval`` None disables periodic announcements (tests).
    """

    interval: float | None = 900.0
    jitter: tuple[float, float] = (1.0, 64.0)
    repeats: int = 2
    repeat_gap: float = 0.25
    initial_delay_max: float = 0.1
    initial_delay: float = 0.0  # a pacing slot (tunnels.manager), before the random part
    byebye_first: bool | None = None

    def __post_init__(self):
        if not (1 <= self.repeats <= 3):
            raise ValueError("send the set at least once and at most 3 times (UDA 1.1)")
        low, high = self.jitter
        if not (0 <= low <= high):
            raise ValueError("jitter must be (low, high) with 0 <= low <= high")
        if self.interval is not None and self.interval - high <= self.repeat_gap * self.repeats:
            raise ValueError("interval must exceed the jitter and the repeated sets")


# The tunnel interface has gone (byebye "where still possible"): not worth a warning.
_GONE = {errno.ENODEV, errno.ENXIO, errno.ENETDOWN}


class SSDPProtocol(DatagramProtocol):
    """Answers M-SEARCH by unicast after the MX delay; announces alive and byebye.

    Stopping the port (``stopListening``) or calling :meth:`shutdown` sends
    the byebye set.  ``counters`` (received, answered, unmatched, ignored,
    dropped_malformed, dropped_bad_source, dropped_busy, sent, send_failed,
    announced) is for a metrics layer to read.
    """

    log = Logger()

    def __init__(self, reactor, device: Device, location: str, *, random,
                 boot_id: int = 1, config_id: int = 1, server: str = ssdp.SERVER,
                 max_age: int = ssdp.DEFAULT_MAX_AGE,
                 advertise: AdvertiseSchedule | None = AdvertiseSchedule(),
                 group: tuple[str, int] = (ssdp.MULTICAST_V4, ssdp.SSDP_PORT)):
        self.reactor = reactor
        self.device = device
        self.identity = ssdp.SSDPIdentity(location, server, boot_id, config_id, max_age)
        self.random = random
        self.advertise = advertise
        self.group = group
        host, port = group
        self.notify_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.counters: Counter[str] = Counter()
        self._pending: set = set()  # DelayedCalls: answers and announcements
        self._transport = None
        self._announced = False
        self._running = False

    # -- lifecycle ---------------------------------------------------------

    def startProtocol(self):
        self._running = True
        # doStop clears self.transport before stopProtocol, while the port's
        # socket is still open: keep it to say byebye on the way out.
        self._transport = self.transport
        if self.advertise is not None:
            delay = self.advertise.initial_delay + self.random.uniform(0.0, self.advertise.initial_delay_max)
            self._later(delay, self._announce, True)

    def stopProtocol(self):
        self.shutdown()

    def shutdown(self):
        """Cancel what is scheduled and send byebye for what was announced. Idempotent."""
        if not self._running:
            return
        self._running = False
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()
        if self._announced:
            self._announced = False
            self._send_set(ssdp.byebye_set(self.identity, self.device, self.notify_host))
        self._transport = None

    # -- announcements -----------------------------------------------------

    def _announce(self, first: bool):
        schedule = self.advertise
        if first and self._byebye_first():
            self._send_set(ssdp.byebye_set(self.identity, self.device, self.notify_host))
        self._send_alive()
        for n in range(1, schedule.repeats):
            self._later(n * schedule.repeat_gap, self._send_alive)
        if schedule.interval is not None:
            low, high = schedule.jitter
            self._later(schedule.interval - self.random.uniform(low, high), self._announce, False)

    def _byebye_first(self) -> bool:
        flag = self.advertise.byebye_first
        return self.device.version >= 2 if flag is None else flag

    def _send_alive(self):
        self._announced = True
        self._send_set(ssdp.alive_set(self.identity, self.device, self.notify_host))
        self.counters["announced"] += 1

    def _send_set(self, datagrams):
        for data in datagrams:
            self._write(data, self.group)

    # -- searches ----------------------------------------------------------

    def datagramReceived(self, data, addr):
        self.counters["received"] += 1
        try:
            message = ssdp.parse(data)
            if message.kind != ssdp.M_SEARCH:
                self.counters["ignored"] += 1  # other devices' NOTIFYs and answers
                return
            search = ssdp.parse_search(message)
        except ssdp.SSDPError:
            self.counters["dropped_malformed"] += 1
            return
        if not self._running:
            return
        if not _unicast_source(addr):
            self.counters["dropped_bad_source"] += 1  # nobody to answer, or a reflection attempt
            return
        plan = ssdp.plan_search(self.device, search, self.random)
        if not plan:
            self.counters["unmatched"] += 1
            return
        if len(self._pending) + len(plan) > MAX_PENDING_ANSWERS:
            self.counters["dropped_busy"] += 1
            return
        self.counters["answered"] += 1
        for delay, st, usn in plan:
            self._later(delay, self._answer, st, usn, addr)

    def _answer(self, st, usn, addr):
        now = self.reactor.seconds()
        self._write(ssdp.build_response(self.identity, st, usn, now), addr)

    # -- plumbing ----------------------------------------------------------

    def _later(self, delay, fn, *args):
        call = None

        def fire():
            self._pending.discard(call)
            fn(*args)

        call = self.reactor.callLater(delay, fire)
        self._pending.add(call)
        return call

    def _write(self, data, addr):
        transport = self.transport if self.transport is not None else self._transport
        if transport is None:
            return
        try:
            transport.write(data, addr)
        except OSError as e:  # a full buffer or a vanished interface must not stop the rest
            self.counters["send_failed"] += 1
            if self.counters["send_failed"] == 1 and e.errno not in _GONE:
                self.log.warn("SSDP send failed: {error}", error=e)  # once: counters say the rest
            return
        self.counters["sent"] += 1


def _unicast_source(addr) -> bool:
    try:
        host = ipaddress.ip_address(addr[0].partition("%")[0])
    except (ValueError, TypeError, IndexError):
        return False
    return addr[1] != 0 and not (host.is_multicast or host.is_unspecified)


def listen_ssdp(reactor, protocol: SSDPProtocol, interface_address: str,
                port: int = ssdp.SSDP_PORT, ttl: int = 2):
    """Listen on ``port`` and join the SSDP group on the interface with that address.

    For tests and single-tunnel demos only: joins by address, which is
    ambiguous when tunnels share an address (lab.md section 4).  Fires with
    the listening port.
    """
    listening = reactor.listenMulticast(port, protocol, listenMultiple=True)
    listening.setTTL(ttl)
    listening.setLoopbackMode(False)
    d = listening.setOutgoingInterface(interface_address)
    d.addCallback(lambda _: listening.joinGroup(protocol.group[0], interface_address))
    d.addCallback(lambda _: listening)
    return d
