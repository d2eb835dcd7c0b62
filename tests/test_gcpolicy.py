"""The garbage-collector policy: survivors of full collections are frozen, the sweep unfreezes."""

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
        gc.collect(0)  # a young collection freezes nothing
        self.assertEqual(gc.get_freeze_count(), frozen)
        del keep

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

    def test_uninstall(self):
        gcpolicy.uninstall(self.loop)
        self.assertNotIn(gcpolicy._freeze_after_full, gc.callbacks)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertFalse(self.loop.running)
