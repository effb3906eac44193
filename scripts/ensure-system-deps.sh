#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real (only when missing, only as root).
set -euo pipefail
need=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # Never let a package's install script start a service (prometheus, haproxy) on this machine.
    prc=/usr/sbin/policy-rc.d
    made_prc=0
    if [ ! -e "$prc" ]; then printf '#!/bin/sh\nexit 101\n' > "$prc"; chmod +x "$prc"; made_prc=1; fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${need[@]}" >/dev/null
    if [ "$made_prc" = 1 ]; then rm -f "$prc"; fi
  else
    echo "missing Debian packages: ${need[*]} (install them with apt-get)" >&2
  fi
fi
