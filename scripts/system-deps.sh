#!/usr/bin/env bash
# Install the Debian packages eucareg's lab, tests and demo need, when they are missing.
#   system-deps.sh          what the demo needs (make demo, make bench)
#   system-deps.sh --test   that, and BIND 9 for the DNS-SD tests (make test, make test-slow)
# No daemon may ever start in the machine's own network namespace: avahi-daemon would announce
# on the real interfaces, and named would answer on them. Service starts are blocked by
# policy-rc.d while installing, named's unit is masked (where systemd exists) before bind9 is
# installed, and the tests start named themselves, on 127.0.0.1 or inside lab namespaces.
set -euo pipefail

tests=0
case "${1:-}" in
  --test) tests=1 ;;
  "") ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v avahi-daemon >/dev/null 2>&1 || need+=(avahi-daemon)
command -v avahi-browse >/dev/null 2>&1 || need+=(avahi-utils)
command -v dbus-daemon >/dev/null 2>&1 || need+=(dbus-daemon)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$tests" = 1 ]; then
  # named lives in /usr/sbin, which a non-login PATH may lack.
  [ -x /usr/sbin/named ] || command -v named >/dev/null 2>&1 || need+=(bind9)
  [ -x /usr/bin/tsig-keygen ] || command -v tsig-keygen >/dev/null 2>&1 || need+=(bind9-utils)
  command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
  # systemd-analyze verifies the agent's unit file (packaging/systemd, docs/systemd.md).
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
fi

if [ "$tests" = 1 ] && ! getent passwd eucalyptus >/dev/null 2>&1; then
  # The owner of Eucalyptus's key files, which eucareg delivers when asked to
  # (tests/integration/test_euca_keys.py); Eucalyptus's packages create it on real hosts.
  if [ "$(id -u)" -eq 0 ]; then
    echo "system-deps: adding the system user eucalyptus"
    useradd --system --no-create-home --shell /usr/sbin/nologin eucalyptus
  else
    echo "system-deps: no user eucalyptus; run 'make test' as root once" >&2
  fi
fi

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

export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${need[*]}"
apt-get update -qq
rest=()
for pkg in "${need[@]}"; do
  if [ "$pkg" = systemd ]; then
    # Alone and first, so that systemctl exists below to mask named's unit before bind9 does.
    # Nothing starts: systemd is not PID 1 here, and policy-rc.d refuses service starts.
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else
    rest+=("$pkg")
  fi
done

case " ${rest[*]} " in
  *" bind9 "*)
    # Masked before the package exists, so its postinst can neither enable nor start it
    # (Debian enables named.service on install). `systemctl mask` only writes a symlink to
    # /dev/null; it works whether or not systemd is running.
    if command -v systemctl >/dev/null 2>&1; then
      for unit in named.service bind9.service; do
        systemctl mask "$unit" >/dev/null 2>&1 || true
      done
    fi
    ;;
esac

if [ ${#rest[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
fi

if [ "$tests" = 1 ] && [ -e /run/named/named.pid ]; then
  echo "system-deps: warning: /run/named/named.pid exists; a named runs outside the lab" >&2
fi
