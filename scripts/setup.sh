#!/usr/bin/env bash
# Installs what hutch needs on a Debian 12 host (idempotent; fast when everything is there):
# QEMU, the tools that build guest kernels and root filesystems, the VM user, the npm packages
# and the compiled TypeScript.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet=${1:-}
say() { [ "$quiet" = --quiet ] || echo "[setup] $*"; }

pkgs=(qemu-system-x86 qemu-utils mmdebstrap musl-tools linux-source-6.1 flex bison libelf-dev libssl-dev
      build-essential bc cpio e2fsprogs kmod xz-utils python3
      skopeo umoci docker-registry tmux curl nftables iproute2 util-linux
      chromium)
# chromium: the tests' browser (test/helpers/novnc.ts renders noVNC in it, headless, through
# puppeteer-core). It runs as root here, so the harness passes --no-sandbox.
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "[setup] need root to install: ${missing[*]}" >&2; exit 1; }
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# QEMU drops to this user after setting a machine up (-runas): a guest escape lands unprivileged.
if ! id hutch-vm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "creating system user hutch-vm"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hutch-vm
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm packages"
  # npm install, not npm ci: this registry setup records no per-platform optional entries in the lock.
  npm install --no-audit --no-fund --loglevel=error
fi
# `hutch` on the PATH for root (the CLI is bin/hutch.js either way).
if [ "$(id -u)" = 0 ] && [ ! -e /usr/local/bin/hutch ]; then
  ln -s "$PWD/bin/hutch.js" /usr/local/bin/hutch
fi
say "compiling"
npx tsc -p tsconfig.json
make -s -C agent >/dev/null
