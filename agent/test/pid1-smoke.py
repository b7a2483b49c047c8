#!/usr/bin/env python3
"""Runs the agent as PID 1 in new pid/mount/uts/net namespaces, the closest thing to a
guest without booting one: the transport is a raw pty (--port), the "serial console" is
another pty bind-mounted over /dev/ttyS0, and the kernel command line is a bind-mounted
file. /etc is an overlay whose upper layer is a temporary directory, so that CONFIGURE
writes /etc/hostname and /etc/machine-id for real without touching the host's (if overlayfs
is unavailable, /etc stays the host's and the CONFIGURE test is skipped). Checks the PID 1
duties, then POWEROFF (inside a pid namespace, reboot() only ends the namespace). Needs root
and unshare(1); skipped otherwise. Prints `N passed, M failed`.

CONFIGURE's entropy and time_ns are never sent here: the kernel RNG and CLOCK_REALTIME are
not namespaced, so applying them would change the host. /sys/bus is a tmpfs in the namespace:
DISK_MOUNT and DISK_UNMOUNT find a fake SCSI device there (a loop device's numbers), never one
of the host's disks, whose `delete` they would write."""
import importlib.util
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tty

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("rt", os.path.join(here, "run-tests.py"))
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
check = rt.check


class FdConn:
    """Just enough of a socket over a pty master for rt.Host."""

    def __init__(self, fd):
        self.fd = fd
        os.set_blocking(fd, False)

    def fileno(self):
        return self.fd

    def send(self, data):
        return os.write(self.fd, data)

    def recv(self, n):
        return os.read(self.fd, n)

    def setblocking(self, flag):
        os.set_blocking(self.fd, flag)

    def close(self):
        pass


class PtyHost(rt.Host):
    def __init__(self, master):
        self.conn = FdConn(master)
        self.next_id = 1
        self.accept()

    def accept(self, timeout=5):
        self.buf = b""
        self.outbox = bytearray()
        self.sending = False
        self.frames = {}
        self.recv_win, self.send_win, self.received = {}, {}, {}
        self.autocredit = set()
        self.handshake()


def console_expect(fd, cmd, want, timeout=10):
    os.write(fd, cmd)
    got = b""
    deadline = time.time() + timeout
    while want not in got:
        check(time.time() < deadline, "console: %r not in %r" % (want, got[-300:]))
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                got += os.read(fd, 4096)
            except OSError:
                time.sleep(0.1)  # no shell on the console right now
    return got


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append((int(d), fields[0]))
            except OSError:
                pass
    return out


def overlay_works(work):
    """Whether an overlay over /etc can be mounted in a private mount namespace."""
    d = os.path.join(work, "probe")
    for sub in ("upper", "work"):
        os.makedirs(os.path.join(d, sub))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "overlay", "overlay",
                        "-o", "lowerdir=/etc,upperdir=%s/upper,workdir=%s/work" % (d, d), "/etc"],
                       capture_output=True)
    shutil.rmtree(d, ignore_errors=True)
    return r.returncode == 0


def host_etc():
    out = {}
    for name in ("hostname", "machine-id"):
        try:
            st = os.stat("/etc/" + name)
            with open("/etc/" + name, "rb") as f:
                out[name] = (f.read(), st.st_ino, st.st_mtime_ns, st.st_mode)
        except OSError as e:
            out[name] = e.errno
    return out, os.uname().nodename


