"""How igdpcp uses Python's cyclic garbage collector with 100,000s of live mappings.

Each mapping is a dozen long-lived objects; with the default policy every
full collection walks all of them (about 1 s at 100,000 mappings), stalling
SOAP answers and renewals (bench/bench_iwf_soap.py, bench_renewals.py).
After each full collection the survivors are moved to the permanent
generation (``gc.freeze``), so later collections only walk what is new.
Acyclic objects that die later are still freed by reference counting; to
bound what frozen *cycles* could hold, everything is unfrozen and collected
once every ``sweep`` seconds (one long pause an hour by default).
"""

from __future__ import annotations

import gc

from twisted.internet.task import LoopingCall

SWEEP_SECONDS = 3600.0


def _freeze_after_full(phase: str, info: dict) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def full_sweep() -> None:
    """Unfreeze, collect everything, freeze the survivors again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def install(clock, sweep: float = SWEEP_SECONDS) -> LoopingCall:
    """Freeze now and after every full collection; sweep every ``sweep`` s on ``clock``."""
    gc.freeze()
    if _freeze_after_full not in gc.callbacks:
        gc.callbacks.append(_freeze_after_full)
    loop = LoopingCall(full_sweep)
    loop.clock = clock
    loop.start(sweep, now=False)
    return loop


def uninstall(loop: LoopingCall | None = None) -> None:
    if _freeze_after_full in gc.callbacks:
        gc.callbacks.remove(_freeze_after_full)
    if loop is not None and loop.running:
        loop.stop()
    gc.unfreeze()
