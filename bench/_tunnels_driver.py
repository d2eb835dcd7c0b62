"""igdpcp's per-tunnel front ends on many interfaces, for bench_tunnels.py (not a bench itself).

Run inside the netns that holds the tunnel interfaces::

    ip netns exec NS python3 bench/_tunnels_driver.py --names FILE --duration S

``FILE`` lists one interface name a line.  It raises RLIMIT_NOFILE, starts a
``TunnelFrontEnd`` (HTTP + SSDP, sockets bound to the interface; with
``--ssdp-socket shared`` one SSDP socket for all, as ``igd.ssdp_socket =
"shared"``) for every interface with a stub IWF, prints ``READY <json>`` once all are started,
runs the reactor for ``--duration`` seconds while recording when each SSDP
NOTIFY is handed to the kernel and how late the reactor is, then prints
``DONE <json>`` and exits (without stopping the front ends: 10,000 byebye
sets are not part of the figures; the stop time is measured on request).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T_IMPORT = time.monotonic()
from twisted.internet import defer, epollreactor  # noqa: E402

epollreactor.install()
from twisted.internet import reactor, task  # noqa: E402
from zope.interface import implementer  # noqa: E402

from igdpcp.interfaces import IPortMappingService  # noqa: E402
from igdpcp.iwf import errors  # noqa: E402
from igdpcp.tunnels import frontend as frontend_module  # noqa: E402
from igdpcp.tunnels.frontend import FrontEndSettings, TunnelFrontEnd  # noqa: E402
from igdpcp.tunnels.manager import ANNOUNCE_TUNNELS_PER_SECOND  # noqa: E402
from igdpcp.tunnels.shared_ssdp import SharedSSDPPort, raise_membership_limits  # noqa: E402
from igdpcp.upnp.ssdp_protocol import SSDPProtocol  # noqa: E402

T_IMPORTED = time.monotonic()


@implementer(IPortMappingService)
class StubIWF:
    """Enough of the IWF for front ends that only advertise and answer searches."""

    def __init__(self):
        self.observers = 0

    def _nothing(self, *args, **kwargs):
        return defer.fail(errors.NoSuchEntry())

    add_mapping = delete_mapping = delete_range = get_specific = _nothing

    def get_generic(self, caller, index):
        raise errors.IndexOutOfRange()

    def list_mappings(self, *args):
        return []

    def mapping_count(self, subscriber):
        return 0

    def external_address(self, caller):
        return defer.succeed(None)

    def connection_status(self, caller):
        return defer.succeed(True)

    def state(self, subscriber):
        return {"mappings": 0, "update_id": 0, "external_address": None}

    def add_observer(self, subscriber, observer):
        self.observers += 1

    def remove_observer(self, subscriber, observer):
        self.observers -= 1


def make_front_end(iwf, name: str, i: int, address: str, settings, t0: float):
    """A TunnelFrontEnd for ``name``, its first NOTIFY set paced as TunnelManager paces it:
    tunnel i (all asked for at ``t0``) gets the slot t0 + (i + 1) / rate."""
    tpid = b"\x00" + i.to_bytes(3, "big")
    slot = t0 + (i + 1) / ANNOUNCE_TUNNELS_PER_SECOND
    return TunnelFrontEnd(reactor, iwf, name, name, address, settings, server="default",
                          third_party_id=lambda: defer.succeed(tpid),
                          announce_after=max(0.0, slot - reactor.seconds()))


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def udp_errors() -> dict:
    """This netns's UDP error counters (/proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    values = dict(zip(rows[0][1:], map(int, rows[1][1:])))
    return {k: values.get(k, 0) for k in ("InErrors", "RcvbufErrors", "SndbufErrors")}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", required=True)
    p.add_argument("--address", default="192.168.1.1")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--stop", action="store_true", help="also time stopping every front end (byebye)")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="skip the gc.freeze() igdpcp does after start-up (what-if)")
    p.add_argument("--ssdp-socket", choices=("per-tunnel", "shared"), default="per-tunnel")
    args = p.parse_args()
    names = Path(args.names).read_text().split()
    shared = args.ssdp_socket == "shared"

    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (1 if shared else 2) * len(names) + 64
    if soft0 < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard0, need)))
        except (ValueError, OSError):  # raising the hard limit needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard0, hard0))
    soft1, _ = resource.getrlimit(resource.RLIMIT_NOFILE)

    # When does each NOTIFY reach the kernel (sendto returns)?
    notify_times: list[float] = []
    original_write = SSDPProtocol._write

    def recording_write(self, data, addr):
        original_write(self, data, addr)
        if data.startswith(b"NOTIFY") and b"ssdp:alive" in data:
            notify_times.append(time.monotonic())

    SSDPProtocol._write = recording_write

    # Time spent binding sockets, apart from building the front ends.
    bind_time = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                bind_time[0] += time.perf_counter() - t
        return wrapper
    frontend_module.listen_tcp = timed(frontend_module.listen_tcp)
    frontend_module.listen_ssdp = timed(frontend_module.listen_ssdp)
    shared_port = None
    if shared:
        problems = raise_membership_limits()
        if problems:
            print("FAILED " + "; ".join(problems), flush=True)
            sys.exit(1)
        shared_port = SharedSSDPPort(reactor)
        shared_port.startListening()
        shared_port.attach = timed(shared_port.attach)

    # Garbage-collector pauses (generation 2 ones are the long ones).
    gc_pauses: list[tuple[int, float]] = []
    gc_started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_started[0]))
    gc.callbacks.append(on_gc)

    iwf = StubIWF()
    settings = FrontEndSettings(udn_secret=b"bench-tunnels", advertise_interval=900.0,
                                shared_ssdp=shared_port)
    result: dict = {"tunnels": len(names), "ssdp_socket": args.ssdp_socket, "nofile_before": [soft0, hard0], "nofile_set": soft1,
                    "nofile_needed_estimate": need, "import_s": T_IMPORTED - T_IMPORT}
    fronts: list[TunnelFrontEnd] = []
    lags: list[tuple[float, float]] = []

    def start():
        gc.collect()
        rss0, fds0 = status("VmRSS"), open_fds()
        t0 = time.monotonic()
        failure = None
        # A few descriptors held back, so that the figures can still be read
        # (/proc) if the front ends run the process out of descriptors.
        reserve = [os.open("/dev/null", os.O_RDONLY) for _ in range(16)]
        slots_from = reactor.seconds()
        for i, name in enumerate(names):
            fe = make_front_end(iwf, name, i, args.address, settings, slots_from)
            try:
                fe.startService()
            except Exception as e:  # e.g. EMFILE: out of file descriptors
                failure = {"index": i, "error": f"{type(e).__name__}: {e}",
                           "ports_left_open": len(fe.ports), "running": bool(fe.running)}
                break
            fronts.append(fe)
        t1 = time.monotonic()
        for fd in reserve:
            os.close(fd)
        result["started"] = len(fronts)
        result["bind_s"] = bind_time[0]
        result["gc_objects"] = len(gc.get_objects())
        if args.gc_freeze:
            gc.freeze()
        gc_pauses.clear()
        result["failure"] = failure
        result.update(t_start=t0, t_started=t1, startup_s=t1 - t0, rss_before=rss0,
                      rss_after=status("VmRSS"), fds_before=fds0, fds_after=open_fds(),
                      ports=sum(len(f.ports) for f in fronts))
        print("READY " + json.dumps({"t_start": t0, "t_started": t1}), flush=True)
        # Reactor lateness: a 10 ms tick, how late each one runs.
        state = {"expect": time.monotonic() + 0.01}

        def tick():
            now = time.monotonic()
            lags.append((now, now - state["expect"]))
            state["expect"] = now + 0.01
        loop = task.LoopingCall(tick)
        loop.start(0.01, now=False)
        reactor.callLater(args.duration, finish, loop)

    def guarded_start():
        try:
            start()
        except BaseException as e:
            print(f"FAILED {type(e).__name__}: {e}", flush=True)
            reactor.stop()
            raise

    def finish(loop):
        loop.stop()
        counters: dict = {}
        for fe in fronts:
            for key, value in fe.ssdp.counters.items():
                counters[key] = counters.get(key, 0) + value
        result.update(gc_pauses=gc_pauses, gc_frozen=args.gc_freeze)
        result["udp_errors"] = {k: v - udp0[k] for k, v in udp_errors().items()}
        result.update(counters=counters, rss_end=status("VmRSS"), rss_peak=status("VmHWM"),
                      notify_times=notify_times, lags=lags)
        if args.stop:
            t = time.monotonic()
            d = defer.gatherResults([defer.maybeDeferred(f.stopService) for f in fronts])

            def stopped(_):
                result["stop_s"] = time.monotonic() - t
                result["fds_stopped"] = open_fds()
                done()
            d.addBoth(stopped)
        else:
            done()

    def done():
        print("DONE " + json.dumps(result), flush=True)
        reactor.stop()

    udp0 = udp_errors()
    reactor.callWhenRunning(guarded_start)
    reactor.run()


if __name__ == "__main__":
    main()
