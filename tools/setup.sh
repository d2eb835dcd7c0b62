#!/usr/bin/env bash
# Installs everything igdpcp, its demo and its tests need on a fresh Debian 12 machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  iproute2 iputils-ping curl tcpdump nftables
  miniupnpc miniupnpd-nftables gupnp-tools
  python3-gi gir1.2-gupnpigd-1.0
  freeradius freeradius-utils
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  # Packaged daemons (miniupnpd, freeradius) must not start on install: tests run their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]'
