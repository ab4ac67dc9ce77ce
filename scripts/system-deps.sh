#!/usr/bin/env bash
# Install the Debian packages eucareg's lab, tests and demo need, when they are missing.
# avahi-daemon must never start in the machine's own network namespace (it would announce on
# the real interfaces), so service starts are blocked by policy-rc.d while installing.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v avahi-daemon >/dev/null 2>&1 || need+=(avahi-daemon)
command -v avahi-browse >/dev/null 2>&1 || need+=(avahi-utils)
command -v dbus-daemon >/dev/null 2>&1 || need+=(dbus-daemon)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing Debian packages: ${need[*]}" >&2
  echo "system-deps: run 'make test' (or apt-get install ${need[*]}) as root once" >&2
  exit 0
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
