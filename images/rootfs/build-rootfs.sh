#!/usr/bin/env bash
# Builds a Debian root filesystem tree from Debian packages: build-rootfs.sh OUT_DIR SUITE PKG...
# The tree lands in OUT_DIR/root. Documentation and locales are left out: a sandbox needs the
# programs, not their manuals, and it halves the image.
set -euo pipefail
out=$1; suite=$2; shift 2
pkgs=$(IFS=,; echo "$*")
mirror=${HUTCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rm -rf "$out/root"
mkdir -p "$out"
mmdebstrap --variant=minbase --include="$pkgs" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  "$suite" "$out/root" "$mirror"
