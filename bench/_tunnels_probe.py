"""The subscriber side of bench_tunnels.py (not a bench itself): runs in the peer netns.

* ``--search IF``: every ``--interval`` s a fresh UDP socket bound to IF sends
  a unicast M-SEARCH (ST upnp:rootdevice, MX 1) to igdpcp; the time to the
  first answer is recorded (a unicast search is answered at once, so this is
  igdpcp's reaction time, not the MX delay).
* ``--listen IF``: a socket bound to IF, joined to 239.255.255.250 on it,
  records the arrival time of every NOTIFY ssdp:alive.

Times are CLOCK_MONOTONIC, comparable with the driver's.  Prints ``READY``,
then after ``--duration`` s one ``RESULT <json>`` line.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import struct
import time

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
GROUP = "239.255.255.250"


def udp_errors() -> dict:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    values = dict(zip(rows[0][1:], map(int, rows[1][1:])))
    return {k: values.get(k, 0) for k in ("InErrors", "RcvbufErrors")}


def search_message(target: str) -> bytes:
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {target}:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n"
            "ST: upnp:rootdevice\r\n\r\n").encode()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--search", action="append", default=[])
    p.add_argument("--listen", action="append", default=[])
    p.add_argument("--target", default="192.168.1.1")
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--give-up", type=float, default=10.0)
    args = p.parse_args()

    udp0 = udp_errors()
    sel = selectors.DefaultSelector()
    notifies: list[tuple[float, str]] = []
    for name in args.listen:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("0.0.0.0", 1900))
        mreqn = struct.pack("4s4si", socket.inet_aton(GROUP), socket.inet_aton("0.0.0.0"),
                            socket.if_nametoindex(name))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, ("listen", name))

    message = search_message(args.target)
    searches: list[dict] = []
    pending: dict[socket.socket, dict] = {}
    end = time.monotonic() + args.duration

    def stop(signum, frame):  # the orchestrator says when the driver is done
        nonlocal end
        end = min(end, time.monotonic())
    signal.signal(signal.SIGTERM, stop)
    print("READY", flush=True)
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= end and not pending:
            break
        if now < end and now >= next_send:
            for name in args.search:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
                s.setblocking(False)
                record = {"if": name, "sent": time.monotonic(), "answered": None}
                try:
                    s.sendto(message, (args.target, 1900))
                except OSError as e:
                    record["error"] = e.errno
                searches.append(record)
                pending[s] = record
                sel.register(s, selectors.EVENT_READ, ("search", name))
            next_send += args.interval
        for s, record in list(pending.items()):
            if now - record["sent"] > args.give_up or (now >= end and now - record["sent"] > 1.5):
                sel.unregister(s)
                s.close()
                del pending[s]
        timeout = max(0.0, min(next_send, end) - time.monotonic()) if now < end else 0.05
        for key, _ in sel.select(timeout):
            kind, name = key.data
            s = key.fileobj
            while True:
                try:
                    data = s.recv(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                t = time.monotonic()
                if kind == "listen":
                    if data.startswith(b"NOTIFY") and b"ssdp:alive" in data:
                        notifies.append((t, name))
                else:
                    record = pending.pop(s, None)
                    if record is not None and data.startswith(b"HTTP/1.1 200"):
                        record["answered"] = t
                    sel.unregister(s)
                    s.close()
                    break
    print("RESULT " + json.dumps({"searches": searches, "notifies": notifies,
                                  "udp_errors": {k: v - udp0[k] for k, v in udp_errors().items()}}),
          flush=True)


if __name__ == "__main__":
    main()
