"""igdpcp's config: defaults, a full example, and one-line errors naming the key."""

import os
import subprocess
import sys
import tempfile

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from igdpcp import config, logs
from igdpcp.iwf.store import SQLiteStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ParseTests(SynchronousTestCase):
    def test_defaults(self):
        c = config.parse({})
        self.assertEqual(c.igd_version, 1)
        self.assertEqual(c.tunnels, ())
        self.assertEqual([s.name for s in c.servers], ["cgn"])

    def test_example_file(self):
        c = config.load(os.path.join(REPO, "examples", "demo.toml"))
        self.assertEqual([t.third_party_id for t in c.tunnels], [b"\x00\x03\xe9", b"\x00\x03\xea"])
        self.assertEqual({t.address for t in c.tunnels}, {"192.168.1.1"})
        self.assertEqual(c.policy.quota, 64)

    def assertKeyError(self, data, key):
        with self.assertRaises(config.ConfigError) as e:
            config.parse(data)
        message = str(e.exception)
        self.assertTrue(message.startswith(key + ":"), message)
        self.assertNotIn("\n", message)

    def test_errors_name_the_key(self):
        tunnel = {"interface": "tun1", "address": "192.168.1.1", "third_party_id": "vxlan:1"}
        cases = [
            ({"igd": {"version": 3}}, "igd.version"),
            ({"igd": {"http_port": "80"}}, "igd.http_port"),
            ({"igd": {"colour": 1}}, "igd.colour"),
            ({"pcp": {"servers": {"a": {"address": "nowhere"}}}}, "pcp.servers.a.address"),
            ({"pcp": {"servers": {"a": {}}}}, "pcp.servers.a.address"),
            ({"leases": {"min": 500, "max": 100}}, "leases.min"),
            ({"policy": {"rules": ["permit everything"]}}, "policy.rules[0]"),
            ({"store": {"synchronous": "sometimes"}}, "store.synchronous"),
            ({"log": {"level": "loud"}}, "log.level"),
            ({"privacy": {"key": "abcd"}}, "privacy.key"),
            ({"tunnels": [dict(tunnel, third_party_id="vxlan:x")]}, "tunnels[0].third_party_id"),
            ({"tunnels": [dict(tunnel, third_party_id="vxlan:16777216")]}, "tunnels[0].third_party_id"),
            ({"tunnels": [tunnel, dict(tunnel)]}, "tunnels[1].name"),
            ({"tunnels": [dict(tunnel, server="other")]}, "tunnels[0].server"),
            ({"tunnels": [{"interface": "tun1", "address": "192.168.1.1"}]}, "tunnels[0].third_party_id"),
            ({"tunnels": [dict(tunnel, address="192.168.1.300")]}, "tunnels[0].address"),
        ]
        for data, key in cases:
            self.assertKeyError(data, key)

    def test_process_workers(self):
        self.assertEqual(config.parse({}).workers, 1)
        self.assertEqual(config.parse({"process": {"workers": 3}}).workers, 3)
        self.assertEqual(config.parse({"process": {"workers": 256}}).workers, 256)
        auto = config.parse({"process": {"workers": "auto"}}).workers
        self.assertGreaterEqual(auto, 1)
        self.assertEqual(auto, len(os.sched_getaffinity(0)))  # the CPUs it may run on, not all
        # One worker may share the SSDP socket: it is plain igdpcp.
        self.assertEqual(config.parse({"process": {"workers": 1}, "igd": {"ssdp_socket": "shared"}}).workers, 1)

    def test_process_workers_errors(self):
        for value in (0, 257, 300, -1, "x", "AUTO", "", True, 2.0, [2]):
            self.assertKeyError({"process": {"workers": value}}, "process.workers")
        # Unicast M-SEARCHes to a shared port 1900 would reach one worker, maybe not the owner.
        self.assertKeyError({"process": {"workers": 2}, "igd": {"ssdp_socket": "shared"}}, "process.workers")
        self.assertKeyError({"process": {"foo": 1}}, "process.foo")
        self.assertKeyError({"process": 4}, "process")

    def twistd_lines(self, toml: str) -> list[str]:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(toml)
        self.addCleanup(os.unlink, f.name)
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "igdpcp",
                               "--config", f.name], capture_output=True, text=True, env=env,
                              timeout=60)
        self.assertNotEqual(proc.returncode, 0)
        return (proc.stdout + proc.stderr).strip().splitlines()

    def test_twistd_prints_one_line(self):
        self.assertEqual(self.twistd_lines("[leases]\nmax = -1\n"),
                         ["igdpcp: leases.max: must be between 1 and 2147483648"])

    def test_twistd_bad_workers_is_one_line(self):
        self.assertEqual(self.twistd_lines('[process]\nworkers = "many"\n'),
                         ['igdpcp: process.workers: expected an integer or "auto", got \'many\''])

    def test_store_in_use_is_one_line(self):
        path = os.path.join(tempfile.mkdtemp(), "mappings.sqlite")
        held = SQLiteStore(path)  # as if another igdpcp had it
        self.addCleanup(held.close)
        self.assertEqual(self.twistd_lines(f'[store]\npath = "{path}"\n'),
                         [f"igdpcp: store.path: {path} is in use by another process"])

    def test_store_in_use_with_workers_is_one_line(self):
        """The supervisor finds it when moving rows between the workers' files."""
        path = os.path.join(tempfile.mkdtemp(), "mappings.sqlite")
        held = SQLiteStore(path)
        self.addCleanup(held.close)
        self.assertEqual(self.twistd_lines(f'[store]\npath = "{path}"\n[process]\nworkers = 2\n'),
                         [f"igdpcp: store.path: {path} is in use by another process"])


class LogLevelTests(SynchronousTestCase):
    def test_level_filters_igdpcp_loggers(self):
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.addCleanup(logs.set_level, "info")
        log = logs.logger("igdpcp.test")
        logs.set_level("warn")
        log.info("hidden")
        log.warn("shown")
        logs.set_level("debug")
        log.debug("shown too")
        texts = [e["log_format"] for e in seen if e.get("log_namespace") == "igdpcp.test"]
        self.assertEqual(texts, ["shown", "shown too"])
        self.assertEqual(seen[-1]["log_level"], LogLevel.debug)
