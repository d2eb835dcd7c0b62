"""PCP client timing: retransmission (RFC 6887 section 8.1.1) and renewal (section 11.2.1).

Pure arithmetic; the random source is passed in so tests can pin it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import MIN_RENEWAL_GAP

RAND_SPREAD = 0.1  # section 8.1.1: RAND uniform in [-0.1, +0.1]


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """IRT, MRT, MRC, MRD of section 8.1.1; 0 means "no limit" for the last three.

    The RFC defaults keep trying forever (renewals, probes).  A caller with a
    deadline (a SOAP call) passes its own deadline to the client instead.
    """

    irt: float = 3.0
    mrt: float = 1024.0
    mrc: int = 0
    mrd: float = 0.0

    def first(self, rng) -> float:
        """RT = (1 + RAND) * IRT."""
        return (1 + rng.uniform(-RAND_SPREAD, RAND_SPREAD)) * self.irt

    def next(self, previous: float, rng) -> float:
        """RT = (1 + RAND) * MIN(2 * RTprev, MRT), or no cap when MRT is 0."""
        doubled = 2 * previous
        if self.mrt:
            doubled = min(doubled, self.mrt)
        return (1 + rng.uniform(-RAND_SPREAD, RAND_SPREAD)) * doubled

    def exhausted(self, sends: int, elapsed: float) -> bool:
        """True once MRC transmissions were made or MRD seconds passed."""
        return bool((self.mrc and sends >= self.mrc) or (self.mrd and elapsed >= self.mrd))


RFC6887_DEFAULT = RetransmitPolicy()
# RFC 7488 section 3: four transmissions to an address before it counts as failed.
RFC7488_MRC = 4


def renewal_delay(lifetime: float, attempt: int, rng) -> float:
    """Seconds from the grant until renewal ``attempt`` (0, 1, 2, ...) is sent.

    Attempt 0 is uniform in [1/2, 5/8] of the lifetime; attempt n is in
    [1 - 2^-(n+1), 1 - 2^-(n+1) + 2^-(n+4)]: 3/4+1/16, 7/8+1/32, ... (section 11.2.1).
    """
    if attempt == 0:
        low, width = 0.5, 0.125
    else:
        low = 1 - 2.0 ** -(attempt + 1)
        width = 2.0 ** -(attempt + 4)
    return lifetime * (low + rng.uniform(0, width))


def next_renewal(lifetime: float, attempt: int, elapsed: float, rng) -> float | None:
    """Delay from now (``elapsed`` after the grant) until the next renewal,
    at least MIN_RENEWAL_GAP after the previous one; None when the mapping
    will expire before another renewal fits."""
    at = renewal_delay(lifetime, attempt, rng)
    if attempt:
        at = max(at, elapsed + MIN_RENEWAL_GAP)
    if at >= lifetime:
        return None
    return at - elapsed
