#!/usr/bin/env bash
# Set-up plus the demo: the lab CGN and igdpcp in a network namespace, two
# subscribers with identical addressing in theirs, and a real UPnP client
# (upnpc, miniupnpc) in each that discovers igdpcp by SSDP and maps a port.
# Everything stays inside namespaces this script makes and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

NS=igdpcp-demo
IWF=$NS-iwf
WORK=var/demo
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for ns in "$IWF" "$NS-s1" "$NS-s2"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" && mkdir -p "$WORK"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Topology: namespace $IWF holds igdpcp and the lab CGN; $NS-s1 and $NS-s2 are subscribers"
ip netns add "$IWF"
ip -n "$IWF" link set lo up
for i in 1 2; do
  ip netns add "$NS-s$i"
  ip -n "$NS-s$i" link set lo up
  ip link add "tun$i" netns "$IWF" type veth peer name eth0 netns "$NS-s$i"
  ip -n "$IWF" addr add 192.168.1.1/24 dev "tun$i"
  ip -n "$IWF" link set "tun$i" up
  ip -n "$NS-s$i" addr add 192.168.1.10/24 dev eth0
  ip -n "$NS-s$i" link set eth0 up
  ip -n "$NS-s$i" route add default via 192.168.1.1
  echo "  subscriber $i: 192.168.1.10 on eth0 <-> igdpcp 192.168.1.1 on tun$i"
done

say "Host setup: kernel replies (RST, ICMP) stay in their own tunnel (policy routing by mark)"
ip netns exec "$IWF" python3 -m igdpcp.tunnels.hostsetup --apply tun1 tun2

say "Starting the lab CGN (twistd pcplab) and igdpcp (twistd igdpcp)"
ip netns exec "$IWF" env PYTHONPATH="$PWD" twistd -n --pidfile= --logfile="$WORK/pcplab.log" pcplab --config examples/pcplab.toml &
PIDS+=($!)
ip netns exec "$IWF" env PYTHONPATH="$PWD" twistd -n --pidfile= --logfile="$WORK/igdpcp.log" igdpcp --config examples/demo.toml &
PIDS+=($!)
for _ in $(seq 50); do
  if ip netns exec "$IWF" ss -ltn | grep -q ':5000 ' && ip netns exec "$IWF" ss -ltn | grep -q ':5380 '; then break; fi
  sleep 0.2
done
sleep 0.5

say "Subscriber 1: upnpc discovers the IGD by SSDP and maps 192.168.1.10:8080/TCP to external 18080"
ip netns exec "$NS-s1" upnpc -e "demo 1" -a 192.168.1.10 8080 18080 TCP 3600 || true

say "Subscriber 2, same private address and port: external 18080 is taken on the CGN (718), 18081 is not"
ip netns exec "$NS-s2" upnpc -e "demo 2" -a 192.168.1.10 8080 18080 TCP 3600 || true
ip netns exec "$NS-s2" upnpc -e "demo 2" -a 192.168.1.10 8080 18081 TCP 3600 || true

say "Subscriber 1 lists its mappings (subscriber 2's are not visible to it)"
ip netns exec "$NS-s1" upnpc -l || true

say "The CGN's table: one mapping per subscriber, told apart by THIRD_PARTY_ID"
ip netns exec "$IWF" curl -s http://127.0.0.1:5380/mappings | python3 -m json.tool

say "Subscriber 1 deletes its mapping"
ip netns exec "$NS-s1" upnpc -d 18080 TCP || true
ip netns exec "$IWF" curl -s http://127.0.0.1:5380/mappings | python3 -m json.tool

say "Done. Logs: $WORK/igdpcp.log, $WORK/pcplab.log"
