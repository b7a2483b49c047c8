#!/usr/bin/env bash
# Boot-test a kernel built by build-kernel.sh on QEMU -M microvm (TCG).
#
#   test-boot.sh OUT_DIR [RUNS]       (OUT_DIR holds vmlinux and config)
#
# Builds a 64 MiB ext4 rootfs from busybox-static whose /init prints a marker,
# the virtio-serial port names, nproc and /proc/filesystems, then reboots
# (with -no-reboot QEMU exits). Boots RUNS times (default 10), prints the
# spawn -> marker median/p90 and fails if any boot hangs or misbehaves.
# Needs: qemu-system-x86_64, busybox-static, e2fsprogs, python3.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [RUNS]" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
RUNS=${2:-10}
KERNEL="$OUT/vmlinux"
[ -f "$KERNEL" ] || { echo "no $KERNEL" >&2; exit 1; }
BUSYBOX=${BUSYBOX:-/bin/busybox}
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' ||
	{ echo "need a static busybox at $BUSYBOX (apt-get install busybox-static)" >&2; exit 1; }

# Host TSC frequency in kHz ("tsc: Detected 2499.998 MHz" -> 2499998), falling
# back to /proc/cpuinfo. Under TCG the guest TSC ticks at the host TSC rate.
mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -n1)
[ -n "$mhz" ] || mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' | tail -n1)
[ -n "$mhz" ] || mhz=$(awk -F': ' '/^cpu MHz/ {print $2; exit}' /proc/cpuinfo)
TSC_KHZ=$(awk -v m="$mhz" 'BEGIN { printf "%d", m * 1000 + 0.5 }')
HZ=$(sed -n 's/^CONFIG_HZ=//p' "$OUT/config" 2>/dev/null || true)
HZ=${HZ:-100}
LPJ=$(( TSC_KHZ * 1000 / HZ ))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hutch-kernel-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root/bin" "$WORK/root/proc" "$WORK/root/sys" "$WORK/root/dev"
cp "$BUSYBOX" "$WORK/root/bin/busybox"
for a in sh mount cat nproc tr echo reboot; do ln -s busybox "$WORK/root/bin/$a"; done
cat >"$WORK/root/init" <<'EOF'
#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo HUTCH-BOOT-MARKER
echo "virtio-ports: $(cat /sys/class/virtio-ports/*/name)"
echo "nproc: $(nproc)"
echo "filesystems: $(cat /proc/filesystems | tr '\t\n' '  ')"
echo HUTCH-BOOT-END
reboot -f
EOF
chmod +x "$WORK/root/init"
mkfs.ext4 -q -d "$WORK/root" "$WORK/root.img" 64M

CMDLINE="console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/init quiet tsc_early_khz=$TSC_KHZ tsc=reliable lpj=$LPJ no_timer_check cryptomgr.notests panic=-1 reboot=t"
echo "[test] kernel $KERNEL, HZ=$HZ, host TSC ${TSC_KHZ} kHz -> lpj=$LPJ"
echo "[test] cmdline: $CMDLINE"

export KERNEL CMDLINE WORK RUNS
python3 - <<'PY'
import os, select, statistics, subprocess, sys, time
K, C, W, N = os.environ["KERNEL"], os.environ["CMDLINE"], os.environ["WORK"], int(os.environ["RUNS"])
def qemu(i):
    return ["qemu-system-x86_64",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "256M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", K, "-append", C, "-serial", "stdio",
        "-drive", f"id=d0,file={W}/root.img,format=raw,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=d0,bus=virtio-mmio-bus.7",
        "-device", "virtio-serial-device,bus=virtio-mmio-bus.6",
        "-chardev", f"socket,id=agent,path={W}/agent{i}.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.hutch.agent.0",
        "-device", "virtio-rng-device,bus=virtio-mmio-bus.5"]
times, bad, limit = [], 0, 30.0
for i in range(N):
    t0 = time.monotonic()
    p = subprocess.Popen(qemu(i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, marker = b"", None
    while time.monotonic() - t0 < limit:
        if not select.select([p.stdout], [], [], 0.5)[0]:
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
        if marker is None and b"HUTCH-BOOT-MARKER" in out:
            marker = time.monotonic() - t0
    try:
        p.wait(timeout=max(0.1, limit - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill(); p.wait()
        bad += 1
        print(f"[test] boot {i}: HANG after {limit:.0f} s; last output:\n{out[-600:].decode(errors='replace')}")
        continue
    text = out.decode(errors="replace")
    if marker is None or "HUTCH-BOOT-END" not in text or "org.hutch.agent.0" not in text:
        bad += 1
        print(f"[test] boot {i}: FAILED (exit {p.returncode}); output tail:\n{text[-1500:]}")
        continue
    if i == 0:
        for line in text.splitlines():
            if line.startswith(("virtio-ports:", "nproc:", "filesystems:")):
                print("[test]   " + line.strip())
    times.append(marker)
    print(f"[test] boot {i}: marker at {marker:.3f} s, exited at {time.monotonic() - t0:.3f} s")
if times:
    s = sorted(times)
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    print(f"[test] {len(s)}/{N} boots ok: spawn->marker median {statistics.median(s):.3f} s, p90 {p90:.3f} s, min {s[0]:.3f} s, max {s[-1]:.3f} s; hangs/failures: {bad}")
sys.exit(1 if bad or not times else 0)
PY
