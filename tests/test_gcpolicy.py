"""The garbage-collector policy: survivors of older-generation collections are frozen, a
young pass runs on the clock, the sweep unfreezes."""

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from igdpcp import gcpolicy


class Cycle:
    def __init__(self):
        self.me = self


class GCPolicyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.loop = gcpolicy.install(self.clock, sweep=60)
        self.addCleanup(gcpolicy.uninstall, self.loop)

    def test_full_collection_freezes_survivors(self):
        keep = [Cycle() for _ in range(100)]
        gc.collect()
        self.assertGreater(gc.get_freeze_count(), 0)
        frozen = gc.get_freeze_count()
        more = [Cycle() for _ in range(100)]
        gc.collect(0)  # a generation-0 collection freezes nothing
        self.assertEqual(gc.get_freeze_count(), frozen)
        del keep, more

    def test_young_pass_on_the_clock_freezes_what_is_new(self):
        keep = Cycle()

        def collected():  # frozen objects are in no generation the collector walks
            return any(o is keep for o in gc.get_objects())
        self.assertTrue(collected())
        self.clock.advance(gcpolicy.YOUNG_SECONDS / 2)
        self.assertTrue(collected())
        self.clock.advance(gcpolicy.YOUNG_SECONDS / 2)
        self.assertFalse(collected())

    def test_sweep_collects_frozen_garbage(self):
        import weakref
        ghost = Cycle()
        ref = weakref.ref(ghost)
        gc.freeze()
        del ghost
        gc.collect()
        self.assertIsNotNone(ref())  # frozen: the collector does not see it
        self.clock.advance(60)  # the hourly (here: 60 s) sweep
        self.assertIsNone(ref())

    def test_young_threshold_while_installed(self):
        self.assertEqual(gc.get_threshold()[0], gcpolicy.YOUNG_THRESHOLD)
        self.assertEqual(gc.get_threshold()[1:], self.loop.threshold[1:])
        gcpolicy.uninstall(self.loop)
        self.assertEqual(gc.get_threshold(), self.loop.threshold)

    def test_uninstall(self):
        gcpolicy.uninstall(self.loop)
        self.assertNotIn(gcpolicy._freeze_survivors, gc.callbacks)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertFalse(any(loop.running for loop in self.loop.loops))
