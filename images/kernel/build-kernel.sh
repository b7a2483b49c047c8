#!/usr/bin/env bash
# Build hutch's guest kernel: an uncompressed, PVH-bootable vmlinux for QEMU -M microvm.
#
#   build-kernel.sh OUT_DIR
#
# Writes OUT_DIR/vmlinux, OUT_DIR/config and OUT_DIR/build.log.
# Source: Debian's linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz); config:
# `make tinyconfig` + microvm.config (next to this script) + `make olddefconfig`.
# The build fails if any option set in microvm.config did not survive into .config.
#
# Environment:
#   KERNEL_SRC_TARBALL  source tarball      (default /usr/src/linux-source-6.1.tar.xz)
#   KERNEL_BUILD_DIR    scratch directory   (default OUT_DIR/.build; removed at the end)
#   KERNEL_JOBS         make -j             (default nproc)
#   FORCE=1             rebuild even if OUT_DIR is up to date
#   KEEP_BUILD=1        keep the scratch tree (for debugging)
set -euo pipefail

say() { printf '[kernel] %s\n' "$*"; }
die() { printf '[kernel] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT="$HERE/microvm.config"
TARBALL=${KERNEL_SRC_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
JOBS=${KERNEL_JOBS:-$(nproc)}
ARCH=x86_64
export ARCH

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
BUILD=${KERNEL_BUILD_DIR:-$OUT/.build}
LOG="$OUT/build.log"

[ -f "$FRAGMENT" ] || die "missing config fragment $FRAGMENT"
[ -f "$TARBALL" ] || die "missing kernel source $TARBALL (apt-get install linux-source-6.1)"
missing=()
for tool in make gcc ld flex bison bc xz tar perl strip readelf sha256sum flock; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -e /usr/include/libelf.h ] || missing+=("libelf-dev")
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]} (apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils)"

# One build per OUT_DIR at a time.
exec 9>"$OUT/.lock"
flock -n 9 || die "another build is running in $OUT"

# Up to date? (same fragment, same script, same source tarball)
stamp=$( {
	sha256sum "$FRAGMENT" "${BASH_SOURCE[0]}" | cut -d' ' -f1
	stat -c '%n %s %Y' "$TARBALL"
} | sha256sum | cut -d' ' -f1)
if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/config" ] &&
	[ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$stamp" ]; then
	say "up to date: $OUT/vmlinux (FORCE=1 to rebuild)"
	exit 0
fi

cleanup() {
	local rc=$?
	if [ "${KEEP_BUILD:-0}" = 1 ]; then
		say "kept scratch tree $BUILD"
	else
		rm -rf "$BUILD"
	fi
	if [ $rc -ne 0 ]; then
		if [ -s "$LOG" ] && [ "${show_tail:-1}" = 1 ]; then
			echo "[kernel] build FAILED; last 40 lines of $LOG:" >&2
			tail -n 40 "$LOG" >&2
		fi
		echo "[kernel] build FAILED (exit $rc), full log: $LOG" >&2
	fi
}
trap cleanup EXIT

: >"$LOG"
rm -rf "$BUILD"
mkdir -p "$BUILD"
SRC="$BUILD/linux"
mkdir -p "$SRC"

t0=$(date +%s)
say "extracting $(basename "$TARBALL")…"
tar -xf "$TARBALL" -C "$SRC" --strip-components=1 >>"$LOG" 2>&1
[ -f "$SRC/Makefile" ] || die "tarball did not contain a kernel tree"
kver=$(make -s -C "$SRC" kernelversion 2>>"$LOG")
say "configuring Linux $kver (tinyconfig + $(basename "$FRAGMENT"))…"

# Reproducible-ish build metadata.
export KBUILD_BUILD_USER=hutch KBUILD_BUILD_HOST=hutch
export KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$(stat -c %Y "$TARBALL")" '+%Y-%m-%d %H:%M:%S UTC')"

{
	echo "== make tinyconfig"
	make -C "$SRC" tinyconfig
	echo "== merge_config.sh -m .config $FRAGMENT"
	(cd "$SRC" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT")
	echo "== make olddefconfig"
	make -C "$SRC" olddefconfig
} >>"$LOG" 2>&1 </dev/null

# Verify: every option the fragment sets must have its value in .config, and
# every "# CONFIG_X is not set" must really be off. Kconfig drops options whose
# dependencies are unmet without a word; this is where that gets caught.
bad=()
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*)
		key=${line%%=*} want=${line#*=}
		got=$(grep -E "^${key}=" "$SRC/.config" | head -n1 | cut -d= -f2- || true)
		[ "$got" = "$want" ] || bad+=("$key=$want (got: ${got:-not set})")
		;;
	"# CONFIG_"*" is not set")
		key=${line#\# } key=${key%% *}
		if grep -qE "^${key}=" "$SRC/.config"; then
			bad+=("$key must be off (got: $(grep -E "^${key}=" "$SRC/.config" | cut -d= -f2-))")
		fi
		;;
	esac
done <"$FRAGMENT"
if [ ${#bad[@]} -ne 0 ]; then
	{
		echo "[kernel] ERROR: ${#bad[@]} option(s) of $(basename "$FRAGMENT") did not survive into .config"
		echo "[kernel] (unmet dependency, wrong name, or selected by something else):"
		printf '[kernel]   %s\n' "${bad[@]}"
	} | tee -a "$LOG" >&2
	show_tail=0
	exit 1
fi
say "config verified: all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment options present"

say "building (takes ~9 min on 2 cores; log: $LOG)…"
tb=$(date +%s)
make -C "$SRC" -j"$JOBS" vmlinux >>"$LOG" 2>&1 </dev/null
say "compiled in $(( $(date +%s) - tb )) s"

# PVH entry: QEMU finds it through the XEN_ELFNOTE_PHYS32_ENTRY note, which
# lives in an allocated .notes section that strip keeps. Check anyway.
strip --strip-all -o "$BUILD/vmlinux.stripped" "$SRC/vmlinux" >>"$LOG" 2>&1
if ! readelf -n "$BUILD/vmlinux.stripped" 2>>"$LOG" | grep -q 'Xen.*0x00000012'; then
	die "stripped vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH on?"
fi

install -m 0644 "$BUILD/vmlinux.stripped" "$OUT/vmlinux.tmp"
install -m 0644 "$SRC/.config" "$OUT/config.tmp"
mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
mv -f "$OUT/config.tmp" "$OUT/config"
echo "$stamp" >"$OUT/.stamp"

size=$(du -h --apparent-size "$OUT/vmlinux" | cut -f1)
say "done in $(( $(date +%s) - t0 )) s: $OUT/vmlinux ($size, Linux $kver, HZ=$(sed -n 's/^CONFIG_HZ=//p' "$OUT/config")), $OUT/config"
