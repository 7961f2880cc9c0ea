#!/usr/bin/env bash
# Installs what Corral needs on a fresh Debian machine: Debian packages (when missing)
# and the npm packages (better-sqlite3 builds from source here: about two minutes).
#   setup.sh        everything the test suite needs
#   setup.sh demo   only what `corral demo` needs (npm packages; the demo uses the embedded store)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-all}"
need=()
if [ "$profile" != demo ]; then
command -v etcd >/dev/null || need+=(etcd-server etcd-client)
command -v ip >/dev/null || need+=(iproute2)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v zstd >/dev/null || need+=(zstd)
command -v udp-sender >/dev/null || need+=(udpcast)
command -v fence_dummy >/dev/null || [ -x /usr/sbin/fence_dummy ] || need+=(fence-agents)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v fping >/dev/null || need+=(fping)
command -v nft >/dev/null || need+=(nftables)
command -v chromium >/dev/null || need+=(chromium)
command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v busybox >/dev/null || need+=(busybox)
command -v fatlabel >/dev/null || [ -x /usr/sbin/fatlabel ] || need+=(dosfstools)
command -v xfs_admin >/dev/null || [ -x /usr/sbin/xfs_admin ] || need+=(xfsprogs)
command -v partclone.ext4 >/dev/null || [ -x /usr/sbin/partclone.ext4 ] || need+=(partclone)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "corral setup: installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -f node_modules/.corral-installed ] || [ package-lock.json -nt node_modules/.corral-installed ]; then
  echo "corral setup: installing npm packages"
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules/.corral-installed
fi
