"""Keeps promised mappings alive on the CGN: renewals, lease ends, re-creation.

Every live record has exactly one timer: its next renewal (RFC 6887 section
11.2.1 schedule) or its lease end, whichever comes first.  A UPnP lease is
emulated by PCP renewals (RFC 6970 section 5.9); the last renewal asks only
for what is left of the lease (iwf.md G.14) and a lease end deletes the
mapping on the CGN.  Re-creation after server state loss or an IWF restart
goes through a paced queue, not a storm.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from ..logs import logger

from ..pcp.client import MapSpec, PCPSuperseded, PCPTimeout
from ..pcp.constants import MIN_RENEWAL_GAP, ResultCode
from ..pcp.schedule import RetransmitPolicy, next_renewal
from .records import PROTOCOL_NUMBERS, MappingRecord
from .timerqueue import TimerQueue

log = logger(__name__)

# After a mapping's PCP lifetime ran out without a successful renewal, keep trying at this pace.
LATE_RETRY = 15.0
RENEWAL_POLICY = RetransmitPolicy()  # RFC 6887 defaults; each attempt is bounded below
# Results that mean the CGN will never give this mapping back.
FATAL = {ResultCode.CANNOT_PROVIDE_EXTERNAL, ResultCode.NOT_AUTHORIZED}


def map_spec(record: MappingRecord, lifetime: int, *, suggest: bool = True,
             prefer_failure: bool | None = None, description: bool = True) -> MapSpec:
    """The MAP request that creates or renews ``record`` (same nonce every time)."""
    if prefer_failure is None:
        prefer_failure = not record.any_port
    return MapSpec(
        nonce=record.nonce,
        protocol=PROTOCOL_NUMBERS[record.protocol],
        internal_address=record.internal_client,
        internal_port=record.internal_port,
        lifetime=lifetime,
        external_port=record.external_port if suggest else 0,
        external_address=record.external_address if suggest else None,
        third_party_id=record.subscriber.third_party_id,
        prefer_failure=prefer_failure,
        description=record.description if description else None,
    )


class Keeper:
    """Owns the timers.  ``iwf`` gives it records and receives outcomes through
    ``renewed(record, result)`` and ``lost(record, result)`` / ``lease_ended(record)``."""

    def __init__(self, reactor, client, iwf, *, pcp_lifetime: int, rng, recovery_rate: float = 200.0):
        self.reactor = reactor
        self.client = client
        self.iwf = iwf
        self.pcp_lifetime = pcp_lifetime
        self.rng = rng
        self.recovery_rate = recovery_rate
        self.timers = TimerQueue(reactor)  # record identity -> its renewal or lease-end call
        self.attempts: dict = {}  # record identity -> failed renewal attempts in a row
        self.queue: deque = deque()
        self.queued: set = set()
        self.pacer = None
        self.stats = iwf.stats

    @staticmethod
    def ident(record: MappingRecord):
        return (record.subscriber.tunnel, record.key)

    def lifetime_for(self, record: MappingRecord, now: float) -> int:
        """What to ask the CGN for: the PCP lifetime, but no more than the lease left."""
        if record.lease_end is None:
            return self.pcp_lifetime
        return max(1, min(self.pcp_lifetime, int(record.lease_end - now + 0.999)))

    # -- scheduling
    def schedule(self, record: MappingRecord) -> None:
        """(Re)arm the one timer of a freshly granted or renewed record."""
        now = self.reactor.seconds()
        ident = self.ident(record)
        attempt = self.attempts.get(ident, 0)
        elapsed = now - record.granted_at
        delay = next_renewal(record.granted_lifetime, attempt, elapsed, self.rng)
        if delay is None:
            delay = LATE_RETRY if now >= record.pcp_expiry else max(
                MIN_RENEWAL_GAP, record.pcp_expiry - now - 1)
        action = self.renew
        if record.lease_end is not None and record.lease_end - now <= delay:
            delay, action = max(0.0, record.lease_end - now), self.end_lease
        self.timers.schedule(ident, delay, action, record)

    def cancel(self, record: MappingRecord) -> None:
        ident = self.ident(record)
        self.timers.cancel(ident)
        self.attempts.pop(ident, None)
        self.queued.discard(ident)

    def stop(self) -> None:
        self.timers.stop()
        if self.pacer is not None and self.pacer.active():
            self.pacer.cancel()
        self.pacer = None

    # -- renewal
    def renew(self, record: MappingRecord) -> defer.Deferred:
        self.timers.cancel(self.ident(record))
        current = self.iwf.current(record)
        if current is None:
            return defer.succeed(None)
        record = current
        now = self.reactor.seconds()
        if now > record.pcp_expiry and record.granted_lifetime:
            self.stats["renewals_late"] += 1
        self.stats["renewals_sent"] += 1
        spec = map_spec(record, self.lifetime_for(record, now))
        # Bound this attempt so the next one (section 11.2.1) can start on time.
        bound = max(MIN_RENEWAL_GAP, (record.pcp_expiry - now) / 4 if record.pcp_expiry > now else LATE_RETRY)
        d = self.client.map(record.server, spec, deadline=bound, policy=RENEWAL_POLICY)
        d.addCallbacks(self._renewal_answer, self._renewal_failed,
                       callbackArgs=(record,), errbackArgs=(record,))
        return d

    def _renewal_answer(self, result, record):
        ident = self.ident(record)
        if result.ok:
            self.attempts.pop(ident, None)
            self.stats["renewals_ok"] += 1
            self.iwf.renewed(record, result)
            return
        if result.result in FATAL and not record.any_port:
            self.stats["renewals_refused"] += 1
            self.iwf.lost(record, result.result)
            return
        self._retry_later(record)

    def _renewal_failed(self, failure, record):
        failure.trap(PCPTimeout, PCPSuperseded)
        if failure.check(PCPSuperseded):
            return  # a newer request for the same mapping is in flight and will reschedule
        self._retry_later(record)

    def _retry_later(self, record):
        ident = self.ident(record)
        self.stats["renewals_failed"] += 1
        self.attempts[ident] = self.attempts.get(ident, 0) + 1
        current = self.iwf.current(record)
        if current is not None:
            self.schedule(current)

    # -- lease end
    def end_lease(self, record: MappingRecord) -> None:
        self.timers.cancel(self.ident(record))
        current = self.iwf.current(record)
        if current is not None:
            self.stats["leases_ended"] += 1
            self.iwf.lease_ended(current)

    # -- paced re-creation (state loss, restart)
    def recreate(self, records, initial_delay: float = 0.0) -> None:
        for record in records:
            ident = self.ident(record)
            if ident not in self.queued:
                self.queued.add(ident)
                self.queue.append(record)
        if self.pacer is None and self.queue:
            self.pacer = self.reactor.callLater(initial_delay, self._pace)

    def _pace(self) -> None:
        tick = 0.05
        batch = max(1, int(self.recovery_rate * tick))
        while self.queue and batch:
            record = self.queue.popleft()
            ident = self.ident(record)
            if ident not in self.queued:
                continue
            self.queued.discard(ident)
            self.stats["recreations_sent"] += 1
            self.renew(record)
            batch -= 1
        self.pacer = self.reactor.callLater(tick, self._pace) if self.queue else None
