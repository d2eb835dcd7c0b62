"""One bounded PCP exchange on behalf of a synchronous UPnP call.

UPnP SOAP waits for its answer, so every PCP exchange a control point causes
has a time bound (RFC 6970 section 5.1; iwf.md E.3).  Short-lifetime errors
are retried inside that bound (iwf.md E.11, E.13a) with a short pause instead
of RFC 6970's 30 s, which no control point waits for.  What is left is turned
into the IWF's typed errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import task

from ..pcp.client import PCPSuperseded, PCPTimeout
from ..pcp.constants import ResultCode, is_short_error
from ..pcp.schedule import RetransmitPolicy
from .errors import ServerFailure, ServerUnreachable, error_for_result


@dataclass(frozen=True, slots=True)
class CallBound:
    """How long a UPnP-triggered exchange may take, and how it retransmits.

    IRT is 1 s rather than RFC 6887's 3 s so that one lost datagram does not
    eat most of a SOAP call's budget (RFC 6887 section 8.1.1 says SHOULD).
    """

    deadline: float = 4.0
    policy: RetransmitPolicy = RetransmitPolicy(irt=1.0, mrt=2.0)
    retry_pause: float = 0.5
    max_conflict_retries: int = 2  # iwf.md E.13a default


async def bounded_map(reactor, client, server: str, spec, bound: CallBound, *, delete=False,
                      retry_short: bool = True):
    """Send ``spec`` and return the SUCCESS :class:`MapResult`, or raise an IWFError."""
    start = reactor.seconds()
    conflicts = 0
    send = client.delete if delete else client.map
    while True:
        remaining = bound.deadline - (reactor.seconds() - start)
        if remaining <= 0:
            raise ServerUnreachable("no answer from the CGN in time")
        try:
            result = await send(server, spec, deadline=remaining, policy=bound.policy)
        except PCPTimeout as e:
            raise ServerUnreachable(str(e)) from None
        except PCPSuperseded:
            raise ServerFailure("superseded by a newer request for the same mapping") from None
        if result.ok:
            return result
        code = result.result
        retry = retry_short and is_short_error(code, result.lifetime)
        if code == ResultCode.CANNOT_PROVIDE_EXTERNAL:
            conflicts += 1
            retry = retry and conflicts <= bound.max_conflict_retries
        left = bound.deadline - (reactor.seconds() - start)
        if not retry or left <= bound.retry_pause:
            raise error_for_result(code)
        await task.deferLater(reactor, bound.retry_pause, lambda: None)
