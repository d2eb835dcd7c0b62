"""Many timers on one reactor timer: the keeper's one timer per mapping.

Twisted keeps every ``callLater`` in one heap of DelayedCalls ordered by a
Python ``__lt__``, and drops cancelled calls by rebuilding that heap (a list
comprehension and a ``heapify``, in the reactor thread) once they outnumber
the live ones.  With a renewal timer per mapping, 100,000 mappings made
every timer operation of the process (a PCP retransmission, an HTTP
connection's idle timeout) walk a deep heap in Python, and every few
hundred thousand cancelled idle timeouts cost one rebuild of all of it.

A :class:`TimerQueue` keeps its own heap of ``(when, seq, key)`` tuples,
which ``heapq`` compares in C, and holds a single reactor timer for the
earliest.  A renewal timer is armed for a time later than the earliest one
almost always, so arming it costs no reactor call at all.  Cancelling or
re-arming a key leaves its old heap entry behind to be skipped; the heap is
rebuilt (in C) when those outnumber the live entries.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Hashable

from ..logs import logger

log = logger(__name__)


class TimerQueue:
    """``schedule(key, delay, fn, *args)`` runs ``fn(*args)`` after ``delay``
    seconds of ``clock``, unless the key is cancelled or scheduled again first.

    Calls due at the same time run in the order they were scheduled.  A call
    scheduled while due calls are running runs in a later reactor turn, as
    ``callLater(0, ...)`` would.  An exception from one call is logged and
    does not stop the others.
    """

    def __init__(self, clock):
        self.clock = clock
        self._heap: list[tuple[float, int, Hashable]] = []
        self._entries: dict[Hashable, tuple[float, int, Callable, tuple]] = {}
        self._seq = itertools.count()
        self._call = None  # the reactor timer for the earliest entry
        self._armed_for: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def when(self, key: Hashable) -> float | None:
        """The clock time at which ``key``'s call is due (None if it has none)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def schedule(self, key: Hashable, delay: float, fn: Callable, *args) -> None:
        when = self.clock.seconds() + max(0.0, delay)
        seq = next(self._seq)
        self._entries[key] = (when, seq, fn, args)
        heapq.heappush(self._heap, (when, seq, key))
        self._arm_by(when)
        self._maybe_compact()

    def cancel(self, key: Hashable) -> bool:
        """False if ``key`` had no pending call."""
        if self._entries.pop(key, None) is None:
            return False
        self._maybe_compact()
        return True

    def stop(self) -> None:
        """Cancel every call."""
        self._disarm()
        self._heap.clear()
        self._entries.clear()

    def _arm_by(self, when: float) -> None:
        """Have the reactor timer fire at ``when`` unless it already fires earlier."""
        if self._armed_for is not None and self._armed_for <= when:
            return
        self._disarm()
        self._armed_for = when
        self._call = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._fire)

    def _disarm(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._armed_for = None

    def _live(self, seq: int, key: Hashable):
        """The entry a heap item stands for, or None if it was cancelled or scheduled again."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry[1] == seq else None

    def _maybe_compact(self) -> None:
        """Drop the entries of cancelled and re-armed calls once they outnumber the live ones."""
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(when, seq, key) for key, (when, seq, _fn, _args) in self._entries.items()]
            heapq.heapify(self._heap)

    def _fire(self) -> None:
        self._call = self._armed_for = None
        now = self.clock.seconds()
        limit = next(self._seq)  # entries made by the calls below wait for a later turn
        heap = self._heap
        while heap and heap[0][0] <= now and heap[0][1] < limit:
            _when, seq, key = heapq.heappop(heap)
            entry = self._live(seq, key)
            if entry is None:
                continue
            del self._entries[key]
            try:
                entry[2](*entry[3])
            except Exception:
                log.failure("timer call {fn} failed", fn=getattr(entry[2], "__qualname__", entry[2]))
            heap = self._heap  # a call may have compacted it
        self._rearm()

    def _rearm(self) -> None:
        heap = self._heap
        while heap:
            when, seq, key = heap[0]
            if self._live(seq, key) is not None:
                self._arm_by(when)
                return
            heapq.heappop(heap)
