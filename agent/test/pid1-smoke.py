#!/usr/bin/env python3
"""Runs the agent as PID 1 in new pid/mount/uts/net namespaces, the closest thing to a
guest without booting one: the transport is a raw pty (--port), the "serial console" is
another pty bind-mounted over /dev/ttyS0, and the kernel command line is a bind-mounted
file. Checks the PID 1 duties, then POWEROFF (inside a pid namespace, reboot() only ends
the namespace). Needs root and unshare(1); skipped otherwise. Prints `N passed, M failed`."""
import importlib.util
import os
import select
import shutil
import signal
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
    script = ("mount --bind %s /dev/ttyS0 && mount --bind %s /proc/cmdline && exec %s --port %s"
              % (os.ttyname(cs), cmdline, agent, os.ttyname(ts)))
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--net",
                             "--propagation", "private", "sh", "-c", script],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    passed = failed = 0

    def run(args, **kw):
        return rt.run(h, args, **kw)

    def t_handshake():
        pass

    def t_hostname():
        out, _, t, f = run(["cat", "/proc/sys/kernel/hostname"])
        check(out == b"smoke-vm\n", "hostname %r" % out)

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

    tests = [("pid1-handshake", t_handshake), ("pid1-hostname", t_hostname), ("pid1-mounts", t_mounts),
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
