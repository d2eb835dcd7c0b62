"""``[process] workers``: one supervisor, worker processes each serving a shard of the tunnels.

Real namespaces, the lab CGN and ``upnpc`` as everywhere else; here each tunnel
must be served by the worker :func:`igdpcp.workers.shard_of` names, a killed
worker must come back with its mappings, and a changed worker count must lose
none.
"""

from __future__ import annotations

import os
import re
import signal
import time

from igdpcp.workers import shard_of

from .e2e import TopologyCase, listed

SUBSCRIBERS = 4
WORKERS = 2


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, parent PID, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


class WorkersTests(TopologyCase):
    prefix = "wk"
    topology_args = {"subscribers": SUBSCRIBERS, "workers": WORKERS}

    def owners(self) -> dict[int, int]:
        """Subscriber -> PID of the process listening for HTTP on its tunnel."""
        out = self.topo.lab.run(self.topo.iwf, ["ss", "-Hltnp"]).stdout
        found = {}
        for i in self.topo.subs:
            m = re.search(rf"%{self.topo.ifname(i)}:5000 .*pid=(\d+)", out)
            if m:
                found[i] = int(m.group(1))
        return found

    def wait_owners(self, timeout: float = 15.0) -> dict[int, int]:
        end = time.monotonic() + timeout
        while True:
            owners = self.owners()
            if len(owners) == SUBSCRIBERS or time.monotonic() > end:
                return owners
            time.sleep(0.1)

    def add(self, i: int, port: int) -> None:
        self.upnpc_ok(i, "-e", f"wk{i}", "-a", "192.168.1.10", str(port), str(port), "TCP")
        self.assertOnCGN(i, port, external_port=port)

    def test_tunnels_are_split_by_the_hash_of_their_name(self):
        owners = self.wait_owners()
        self.assertEqual(len(owners), SUBSCRIBERS, owners)
        supervisor = self.topo.igdpcp.popen.pid
        for pid in set(owners.values()):
            self.assertEqual(_parent(pid), supervisor, "a worker is not the supervisor's child")
        self.assertNotIn(supervisor, owners.values(), "the supervisor itself serves a tunnel")
        # Same shard -> same process; another shard -> another process.
        shard = {i: shard_of(f"subscriber-{i}", WORKERS) for i in owners}
        self.assertEqual(len(set(shard.values())), WORKERS, "the test needs tunnels on every worker")
        for i in owners:
            for j in owners:
                self.assertEqual(owners[i] == owners[j], shard[i] == shard[j], (owners, shard))

    def on_every_subscriber(self, call) -> None:
        """``call(i)`` for every subscriber at once (upnpc spends 2 s discovering)."""
        self.parallel(*(lambda i=i: call(i) for i in self.topo.subs))

    def assertListed(self, i: int, port: int, message: str = "") -> None:
        self.assertIn(("TCP", port, "192.168.1.10", port, f"wk{i}", 0), listed(self.upnpc_ok(i, "-l")),
                      f"subscriber {i} {message}")

    def test_every_worker_maps_with_its_subscribers_id(self):
        self.on_every_subscriber(lambda i: self.add(i, 9100 + i))
        self.on_every_subscriber(lambda i: self.assertListed(i, 9100 + i))
        self.on_every_subscriber(lambda i: self.upnpc_ok(i, "-d", str(9100 + i), "TCP"))
        self.assertEqual(self.topo.cgn_mappings(), [])

    def test_a_killed_worker_is_restarted_and_keeps_its_mappings(self):
        victim = next(i for i in self.topo.subs if shard_of(f"subscriber-{i}", WORKERS) == 1)
        bystander = next(i for i in self.topo.subs if shard_of(f"subscriber-{i}", WORKERS) == 0)
        self.parallel(lambda: self.add(victim, 9201), lambda: self.add(bystander, 9202))
        before = self.wait_owners()
        os.kill(before[victim], signal.SIGKILL)
        end = time.monotonic() + 15
        while self.owners().get(victim) in (None, before[victim]) and time.monotonic() < end:
            time.sleep(0.1)
        after = self.owners()
        self.assertNotIn(after.get(victim), (None, before[victim]), "the killed worker did not come back")
        self.assertEqual(after[bystander], before[bystander], "the other worker was disturbed")
        self.assertTrue(self.topo.igdpcp.running())
        # Restored from its store: listed, and deletable on the CGN.
        self.assertListed(victim, 9201)
        self.parallel(lambda: self.upnpc_ok(victim, "-d", "9201", "TCP"),
                      lambda: self.upnpc_ok(bystander, "-d", "9202", "TCP"))
        self.assertEqual(self.topo.cgn_mappings(), [])
        self.assertIn("ended (signal 9)", self.topo.igdpcp_log())

    def test_a_changed_worker_count_keeps_every_mapping(self):
        self.on_every_subscriber(lambda i: self.add(i, 9300 + i))
        try:
            for count in (1, 3):
                self.restart_with(count)
                owners = self.wait_owners()
                shards = {shard_of(f"subscriber-{i}", count) for i in self.topo.subs}
                self.assertEqual(len(set(owners.values())), len(shards), owners)
                self.on_every_subscriber(lambda i: self.assertListed(i, 9300 + i, f"{count} workers"))
        finally:
            self.restart_with(WORKERS)
        self.on_every_subscriber(lambda i: self.upnpc_ok(i, "-d", str(9300 + i), "TCP"))
        self.assertEqual(self.topo.cgn_mappings(), [])

    def restart_with(self, count: int) -> None:
        """Stop igdpcp (SIGTERM: workers first), set ``[process] workers``, start it again."""
        workers = set(self.owners().values())
        self.topo.kill_igdpcp(signal.SIGTERM)
        # twistd ends by re-raising the signal that stopped it (Twisted's _exitSignal).
        self.assertEqual(self.topo.igdpcp.popen.returncode, -signal.SIGTERM, self.topo.igdpcp_log()[-3000:])
        self.assertFalse([pid for pid in workers if _alive(pid)], "workers outlived the supervisor")
        with open(self.topo.igdpcp_conf) as f:
            text = f.read()
        with open(self.topo.igdpcp_conf, "w") as f:
            f.write(re.sub(r"(?m)^workers = \d+$", f"workers = {count}", text))
        self.topo.start_igdpcp()

    def test_workers_stop_when_the_supervisor_is_killed(self):
        workers = set(self.wait_owners().values())
        try:
            self.topo.kill_igdpcp(signal.SIGKILL)
            end = time.monotonic() + 10
            while any(_alive(pid) for pid in workers) and time.monotonic() < end:
                time.sleep(0.1)
            self.assertFalse([pid for pid in workers if _alive(pid)],
                             "workers kept running without their supervisor")
        finally:
            self.topo.start_igdpcp()
