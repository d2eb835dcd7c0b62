"""Many tunnel interfaces on one host: igdpcp's per-tunnel front ends at 1,000 and 10,000.

Needs root (network namespaces).  For each count N it builds, in namespaces
of its own (tests/netlab.py, torn down afterwards):

* ``iwf``: N veth ends ``t0..t{N-1}``, every one 192.168.1.1/24 (the
  overlapping case), plus an uplink ``up0`` 10.250.0.1/24;
* ``peer``: the other ends ``p0..``, all up; a sample of them is a
  subscriber at 192.168.1.10/24.

Then, inside ``iwf``, ``_tunnels_driver.py`` starts one
``igdpcp.tunnels.frontend.TunnelFrontEnd`` per interface (HTTP :5000 and
SSDP :1900, both bound to the interface; a stub IWF) and, inside ``peer``,
``_tunnels_probe.py`` sends a unicast M-SEARCH every 50 ms on 3 tunnels
(first, middle, last) and listens to the NOTIFYs of 16 tunnels.  This runs
once per SSDP socket mode (``--ssdp-sockets``): a socket per tunnel (the
default, 2 descriptors a tunnel) and one shared socket (``igd.ssdp_socket =
"shared"``, 1 descriptor a tunnel).

Reported: time to create the links, start-up time of the front ends, RSS,
open FDs and the RLIMIT_NOFILE that takes, the shape of the initial NOTIFY
burst (per 100 ms, all tunnels, when sendto returned; and on the wire for the
sample), reactor lateness, the M-SEARCH answer time during start-up, during
the burst and after it, and the host setup (``igdpcp.tunnels.hostsetup``):
apply/check time for N tunnels and what N ip rules cost other traffic.

    python3 bench/bench_tunnels.py [--quick] [--counts 1000,10000] [--duration S]
                                   [--ssdp-sockets per-tunnel,shared] [--no-hostsetup] [--vxlan]

``--quick`` is 200 tunnels.  Times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from _common import ROOT, latency_summary, ms, table

sys.path.insert(0, str(ROOT))
from tests import netlab  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
LISTENED = 16


def batch(ns: str | None, lines: list[str], workdir: str, name: str) -> float:
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    t = time.monotonic()
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", path]
    netlab._cmd(argv, timeout=1800)
    return time.monotonic() - t


def wait_line(proc, prefix: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = proc.log()
        for line in text[:text.rfind("\n") + 1].splitlines():  # whole lines only: DONE is megabytes
            if line.startswith(prefix):
                return line[len(prefix):].strip()
            if line.startswith("FAILED"):
                raise RuntimeError(f"{proc.name}: {line}\n{proc.log()[-3000:]}")
        if not proc.running():
            # one more look: it may have printed and exited meanwhile
            for line in proc.log().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: no {prefix!r} within {timeout} s:\n{proc.log()[-3000:]}")


def sample(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def build(lab, n: int) -> dict:
    iwf, peer = lab.netns("iwf"), lab.netns("peer")
    for ns in (iwf, peer):  # no IPv6 DAD/MLD/RS chatter on 2N interfaces
        lab.run(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1"])
    wd = lab.workdir
    create = batch(iwf, [f"link add t{i} type veth peer name p{i} netns {peer}" for i in range(n)]
                   + [f"link add up0 type veth peer name up1 netns {peer}"], wd, "create.batch")
    # first, middle, and near the last (tunnels at the very end may not start:
    # RLIMIT_NOFILE, see the report)
    searched = sorted({0, n // 2, n - 1 - max(1, n // 100)})
    listened = sorted(set(sample(n, LISTENED)) | set(searched))
    t = time.monotonic()
    batch(iwf, [x for i in range(n) for x in (f"addr add 192.168.1.1/24 dev t{i}", f"link set t{i} up")]
          + ["addr add 10.250.0.1/24 dev up0", "link set up0 up"], wd, "iwf.batch")
    batch(peer, [f"link set p{i} up" for i in range(n)]
          + [f"addr add 192.168.1.10/24 dev p{i}" for i in listened]
          + ["addr add 10.250.0.2/24 dev up1", "link set up1 up"], wd, "peer.batch")
    configure = time.monotonic() - t
    names = os.path.join(wd, "names.txt")
    with open(names, "w") as f:
        f.write("\n".join(f"t{i}" for i in range(n)) + "\n")
    return {"iwf": iwf, "peer": peer, "create_s": create, "configure_s": configure,
            "searched": searched, "listened": listened, "names": names}


def softnet_dropped() -> int:
    """Packets dropped at the per-CPU input backlog (whole machine; veth delivers through it)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)


