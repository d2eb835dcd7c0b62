"""TimerQueue: the keeper's per-mapping timers on one reactor timer."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.iwf.timerqueue import TimerQueue


class TimerQueueTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.timers = TimerQueue(self.clock)
        self.fired = []

    def note(self, name):
        self.fired.append((name, self.clock.seconds()))

    def test_a_call_runs_when_due_and_not_before(self):
        self.timers.schedule("a", 10, self.note, "a")
        self.assertEqual(self.timers.when("a"), 10)
        self.clock.advance(9.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [("a", 10)])
        self.assertNotIn("a", self.timers)
        self.assertEqual(len(self.timers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_scheduling_a_key_again_replaces_its_call(self):
        self.timers.schedule("a", 5, self.note, "first")
        self.timers.schedule("a", 8, self.note, "second")
        self.clock.advance(7)
        self.assertEqual(self.fired, [])
        self.clock.advance(1)
        self.assertEqual(self.fired, [("second", 8)])

    def test_an_earlier_call_rearms_the_reactor_timer(self):
        self.timers.schedule("late", 10, self.note, "late")
        self.timers.schedule("early", 3, self.note, "early")
        self.clock.advance(3)
        self.assertEqual(self.fired, [("early", 3)])
        self.clock.advance(7)
        self.assertEqual(self.fired, [("early", 3), ("late", 10)])

    def test_later_calls_hold_one_reactor_timer(self):
        for i in range(1000):
            self.timers.schedule(i, 100 + i, self.note, i)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(100 + 999)
        self.assertEqual([name for name, _ in self.fired], list(range(1000)))

    def test_cancel(self):
        self.timers.schedule("a", 5, self.note, "a")
        self.assertTrue(self.timers.cancel("a"))
        self.assertFalse(self.timers.cancel("a"))
        self.assertFalse(self.timers.cancel("never"))
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_calls_due_together_run_in_the_order_scheduled(self):
        for name in "cab":
            self.timers.schedule(name, 2, self.note, name)
        self.clock.advance(2)
        self.assertEqual([name for name, _ in self.fired], ["c", "a", "b"])

    def test_a_call_made_by_a_due_call_runs_in_a_later_turn(self):
        """As callLater(0) would: after what the reactor already had for this turn."""
        def first():
            self.note("first")
            self.clock.callLater(0, self.note, "plain callLater(0)")
            self.timers.schedule("second", 0, self.note, "second")
        self.timers.schedule("first", 1, first)
        self.clock.advance(1)
        self.assertEqual([name for name, _ in self.fired], ["first", "plain callLater(0)", "second"])

    def test_a_failing_call_is_logged_and_the_others_run(self):
        self.timers.schedule("bad", 1, lambda: 1 / 0)
        self.timers.schedule("good", 1, self.note, "good")
        self.clock.advance(1)
        self.assertEqual(self.fired, [("good", 1)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_rescheduling_does_not_grow_the_heap_without_bound(self):
        for i in range(10_000):
            self.timers.schedule("a", 100 + i % 7, self.note, "a")
            self.timers.schedule(("b", i % 10), 50, self.note, "b")
        self.assertEqual(len(self.timers), 11)
        self.assertLess(len(self.timers._heap), 2 * 11 + 64 + 2)
        self.clock.advance(200)
        self.assertEqual(len(self.fired), 11)

    def test_cancelling_does_not_leave_the_heap_full(self):
        for i in range(10_000):
            self.timers.schedule(i, 100, self.note, i)
        for i in range(9_990):
            self.timers.cancel(i)
        self.assertLess(len(self.timers._heap), 2 * 10 + 64 + 2)
        self.clock.advance(100)
        self.assertEqual([name for name, _ in self.fired], list(range(9_990, 10_000)))

    def test_stop_cancels_everything(self):
        for i in range(5):
            self.timers.schedule(i, i, self.note, i)
        self.timers.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["schedule", "cancel", "advance"]),
                              st.integers(0, 5), st.integers(0, 20)), max_size=60))
    def test_same_calls_as_one_reactor_timer_per_key(self, ops):
        """What fires, and when, is what callLater per key (cancel on reschedule) gives."""
        clock, model_clock = Clock(), Clock()
        timers, model = TimerQueue(clock), {}
        got, want = [], []
        for op, key, amount in ops:
            if op == "schedule":
                timers.schedule(key, amount, lambda k=key: got.append((k, clock.seconds())))
                old = model.pop(key, None)
                if old is not None and old.active():
                    old.cancel()
                model[key] = model_clock.callLater(
                    amount, lambda k=key: want.append((k, model_clock.seconds())))
            elif op == "cancel":
                old = model.pop(key, None)
                pending = old is not None and old.active()
                if pending:
                    old.cancel()
                self.assertEqual(timers.cancel(key), pending)
            else:
                clock.advance(amount)
                model_clock.advance(amount)
            self.assertEqual(sorted(got), sorted(want))
        clock.advance(100)
        model_clock.advance(100)
        self.assertEqual(sorted(got), sorted(want))
