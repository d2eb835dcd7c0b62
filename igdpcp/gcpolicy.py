"""How igdpcp uses Python's cyclic garbage collector with 100,000s of live mappings.

Each mapping is a dozen long-lived objects, and a renewal replaces its record
and its timer.  Python counts *net* allocations towards a young collection,
so renewals hardly move that count while the young generation fills with
survivors; the collection that finally comes walks all of them (0.4 s at
100,000 mappings, bench/bench_renewals.py), and with the default policy every
full collection walks every mapping (0.9 s).  Either stalls SOAP answers and
renewals.  So:

* every ``young`` seconds (0.25) a collection of generations 0 and 1 runs,
  walking only what was made since the last one (a 1 s period left pauses
  of 95 ms; 0.25 s, 25 ms);
* the survivors of every collection of generation 1 or 2 are moved to the
  permanent generation (``gc.freeze``), so later collections never walk them
  again;
* Python's own young collections start after 5,000 net new objects instead
  of 700: at 700 one ran every ten SOAP requests or so and walked the
  objects of every request still in flight (about 1,000 of them, 70-85 us
  each time).  With the timed pass doing most of the work, collection time
  per AddPortMapping fell from 9.5 to 5.6 us, and closed-loop runs answered
  3-10% more in 5 of 6 pairs; the longest young pause went from 0.4 to 2 ms;
* acyclic objects that die later are still freed by reference counting; to
  bound what frozen *cycles* could hold, everything is unfrozen and collected
  once every ``sweep`` seconds (one long pause an hour by default).
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

SWEEP_SECONDS = 3600.0
YOUNG_SECONDS = 0.25
YOUNG_THRESHOLD = 5000  # net new container objects before Python's own young collection


def _freeze_survivors(phase: str, info: dict) -> None:
    if phase == "stop" and info.get("generation", 0) >= 1:
        gc.freeze()


def young_pass() -> None:
    """Collect generations 0 and 1; the callback freezes what survives."""
    gc.collect(1)


def full_sweep() -> None:
    """Unfreeze, collect everything, freeze the survivors again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class GCPolicy:
    """The installed policy: its two timers on ``clock``."""

    def __init__(self, clock, sweep: float, young: float):
        self.threshold = gc.get_threshold()  # restored by uninstall()
        self.loops = []
        for period, action in ((young, young_pass), (sweep, full_sweep)):
            loop = LoopingCall(action)
            loop.clock = clock
            loop.start(period, now=False)
            self.loops.append(loop)

    def stop(self) -> None:
        for loop in self.loops:
            if loop.running:
                loop.stop()


def install(clock, sweep: float = SWEEP_SECONDS, young: float = YOUNG_SECONDS,
            threshold: int = YOUNG_THRESHOLD) -> GCPolicy:
    """Freeze now and after every collection of generation 1 or 2; a young pass every
    ``young`` s and a sweep every ``sweep`` s on ``clock``; Python's own young
    collections after ``threshold`` net new objects."""
    gc.freeze()
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
    policy = GCPolicy(clock, sweep, young)
    gc.set_threshold(threshold, *policy.threshold[1:])
    return policy


def uninstall(policy: GCPolicy | None = None) -> None:
    if _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)
    if policy is not None:
        policy.stop()
        gc.set_threshold(*policy.threshold)
    gc.unfreeze()


class GCPolicyService(Service):
    """The policy for as long as a process's service runs (igdpcp, its workers, the lab CGN)."""

    name = "gc-policy"

    def __init__(self, clock):
        self.clock = clock
        self.policy = None

    def startService(self):
        super().startService()
        self.policy = install(self.clock)

    def stopService(self):
        super().stopService()
        uninstall(self.policy)
        self.policy = None