def run_frontends(lab, net: dict, duration: float, extra=(), run: int = 0) -> tuple[dict, dict]:
    dropped = softnet_dropped()
    probe = lab.spawn(net["peer"], [PY, os.path.join(BENCH, "_tunnels_probe.py"), "--duration", "3600"]
                      + [a for i in net["searched"] for a in ("--search", f"p{i}")]
                      + [a for i in net["listened"] for a in ("--listen", f"p{i}")], name=f"probe{run}")
    wait_line(probe, "READY", 30)
    driver = lab.spawn(net["iwf"], [PY, os.path.join(BENCH, "_tunnels_driver.py"), "--names", net["names"],
                                    "--duration", str(duration), *extra], name=f"driver{run}")
    wait_line(driver, "READY", 1800)
    done = json.loads(wait_line(driver, "DONE", duration + 600))
    probe.popen.send_signal(signal.SIGTERM)
    probe.popen.wait(timeout=30)
    result = json.loads(wait_line(probe, "RESULT", 5))
    done["softnet_dropped"] = softnet_dropped() - dropped
    done["duration"] = duration
    return done, result


def hostsetup_figures(lab, net: dict, n: int) -> dict:
    env_py = [PY, "-m", "igdpcp.tunnels.hostsetup", "--netns", net["iwf"]]
    tunnels = [f"t{i}" for i in range(n)]
    out = {}

    def cli(mode):
        t = time.monotonic()
        proc = netlab._cmd(env_py + [mode] + tunnels, check=False, timeout=1800)
        return time.monotonic() - t, proc.returncode, proc.stdout.splitlines()[-1:] or [proc.stderr]

    sendto = ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "n = 20000\nt = time.perf_counter()\nfor _ in range(n): s.sendto(b'x', ('10.250.0.2', 9))\n"
              "print((time.perf_counter() - t) / n * 1e6)")
    out["sendto_us_before"] = float(lab.run(net["iwf"], [PY, "-c", sendto], timeout=300).stdout)
    out["apply_s"], out["apply_rc"], out["apply_tail"] = cli("--apply")
    out["check_s"], out["check_rc"], out["check_tail"] = cli("--check")
    out["reapply_s"], out["reapply_rc"], _ = cli("--apply")
    out["sendto_us_after"] = float(lab.run(net["iwf"], [PY, "-c", sendto], timeout=300).stdout)
    rtts = {}
    for i in (net["searched"][0], net["searched"][-1]):
        proc = lab.run(net["peer"], ["ping", "-n", "-q", "-I", f"p{i}", "-c", "200", "-i", "0.002",
                                     "192.168.1.1"], check=False, timeout=60)
        line = [l for l in proc.stdout.splitlines() if "min/avg" in l]
        rtts[f"t{i}"] = line[0].split("=")[1].split("/")[1] + " ms" if line else f"rc {proc.returncode}"
    out["ping_avg"] = rtts
    out["remove_s"] = cli("--remove")[0]
    return out