def main():
    agent = os.path.abspath(sys.argv[1])
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("pid1: skipped (needs root and unshare)")
        print("0 passed, 0 failed")
        return
    work = tempfile.mkdtemp(prefix="hutch-pid1-")
    cmdline = os.path.join(work, "cmdline")
    with open(cmdline, "w") as f:
        f.write("console=ttyS0 quiet hutch.hostname=smoke-vm\n")
    tm, ts = os.openpty()
    tty.setraw(ts)
    cm, cs = os.openpty()
    log = open(os.path.join(work, "agent.log"), "wb")
    upper = os.path.join(work, "etc-upper")
    etc_overlay = overlay_works(work)
    mount_etc = ""
    if etc_overlay:
        os.makedirs(upper)
        os.makedirs(os.path.join(work, "etc-work"))
        mount_etc = ("mount -t overlay overlay -o lowerdir=/etc,upperdir=%s,workdir=%s/etc-work /etc && "
                     % (upper, work))
    host_before = host_etc()
    script = ("mount --bind %s /dev/ttyS0 && mount --bind %s /proc/cmdline && "
              "mount -t tmpfs -o mode=0755 none /sys/bus && mkdir -p /sys/bus/scsi/devices && %sexec %s --port %s"
              % (os.ttyname(cs), cmdline, mount_etc, agent, os.ttyname(ts)))
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--net",
                             "--propagation", "private", "sh", "-c", script],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    passed = failed = 0

    def run(args, **kw):
        return rt.run(h, args, **kw)

    def t_handshake():
        pass

    def t_hostname():
        # Protocol 2: the hostname comes with CONFIGURE only; hutch.hostname= is for
        # protocol-1 agents and must not reach this one.
        out, _, t, f = run(["cat", "/proc/sys/kernel/hostname"])
        check(out != b"smoke-vm\n", "hutch.hostname= was applied: %r" % out)

    def configure(payload):
        sid = h.new_stream()
        h.sendf(rt.CONFIGURE, sid, payload)
        frames = h.wait_end(sid)
        check(len(frames) == 1, "CONFIGURE answered with %r" % frames)
        return frames[0][0], dict(rt.parse_tlv(frames[0][1]))

    def t_configure():
        if not etc_overlay:
            print("     pid1-configure: skipped (overlayfs unavailable: /etc cannot be confined)")
            return
        mid = os.urandom(16).hex().encode()
        t, f = configure(rt.tlv(4, mid) + rt.tlv(1, "clone-42.smoke"))
        check(t == rt.DONE and f == {}, "configure: 0x%02x %r" % (t, f))
        out, _, _, _ = run(["cat", "/proc/sys/kernel/hostname", "/etc/hostname", "/etc/machine-id"])
        check(out == b"clone-42.smoke\nclone-42.smoke\n" + mid + b"\n", "in the guest: %r" % out)
        out, _, _, _ = run(["stat", "-c", "%a %n", "/etc/hostname", "/etc/machine-id"])
        check(out == b"644 /etc/hostname\n444 /etc/machine-id\n", "modes %r" % out)
        # Written through the overlay, atomically: the files and nothing else.
        check(sorted(os.listdir(upper)) == ["hostname", "machine-id"], "upper layer %r" % os.listdir(upper))
        with open(os.path.join(upper, "machine-id"), "rb") as fp:
            check(fp.read() == mid + b"\n", "machine-id on disk")
        check(os.stat(os.path.join(upper, "machine-id")).st_mode & 0o7777 == 0o444, "machine-id mode on disk")
        # Only machine_id: /etc/hostname and the hostname stay.
        mid2 = os.urandom(16).hex().encode()
        t, f = configure(rt.tlv(4, mid2))
        check(t == rt.DONE, "configure machine_id: %r" % f)
        out, _, _, _ = run(["cat", "/proc/sys/kernel/hostname", "/etc/hostname", "/etc/machine-id"])
        check(out == b"clone-42.smoke\nclone-42.smoke\n" + mid2 + b"\n", "after machine_id only: %r" % out)
        # An invalid request changes nothing, not even the fields before the bad one.
        for payload in (rt.tlv(1, "other") + rt.tlv(4, mid) + rt.tlv(1, "again"),
                        rt.tlv(1, "other") + rt.tlv(4, mid.upper()), rt.tlv(1, "bad_name") + rt.tlv(4, mid)):
            t, f = configure(payload)
            check(t == rt.ERROR and f.get(1) == b"EINVAL", "invalid request: 0x%02x %r" % (t, f))
        out, _, _, _ = run(["cat", "/proc/sys/kernel/hostname", "/etc/hostname", "/etc/machine-id"])
        check(out == b"clone-42.smoke\nclone-42.smoke\n" + mid2 + b"\n", "after invalid requests: %r" % out)
        check(sorted(os.listdir(upper)) == ["hostname", "machine-id"], "upper layer %r" % os.listdir(upper))
        check(host_etc() == host_before, "the host's /etc or hostname changed")

    def t_net():
        """CONFIGURE's net applied for real, on a veth pair made inside the namespace: eth0
        (the lower index) gets the address, MTU, default route and resolver."""
        if not etc_overlay or not shutil.which("ip"):
            print("     pid1-net: skipped (needs overlayfs for /etc and ip(8) to make a veth pair)")
            return
        out, err, t, f = run(["sh", "-c", "ip link add eth1 type veth peer name eth0 && ip link set eth1 up && "
                                          "ln -sf /run/no-such-stub /etc/resolv.conf"])
        check(t == rt.EXIT and rt.u32(f[1]) == 0, "veth: %r %r" % (f, err))
        net = lambda gw, mtu: (socket.inet_aton("10.0.2.15") + bytes([24]) + socket.inet_aton(gw)
                               + struct.pack(">H", mtu) + socket.inet_aton("10.0.2.3"))
        for gw, mtu in (("10.0.2.2", 1400), ("10.0.2.1", 1300)):  # the second replaces the route
            t, f = configure(rt.tlv(7, net(gw, mtu)))
            check(t == rt.DONE, "configure net: 0x%02x %r" % (t, f))
            out, err, _, _ = run(["sh", "-c", "ip -4 -o addr show dev eth0; ip -o link show dev eth0; "
                                              "ip -4 route show default; cat /etc/resolv.conf; "
                                              "[ -L /etc/resolv.conf ] || echo regular"])
            text = out.decode()
            # /sys is the host's here: the MTU is read from ip(8), which asks the namespace.
            check("inet 10.0.2.15/24" in text and " mtu %d " % mtu in text, "address/mtu: %r" % text)
            check(text.count("default via") == 1 and "default via %s dev eth0" % gw in text, "route: %r" % text)
            check(text.endswith("nameserver 10.0.2.3\nregular\n"), "resolv.conf: %r" % text)
        out, _, _, _ = run(["sh", "-c", "ip -o link show lo"])
        check(b"UP" in out, "lo: %r" % out)
        t, f = configure(rt.tlv(7, net("10.0.2.2", 1400)[:14]))
        check(t == rt.ERROR and f.get(1) == b"EINVAL", "short net: %r" % f)

    def disk(typ, payload, timeout=15):
        sid = h.new_stream()
        h.sendf(typ, sid, payload)
        frames = h.wait_end(sid, timeout)
        check(len(frames) == 1, "disk request answered with %r" % frames)
        return frames[0][0], dict(rt.parse_tlv(frames[0][1]))

    def t_disks():
        """DISK_MOUNT waits for the SCSI disk without blocking the loop, mounts it (rw, then ro
        with noload), refuses a busy path; DISK_UNMOUNT refuses while a file is open, then
        unmounts and deletes the SCSI device. The disk is a loop device posing as SCSI target 2."""
        if not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
            print("     pid1-disks: skipped (needs losetup and mkfs.ext4)")
            return
        img = os.path.join(work, "disk.ext4")
        subprocess.run(["truncate", "-s", "64M", img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True, capture_output=True)
        r = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True)
        if r.returncode != 0:
            print("     pid1-disks: skipped (no loop device: %s)" % r.stderr.strip())
            return
        loop = r.stdout.strip()
        name = os.path.basename(loop)
        try:
            with open("/sys/class/block/%s/dev" % name) as f:
                devno = f.read().strip()
            u16 = lambda n: struct.pack(">H", n)
            mnt = "/tmp/hutch-disk-smoke/d2"
            fake = "/sys/bus/scsi/devices/1:0:2:0"
            # Built aside and renamed into place, as the kernel's scan makes it appear whole.
            plug = ("sleep %s; d=/sys/bus/stage; mkdir -p $d/block/%s && echo %s > $d/block/%s/dev && "
                    "echo %d > $d/block/%s/size && : > $d/delete && mv $d %s"
                    % ("%s", name, devno, name, 64 * 2048, name, fake))
            h.exec(["sh", "-c", plug % "0.5"])
            t0 = time.time()
            sid = h.new_stream()
            h.sendf(rt.DISK_MOUNT, sid, rt.tlv(1, u16(2)) + rt.tlv(2, mnt))
            rt.t_ping(h)  # answered while the mount waits for its disk
            check(time.time() - t0 < 0.4 and h.frames[sid] == [], "the loop waited for the disk")
            frames = h.wait_end(sid, 15)
            t, f = frames[0][0], dict(rt.parse_tlv(frames[0][1]))
            check(t == rt.DONE and f == {1: struct.pack(">Q", 64 << 20)}, "mount: 0x%02x %r" % (t, f))
            out, _, _, _ = run(["sh", "-c", "grep ' %s ' /proc/self/mountinfo; echo kept > %s/file" % (mnt, mnt)])
            check(b" ext4 " in out and b" rw," in out, "mountinfo %r" % out)
            t, f = disk(rt.DISK_MOUNT, rt.tlv(1, u16(2)) + rt.tlv(2, mnt))
            check(t == rt.ERROR and f.get(1) == b"EBUSY", "mount on a mount point: %r" % f)
            t, f = disk(rt.DISK_MOUNT, rt.tlv(1, u16(2)) + rt.tlv(2, mnt + "/file/x"))
            check(t == rt.ERROR and f.get(1) == b"ENOTDIR", "mount under a file: %r" % f)
            t, f = disk(rt.DISK_UNMOUNT, rt.tlv(1, mnt) + rt.tlv(2, u16(3)))
            check(t == rt.ERROR and f.get(1) == b"ENODEV", "unmount of another target: %r" % f)
            t, f = disk(rt.DISK_UNMOUNT, rt.tlv(1, "/tmp/hutch-disk-smoke") + rt.tlv(2, u16(2)))
            check(t == rt.ERROR and f.get(1) == b"EINVAL", "unmount of a plain directory: %r" % f)
            holder = h.exec(["sh", "-c", "exec sleep 100 < %s/file" % mnt])
            h.wait_started(holder)
            t, f = disk(rt.DISK_UNMOUNT, rt.tlv(1, mnt) + rt.tlv(2, u16(2)))
            check(t == rt.ERROR and f.get(1) == b"EBUSY" and b"files are open under" in f.get(2, b""),
                  "unmount with a file open: %r" % f)
            h.sendf(rt.CANCEL, holder)
            deadline = time.time() + 5
            while True:
                t, f = disk(rt.DISK_UNMOUNT, rt.tlv(1, mnt) + rt.tlv(2, u16(2)))
                if t == rt.DONE or time.time() > deadline:
                    break
                time.sleep(0.1)  # the killed holder may not be gone yet
            check(t == rt.DONE and f == {}, "unmount: 0x%02x %r" % (t, f))
            out, _, _, _ = run(["sh", "-c", "grep -c ' %s ' /proc/self/mountinfo; cat %s/delete; "
                                            "rm -r %s" % (mnt, fake, fake)])
            check(out == b"0\n1", "after unmount: %r" % out)
            # Read-only, with noload: the file written above is there, and nothing can be written.
            h.exec(["sh", "-c", plug % "0"])
            t, f = disk(rt.DISK_MOUNT, rt.tlv(1, u16(2)) + rt.tlv(2, mnt) + rt.tlv(3, b"\x01"))
            check(t == rt.DONE, "read-only mount: 0x%02x %r" % (t, f))
            out, _, _, _ = run(["sh", "-c", "cat %s/file; grep ' %s ' /proc/self/mountinfo; "
                                            "touch %s/new 2>/dev/null || echo refused" % (mnt, mnt, mnt)])
            check(out.startswith(b"kept\n") and b" ro," in out and out.endswith(b"refused\n"), "ro: %r" % out)
            t, f = disk(rt.DISK_UNMOUNT, rt.tlv(1, mnt) + rt.tlv(2, u16(2)))
            check(t == rt.DONE, "read-only unmount: %r" % f)
            # While a worker waits for a disk that never comes, an exec's stdin still ends when the
            # host ends it: the worker holds none of the agent's descriptors.
            cat = h.exec(["cat"], stdin=True)
            h.wait_started(cat)
            sid = h.new_stream()
            h.sendf(rt.DISK_MOUNT, sid, rt.tlv(1, u16(7)) + rt.tlv(2, mnt))
            h.sendf(rt.STDIN, cat, b"")
            out, _, t, f = rt.collect(h.wait_end(cat, 3))
            check(t == rt.EXIT and h.frames[sid] == [], "cat during a disk wait: 0x%02x %r" % (t, f))
            frames = h.wait_end(sid, 15)
            t, f = frames[0][0], dict(rt.parse_tlv(frames[0][1]))
            check(t == rt.ERROR and f.get(1) == b"ETIMEDOUT" and b"no disk at SCSI target 7 after 10 s" in f.get(2, b""),
                  "no disk: %r" % f)
            run(["rm", "-rf", "/tmp/hutch-disk-smoke"])
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)

    def t_mounts():
        out, _, t, f = run(["cat", "/proc/self/mountinfo"])
        for mnt, fs in ((b"/run", b"tmpfs"), (b"/tmp", b"tmpfs")):
            check(any(l.split()[4] == mnt and fs in l.split(b" - ")[1] for l in out.splitlines()),
                  "%s not mounted" % mnt)

    def t_loopback():
        code = ("import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
                "socket.create_connection(s.getsockname()); print('lo-ok')")
        out, err, t, f = run(["python3", "-c", code])
        check(out == b"lo-ok\n", "loopback: %r %r" % (out, err[-200:]))

    def t_exec_pty():
        out, _, t, f = run(["sh", "-c", "tty; echo $TERM"], pty=(80, 24))
        check(b"/dev/pts/" in out and t == rt.EXIT, "pty %r" % out)

    def t_orphans_reaped():
        out, _, t, f = run(["sh", "-c", "sleep 0.3 & sleep 0.3 & exit 4"])
        check(t == rt.EXIT and rt.u32(f[1]) == 4, "exit %r" % f)
        time.sleep(1.0)
        zombies = [c for c in children_of(agent_pid) if c[1] == "Z"]
        check(not zombies, "zombies under PID 1: %r" % zombies)

    def t_ignores_signals():
        out, _, t, f = run(["sh", "-c", "kill -TERM 1; kill -INT 1; kill -HUP 1; echo sent"])
        check(out == b"sent\n", "out %r" % out)
        time.sleep(0.2)
        rt.t_ping(h)

    def t_console():
        console_expect(cm, b"echo console-$((40+2))\n", b"console-42")
        console_expect(cm, b"echo $0 $TERM; tty\n", b"ttyS0")
        start = time.time()
        os.write(cm, b"exit\n")
        time.sleep(0.3)
        console_expect(cm, b"echo again-$((1+1))\n", b"again-2")
        check(time.time() - start < 5, "respawn took too long")

    def t_poweroff():
        h.sendf(rt.POWEROFF, 0)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            raise rt.Fail("namespace still running after POWEROFF")
        # reboot(RB_AUTOBOOT) in a pid namespace kills its init with SIGHUP (what a restart
        # does there); in a VM it makes QEMU, run with -no-reboot, exit.
        check(proc.returncode in (-signal.SIGHUP, 128 + signal.SIGHUP), "status %r" % proc.returncode)

    tests = [("pid1-handshake", t_handshake), ("pid1-hostname-ignored", t_hostname), ("pid1-configure", t_configure),
             ("pid1-net", t_net), ("pid1-disks", t_disks), ("pid1-mounts", t_mounts),
             ("pid1-loopback", t_loopback), ("pid1-exec-pty", t_exec_pty),
             ("pid1-orphans-reaped", t_orphans_reaped), ("pid1-ignores-signals", t_ignores_signals),
             ("pid1-console", t_console), ("pid1-poweroff", t_poweroff)]
    h = None
    agent_pid = None
    try:
        deadline = time.time() + 5
        while agent_pid is None:
            check(time.time() < deadline, "agent did not start")
            kids = children_of(proc.pid)
            agent_pid = kids[0][0] if kids else None
            time.sleep(0.05)
        for name, fn in tests:
            start = time.time()
            try:
                if h is None:
                    h = PtyHost(tm)
                fn()
                passed += 1
                print("ok   %-20s %.2fs" % (name, time.time() - start))
            except Exception as e:  # noqa: BLE001
                failed += 1
                print("FAIL %-20s %s" % (name, e))
                if not isinstance(e, rt.Fail):
                    traceback.print_exc()
    finally:
        if proc.poll() is None:
            proc.kill()  # unshare --kill-child takes PID 1 of the namespace with it
            proc.wait()
        log.close()
        if failed:
            with open(os.path.join(work, "agent.log"), "rb") as f:
                print("---- PID 1 agent log ----")
                print(f.read().decode(errors="replace")[-3000:])
        shutil.rmtree(work, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