def vxlan_create(n: int) -> float:
    lab = netlab.Lab("btx")
    try:
        ns = lab.netns("vx")
        lab.run(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        batch(ns, ["link add ul0 type veth peer name ul1", "addr add 10.99.0.1/24 dev ul0", "link set ul0 up"],
              lab.workdir, "ul.batch")
        return batch(ns, [f"link add vx{i} type vxlan id {i + 1} local 10.99.0.1 remote 10.99.0.2 "
                          f"dstport 4789 dev ul0" for i in range(n)], lab.workdir, "vx.batch")
    finally:
        lab.teardown()


# -- analysis -----------------------------------------------------------------

def windows(times: list[float], origin: float, width: float = 0.1) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in times:
        k = int((t - origin) // width)
        out[k] = out.get(k, 0) + 1
    return out


def burst_shape(times: list[float], origin: float) -> dict:
    if not times:
        return {"n": 0}
    times = sorted(times)
    w = windows(times, origin)
    half = times[len(times) // 2]
    return {"n": len(times), "first": times[0] - origin, "half": half - origin, "last": times[-1] - origin,
            "busy_windows": len(w), "max_per_100ms": max(w.values()), "windows": w}


def histogram_line(w: dict[int, int], limit: int = 12) -> str:
    keys = sorted(w)[:limit]
    text = " ".join(f"{k / 10:.1f}s:{w[k]}" for k in keys)
    return text + (" ..." if len(w) > limit else "")


def report(n: int, net: dict, done: dict, probe: dict, hsf: dict | None) -> dict:
    t_start, t_started = done["t_start"], done["t_started"]
    mb = 1024 * 1024
    rss = done["rss_after"] - done["rss_before"]
    notify = burst_shape(done["notify_times"], t_started)
    lags = [lag for t, lag in done["lags"]]
    wire = burst_shape([t for t, _ in probe["notifies"]], t_started)
    per_tunnel = {}
    for t, name in probe["notifies"]:
        per_tunnel[name] = per_tunnel.get(name, 0) + 1
    burst_end = t_started + (notify["last"] if notify["n"] else 0)
    phases = {"start-up": (t_start, t_started), "burst": (t_started, burst_end + 0.2),
              "after": (burst_end + 0.5, t_started + done["duration"] - 0.1)}
    rows = []
    summary = {}
    for phase, (a, b) in phases.items():
        for tunnel in [None] + [f"p{i}" for i in net["searched"]]:
            sel = [s for s in probe["searches"] if a <= s["sent"] < b and tunnel in (None, s["if"])]
            answered = [s["answered"] - s["sent"] for s in sel if s["answered"] is not None]
            lat = latency_summary(answered)
            if tunnel is None:
                summary[phase] = lat
            rows.append([phase, "all" if tunnel is None else "t" + tunnel[1:], len(sel), len(answered),
                         ms(lat["p50"]), ms(lat["p99"]), ms(lat["max"])])
    c = done["counters"]
    failure = done.get("failure")
    figures = [
        ["front ends started", f"{done['started']} of {n}" + (
            f": tunnel {failure['index']} failed: {failure['error']} (its front end left "
            f"{failure['ports_left_open']} port(s) open, running={failure['running']})" if failure else "")],
        ["links: create N veth pairs (ip -batch)", f"{net['create_s']:.2f} s"],
        ["links: address + up both ends", f"{net['configure_s']:.2f} s"],
        ["front ends: start-up (all, reactor blocked)", f"{done['startup_s']:.2f} s "
                                                         f"({done['startup_s'] / max(1, done['started']) * 1e3:.2f} ms/tunnel)"],
        ["front ends: of which binding the sockets", f"{done['bind_s']:.2f} s"],
        ["front ends: python import", f"{done['import_s']:.2f} s"],
        ["RSS before -> after start", f"{done['rss_before'] / mb:.0f} -> {done['rss_after'] / mb:.0f} MB "
                                      f"(+{rss / max(1, done['started']) / 1024:.0f} KB/tunnel)"],
        ["RSS at end / peak", f"{done['rss_end'] / mb:.0f} / {done['rss_peak'] / mb:.0f} MB"],
        ["open FDs after start", f"{done['fds_after']} ({done['ports']} listening ports)"],
        ["RLIMIT_NOFILE soft/hard found -> set", f"{done['nofile_before'][0]}/{done['nofile_before'][1]} -> "
                                                 f"{done['nofile_set']} (needs >= {done['fds_after'] + 1})"],
        ["NOTIFY alive sent (all tunnels) / SSDP send failures", f"{notify['n']} / {c.get('send_failed', 0)}"],
        ["NOTIFY burst: first / 50% / last after start-up",
         f"{notify.get('first', 0):.2f} / {notify.get('half', 0):.2f} / {notify.get('last', 0):.2f} s"],
        ["NOTIFY burst: max per 100 ms, busy 100 ms windows", f"{notify.get('max_per_100ms', 0)}, "
                                                               f"{notify.get('busy_windows', 0)}"],
        ["NOTIFY per 100 ms (from start-up end)", histogram_line(notify.get("windows", {}))],
        ["on the wire (16 sampled tunnels): received, per tunnel",
         f"{wire['n']}, {min(per_tunnel.values()) if per_tunnel else 0}-"
         f"{max(per_tunnel.values()) if per_tunnel else 0}"],
        ["on the wire: first / last arrival", f"{wire.get('first', 0):.2f} / {wire.get('last', 0):.2f} s"],
        ["GC: objects after start; pauses while running (gen2 n, max)",
         f"{done['gc_objects']}; {sum(1 for g, _ in done['gc_pauses'] if g == 2)}, "
         f"{ms(max([d for g, d in done['gc_pauses'] if g == 2] or [0]))} ms"
         + (" (gc.freeze() after start-up)" if done.get("gc_frozen") else "")],
        ["drops: backlog (softnet, machine) / UDP rcvbuf igdpcp side / peer side",
         f"{done['softnet_dropped']} / {done['udp_errors']['RcvbufErrors']} / "
         f"{probe['udp_errors']['RcvbufErrors']}"],
        ["reactor lateness (10 ms tick): p50 / p99 / max",
         f"{ms(latency_summary(lags)['p50'])} / {ms(latency_summary(lags)['p99'])} / "
         f"{ms(latency_summary(lags)['max'])} ms"],
    ]
    if hsf:
        figures += [
            ["host setup: --apply N tunnels", f"{hsf['apply_s']:.2f} s (rc {hsf['apply_rc']})"],
            ["host setup: --check / re-apply (no-op)", f"{hsf['check_s']:.2f} s (rc {hsf['check_rc']}) / "
                                                       f"{hsf['reapply_s']:.2f} s"],
            ["host setup: --remove", f"{hsf['remove_s']:.2f} s"],
            ["unmarked UDP sendto, before -> after N ip rules", f"{hsf['sendto_us_before']:.1f} -> "
                                                                f"{hsf['sendto_us_after']:.1f} us"],
            ["ping RTT avg from the first / last tunnel (setup on)",
             " / ".join(hsf["ping_avg"].values())],
        ]
    mode = done["ssdp_socket"]
    table(f"{n} tunnels, SSDP socket {mode}", ["figure", "value"], figures)
    table(f"{n} tunnels, SSDP socket {mode}: unicast M-SEARCH answer time on tunnels "
          f"{', '.join('t%d' % i for i in net['searched'])} (one every 50 ms each)",
          ["phase", "tunnel", "sent", "answered", "p50 ms", "p99 ms", "max ms"], rows,
          note="start-up: sent while the front ends were being started (a tunnel not yet bound "
               "drops it);\nburst: from the end of start-up to 0.2 s after the last initial NOTIFY; "
               "after: from 0.5 s after that to the end of the run.")
    return {"n": n, "mode": mode, "started": done["started"], "startup_s": done["startup_s"], "rss_mb": done["rss_after"] / mb,
            "fds": done["fds_after"], "msearch": summary, "notify": {k: v for k, v in notify.items()
                                                                    if k != "windows"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 tunnels only")
    p.add_argument("--counts", default="1000,10000")
    p.add_argument("--duration", type=float, default=8.0,
                   help="seconds the reactor runs after start-up (default %(default)s)")
    p.add_argument("--ssdp-sockets", default="per-tunnel,shared",
                   help="SSDP socket modes to run, comma-separated (default %(default)s)")
    p.add_argument("--no-hostsetup", action="store_true")
    p.add_argument("--vxlan", action="store_true", help="also time creating N VXLAN devices")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="what-if: skip the gc.freeze() igdpcp does after start-up")
    args = p.parse_args()
    reason = netlab.unavailable_reason()
    if reason:
        sys.exit(f"bench_tunnels: {reason}")
    counts = [200] if args.quick else [int(c) for c in args.counts.split(",")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    print(f"bench_tunnels: {', '.join(map(str, counts))} tunnels; python {sys.version.split()[0]}, "
          f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
    summaries = []
    for n in counts:
        lab = netlab.Lab("bt")
        try:
            net = build(lab, n)
            for k, mode in enumerate(args.ssdp_sockets.split(",")):
                extra = ["--ssdp-socket", mode] + ([] if args.gc_freeze else ["--no-gc-freeze"])
                done, probe = run_frontends(lab, net, args.duration, extra, run=k)
                hsf = None if args.no_hostsetup or k else hostsetup_figures(lab, net, n)
                summaries.append(report(n, net, done, probe, hsf))
        finally:
            t = time.monotonic()
            lab.teardown()
            print(f"(teardown {time.monotonic() - t:.1f} s)")
        if args.vxlan:
            print(f"VXLAN: {n} devices created in {vxlan_create(n):.2f} s (ip -batch, one underlay)")
    rows = []
    for s in summaries:
        m = s["msearch"]
        rows.append([s["n"], s["mode"], f"{s['started']}", f"{s['startup_s']:.2f}", f"{s['rss_mb']:.0f}", s["fds"],
                     f"{ms(m['burst']['p50'])}/{ms(m['burst']['p99'])}",
                     f"{ms(m['after']['p50'])}/{ms(m['after']['p99'])}",
                     f"{s['notify'].get('last', 0):.2f}", s["notify"].get("max_per_100ms", 0)])
    table("summary", ["tunnels", "SSDP socket", "started", "start-up s", "RSS MB", "FDs", "M-SEARCH burst p50/p99 ms",
                      "M-SEARCH after p50/p99 ms", "NOTIFY burst s", "max NOTIFY/100ms"], rows)


if __name__ == "__main__":
    main()
